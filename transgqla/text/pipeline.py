"""The one text pipeline: text sources -> one string -> token ids -> non-overlapping windows.

Why one: calibration, ``eval-ppl``, ``verify`` and the export check all turn text into tokens. With one
reader, one tokenizer rule and one windowing rule the same file gives the same tokens, and so the same
perplexity, in every command (tests/test_verify.py compares ``verify --text`` with ``eval-ppl``).

* **Sources** (:func:`read_sources`): files (plain text; ``.jsonl`` / ``.ndjson``: each line's ``text``) or
  ``builtin:NAME`` (:mod:`.builtin`), joined by a blank line. ``hf:`` datasets and ``self`` are calibration's
  (:mod:`transgqla.calib.sources`), which hands their text to the same windowing.
* **Tokens** (:func:`encode`): the model folder's ``tokenizer.json`` through the ``tokenizers`` package,
  **without special tokens** (no BOS), as one stream; ids outside the model's vocabulary are an error.
* **Windows** (:func:`token_windows`): the stream cut into non-overlapping windows of ``seqlen`` tokens
  from its first token; a short tail is dropped. Each window is scored on its own.
* **Prompts**: :data:`PROMPT` (path equivalence, reference decoding, the export check) when the
  checkpoint has a tokenizer, else :func:`fixed_ids`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import InputError, TransGQLAError

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


def read_sources(sources: list[str]) -> str:
    """Concatenate the texts of ``sources`` (paths or ``builtin:NAME``), separated by blank lines."""
    parts = []
    for src in sources:
        if src.startswith(BUILTIN):
            from .builtin import builtin_text

            parts.append(builtin_text(src[len(BUILTIN):]))
            continue
        path = Path(src)
        if not path.is_file():
            raise InputError(f"text file {src} does not exist")
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix in (".jsonl", ".ndjson"):
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    parts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(f"{src}:{n}: expected a JSON object with a 'text' field") from None
        else:
            parts.append(raw)
    text = "\n\n".join(p for p in parts if p.strip())
    if not text:
        raise InputError(f"no text found in {', '.join(sources)}")
    return text


def read_text_flag(path: str | Path, flag: str = "--text") -> str:
    """One ``--text`` value read as :func:`read_sources` reads it, with one-line errors that name the flag
    (missing, not UTF-8, empty) checked before any work."""
    if not str(path).startswith(BUILTIN):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{flag} {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{flag} {path} cannot be read as UTF-8 text: {exc}".splitlines()[0]) from None
        if not text.strip():
            raise InputError(f"{flag} {path} is empty")
    return read_sources([str(path)])


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


def token_windows(text: str, tokenizer, seqlen: int, max_tokens: int | None = None,
                  vocab: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` (int64) of the token stream, at most ``max_tokens`` tokens."""
    if seqlen < 2:
        raise InputError(f"sequence length must be at least 2, got {seqlen}")
    ids = encode(tokenizer, text, vocab)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seqlen
    if n == 0:
        raise InputError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.int64).view(n, seqlen)


def windows_record(windows: torch.Tensor, sources: list[str]) -> dict:
    """What reproduces a calibration: where the text came from and the sha256 of the token windows
    (int64, row-major), recorded in ``config.gqla.conversion.calibration``."""
    digest = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"text_sources": list(sources), "windows_sha256": digest, "windows": list(windows.shape),
            "tokens": int(windows.numel())}
