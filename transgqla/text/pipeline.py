"""The one text pipeline: text sources -> one string -> token ids -> non-overlapping windows.

Why one: calibration, ``eval-ppl``, ``verify`` and the export check all turn text into tokens. With one
reader, one tokenizer rule and one windowing rule the same file gives the same tokens, and so the same
perplexity, in every command (tests/test_verify.py compares ``verify --text`` with ``eval-ppl``).

* **Sources** (:func:`source_parts`): files (plain text; ``.jsonl`` / ``.ndjson``: each line's ``text``) or
  ``builtin:NAME`` (:mod:`.builtin`), joined by a blank line; files are regular UTF-8 text, judged on their
  first bytes and streamed (:mod:`.reading`). ``hf:`` datasets and ``self`` are calibration's
  (:mod:`transgqla.calib.sources`), which hands their text to the same windowing.
* **Tokens** (:func:`encode`): the model folder's ``tokenizer.json`` through the ``tokenizers`` package,
  **without special tokens** (no BOS), as one stream; ids outside the model's vocabulary are an error.
* **Windows** (:func:`source_windows`, :func:`token_windows`): the text tokenized a chunk of about a million
  characters at a time (cut after a newline; a shorter text whole) until the token budget is met, the stream
  cut into non-overlapping windows of ``seqlen`` tokens from its first token; a short tail is dropped. Each
  window is scored on its own.
* **Prompts**: :data:`PROMPT` (path equivalence, reference decoding, the export check) when the
  checkpoint has a tokenizer, else :func:`fixed_ids`.
"""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import InputError, TransGQLAError
from .reading import check_text_file, chunks, file_parts, joined

BUILTIN = "builtin:"
#: Prompt for real-token hidden states (path equivalence), reference decoding and the export check.
PROMPT = "The old lighthouse keeper climbed the stairs every evening and, before lighting the lamp, wrote"
#: Used when the built-in documentation text cannot be built (a Python without its documentation).
FALLBACK_TEXT = (
    "A river town grew up where the old road met the water. Merchants came first, trading salt and wool for "
    "timber from the hills; later a bridge was built, then a mill, and the market square filled every week "
    "with carts from the surrounding villages. When the railway arrived the town changed again: warehouses "
    "rose along the bank, the population doubled within twenty years, and the quiet crossing became a place "
    "people passed through on their way to somewhere else. Today the mill is a museum, the warehouses hold "
    "offices and flats, and on summer evenings the square is as crowded as it was on market days long ago."
)
BUILTIN_TEXT_CHARS = 12_000  # the start of builtin:eval that verify scores when no --text is given


# -- sources ----------------------------------------------------------------------------------------


def source_parts(sources: list[str], flag: str = "--text") -> Iterator[Iterator[str]]:
    """The parts of ``sources`` (paths or ``builtin:NAME``), each an iterator of text pieces, files read in
    bounded memory (:mod:`.reading`: regular text files only, judged on their first bytes)."""
    for src in sources:
        if src.startswith(BUILTIN):
            from .builtin import builtin_text

            yield iter((builtin_text(src[len(BUILTIN):]),))
        else:
            yield from file_parts(Path(src), flag)


def check_sources(sources: list[str], flag: str = "--text") -> None:
    """Refuse a missing, special, binary or empty file among ``sources`` before any work (one line)."""
    for src in sources:
        if not src.startswith(BUILTIN):
            check_text_file(src, flag)


def read_sources(sources: list[str], flag: str = "--text") -> str:
    """The texts of ``sources`` joined by blank lines, whole (for the built-in texts and small files; the
    commands stream instead: :func:`source_windows`)."""
    text = "".join(joined(source_parts(sources, flag)))
    if not text:
        raise InputError(f"no text found in {', '.join(sources)}")
    return text


def read_text_flag(path: str | Path, flag: str = "--text") -> None:
    """Check one ``--text`` value before any work: missing, special, not UTF-8 or empty is a one-line error."""
    check_sources([str(path)], flag)


