"""The tokenizer section of a GGUF export, read from OUT's Hugging Face tokenizer files.

llama.cpp tokenizes by itself, so a GGUF carries the vocabulary: ``tokenizer.ggml.model`` (``gpt2`` for
byte-level BPE), the pre-tokenizer's name (``tokenizer.ggml.pre``: llama.cpp picks its split regex by that
name), every token string by id (``vocab_size`` of them: ids no token claims become ``[PAD<id>]``, type
UNUSED), the token types (NORMAL; CONTROL for special added tokens; USER_DEFINED for other added tokens), the
BPE merges as ``"left right"`` strings, the special token ids and the chat template.

Only GPT-2-style byte-level BPE (``tokenizer.json`` with a BPE model and a ByteLevel decoder: SmolLM2,
Llama-3, Qwen2, GPT-2) is carried. Anything else (SentencePiece, no tokenizer at all) is written as
``tokenizer.ggml.model = "none"`` with ``vocab_size``: llama.cpp then runs on token ids (it adds dummy
tokens) and the export says so in a warning. The pre-tokenizer name is recognised from the structure of
``pre_tokenizer`` (:func:`pre_tokenizer_name`); an unrecognised one is written as ``default`` with a warning
(token ids fed to llama.cpp are unaffected; its own tokenization of text may differ from Hugging Face's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.source_files import read_checked

#: Llama-3's split regex (tiktoken style): ``llama-bpe`` in llama.cpp.
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
#: Qwen2's split regex: ``qwen2`` in llama.cpp.
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType values
MAX_JSON_BYTES = 256 << 20  # a tokenizer.json is megabytes


@dataclass
class Vocab:
    """What :func:`write_vocab` puts into the GGUF."""

    model: str  # "gpt2" | "none"
    pre: str | None = None
    tokens: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool | None = None
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "pre": self.pre, "tokens": len(self.tokens), "merges": len(self.merges),
                "special": self.special}


def _read_json(path: Path) -> Any:
    """The file's JSON, None when absent or not JSON; read under the shard rule (a link out of OUT is an error)."""
    if not path.is_symlink() and not path.exists():
        return None
    try:
        return json.loads(read_checked(path.parent, path.name, MAX_JSON_BYTES))
    except ValueError:
        return None


def _is_byte_level(node: Any, use_regex: bool) -> bool:
    return isinstance(node, dict) and node.get("type") == "ByteLevel" and bool(node.get("use_regex", True)) == use_regex


def _split_pattern(node: Any) -> str | None:
    if isinstance(node, dict) and node.get("type") == "Split":
        pattern = node.get("pattern") or {}
        return pattern.get("Regex") if isinstance(pattern, dict) else None
    return None


def pre_tokenizer_name(pre: Any) -> str | None:
    """llama.cpp's name for a ``tokenizer.json`` ``pre_tokenizer``, or None when not recognised.

    * ``ByteLevel`` with its own (GPT-2) regex: ``gpt-2``;
    * ``Digits(individual_digits)`` then that ``ByteLevel``: ``smollm`` (SmolLM2's published tokenizer);
    * ``Split(<Llama-3 regex>)`` / ``Split(<Qwen2 regex>)`` then ``ByteLevel`` without regex: ``llama-bpe`` / ``qwen2``.
    """
    if _is_byte_level(pre, True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if not isinstance(steps, list) or len(steps) != 2:
        return None
    first, second = steps
    if (isinstance(first, dict) and first.get("type") == "Digits" and first.get("individual_digits")
            and _is_byte_level(second, True)):
        return "smollm"
    if _is_byte_level(second, False):
        return {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(_split_pattern(first))
    return None


def _merge_strings(merges: list[Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _special_ids(folder: Path, config: dict[str, Any], ids: dict[str, int]) -> dict[str, int]:
    """bos / eos / unk / pad ids: the model config's ids, else the tokenizer_config's token strings."""
    tok_cfg = _read_json(folder / "tokenizer_config.json") or {}
    found: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        value = config.get(f"{kind}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            token = tok_cfg.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            value = ids.get(token) if isinstance(token, str) else None
        if isinstance(value, int):
            found[kind] = value
    return found


def _chat_template(folder: Path) -> str | None:
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    template = (_read_json(folder / "tokenizer_config.json") or {}).get("chat_template")
    return template if isinstance(template, str) else None


def read_vocab(folder: Path, config: dict[str, Any], vocab_size: int) -> Vocab:
    """The GGUF tokenizer section for OUT (``folder``), ``vocab_size`` tokens long."""
    tok = _read_json(folder / "tokenizer.json")
    model = tok.get("model") if isinstance(tok, dict) else None
    decoder = tok.get("decoder") if isinstance(tok, dict) else None
    byte_level = isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        why = "no tokenizer.json" if tok is None else "its tokenizer is not byte-level BPE"
        return Vocab("none", warnings=[f"OUT has {why}: the GGUF carries no vocabulary (tokenizer.ggml.model = none; "
                                       "llama.cpp runs it on token ids only)"])
    ids: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["id"]: a for a in tok.get("added_tokens") or [] if isinstance(a, dict) and "id" in a}
    for i, a in added.items():
        ids[a["content"]] = i
    by_id: dict[int, str] = {i: t for t, i in ids.items() if 0 <= i < vocab_size}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append((CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    vocab = Vocab("gpt2", pre_tokenizer_name(tok.get("pre_tokenizer")), tokens, types,
                  _merge_strings(model.get("merges") or []), _special_ids(folder, config, ids),
                  chat_template=_chat_template(folder))
    tok_cfg = _read_json(folder / "tokenizer_config.json") or {}
    if isinstance(tok_cfg.get("add_bos_token"), bool):
        vocab.add_bos = tok_cfg["add_bos_token"]
    elif vocab.pre == "llama-bpe":  # Llama-3's tokenizer prepends <|begin_of_text|> through its post-processor
        vocab.add_bos = True
    else:
        vocab.add_bos = False
    if vocab.pre is None:
        vocab.pre = "default"
        vocab.warnings.append("the tokenizer's pre-tokenizer is not one this export recognises (gpt-2, smollm, "
                              "llama-bpe, qwen2): written as 'default'; llama.cpp's own tokenization of text may "
                              "differ from Hugging Face's (token ids are unaffected)")
    return vocab


def write_vocab(writer: Any, vocab: Vocab, vocab_size: int) -> None:
    """Add ``vocab`` to a ``gguf.GGUFWriter`` (before its header is written)."""
    writer.add_vocab_size(vocab_size)
    writer.add_tokenizer_model(vocab.model)
    if vocab.model == "none":
        return
    writer.add_tokenizer_pre(vocab.pre or "default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
               "pad": writer.add_pad_token_id}
    for kind, value in vocab.special.items():
        setters[kind](value)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