def builtin_eval_text() -> tuple[str, str]:
    """(text, description): the start of ``builtin:eval``, else an embedded paragraph."""
    try:
        from .builtin import builtin_text

        text = builtin_text("eval")[:BUILTIN_TEXT_CHARS]
        if text.strip():
            return text, f"built-in eval text (first {len(text)} characters)"
    except (ImportError, TransGQLAError, OSError):
        pass
    return FALLBACK_TEXT, "built-in paragraph"


# -- tokens -----------------------------------------------------------------------------------------


def find_tokenizer(folder: Path):
    """The folder's ``tokenizer.json`` through the ``tokenizers`` package, or None if either is absent
    (the caller falls back to :func:`fixed_ids`); a broken file is a one-line error."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer file is the user's input
        raise InputError(f"{path} cannot be loaded: {exc}".splitlines()[0]) from None


def load_tokenizer(folder: Path):
    """The folder's tokenizer, required (calibration and perplexity need real tokens)."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise InputError("calibration and perplexity need the 'tokenizers' package: pip install tokenizers") from None
    tok = find_tokenizer(folder)
    if tok is None:
        raise InputError(f"{folder} has no tokenizer.json; calibration and perplexity need it")
    return tok


def _check_vocab(ids: list[int], vocab: int | None) -> None:
    if vocab is not None and any(i >= vocab or i < 0 for i in ids):
        raise InputError(f"the tokenizer produced ids outside the model's vocabulary of {vocab}")


def encode(tokenizer, text: str, vocab: int | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens, checked against ``vocab`` when given."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    _check_vocab(ids, vocab)
    return ids


def fixed_ids(n: int, vocab: int, seed: int = 1234) -> list[int]:
    """Deterministic pseudo-random token ids, for checkpoints without a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


# -- windows ----------------------------------------------------------------------------------------


def stream_ids(pieces: Iterable[str], tokenizer, max_tokens: int | None = None,
               vocab: int | None = None) -> torch.Tensor:
    """Token ids (int64) of the concatenated ``pieces``, tokenized chunk by chunk (:func:`.reading.chunks`)
    and no further than ``max_tokens``: memory holds one chunk and the ids kept, whatever the text's size."""
    ids = array("q")
    for chunk in chunks(pieces):
        ids.extend(encode(tokenizer, chunk, vocab))
        if max_tokens is not None and len(ids) >= max_tokens:
            del ids[max_tokens:]
            break
    return torch.tensor(ids, dtype=torch.int64) if ids else torch.empty(0, dtype=torch.int64)


def ids_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` of a token stream (a short tail dropped)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise InputError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def token_windows(text: str, tokenizer, seqlen: int, max_tokens: int | None = None,
                  vocab: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` (int64) of the token stream, at most ``max_tokens`` tokens."""
    if seqlen < 2:
        raise InputError(f"sequence length must be at least 2, got {seqlen}")
    return ids_windows(stream_ids((text,), tokenizer, max_tokens, vocab), seqlen)


def source_windows(sources: list[str], tokenizer, seqlen: int, max_tokens: int | None = None,
                   vocab: int | None = None, flag: str = "--text") -> torch.Tensor:
    """:func:`token_windows` of ``sources`` joined by blank lines, read and tokenized in chunks until
    ``max_tokens`` is met (bounded memory in the files' size)."""
    if seqlen < 2:
        raise InputError(f"sequence length must be at least 2, got {seqlen}")
    check_sources(sources, flag)
    ids = stream_ids(joined(source_parts(sources, flag)), tokenizer, max_tokens, vocab)
    if ids.numel() == 0:
        raise InputError(f"no text found in {', '.join(sources)}")
    return ids_windows(ids, seqlen)


def windows_record(windows: torch.Tensor, sources: list[str]) -> dict:
    """What reproduces a calibration: where the text came from and the sha256 of the token windows
    (int64, row-major), recorded in ``config.gqla.conversion.calibration``."""
    digest = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"text_sources": list(sources), "windows_sha256": digest, "windows": list(windows.shape),
            "tokens": int(windows.numel())}
