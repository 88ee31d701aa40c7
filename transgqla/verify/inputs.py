"""Inputs the model checks share: device and dtype, tokenizer, prompt and text, windows and groups
of windows (the checkpoint itself is read by :mod:`.layerwise`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..calib.text import read_text as read_sources
from ..calib.text import token_windows
from ..errors import InputError, TransGQLAError

DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Prompt for real-token hidden states (path equivalence) and reference decoding.
PROMPT = "The old lighthouse keeper climbed the stairs every evening and, before lighting the lamp, wrote"

#: Used when ``transgqla.texts`` cannot supply its held-out text.
FALLBACK_TEXT = (
    "A river town grew up where the old road met the water. Merchants came first, trading salt and wool for "
    "timber from the hills; later a bridge was built, then a mill, and the market square filled every week "
    "with carts from the surrounding villages. When the railway arrived the town changed again: warehouses "
    "rose along the bank, the population doubled within twenty years, and the quiet crossing became a place "
    "people passed through on their way to somewhere else. Today the mill is a museum, the warehouses hold "
    "offices and flats, and on summer evenings the square is as crowded as it was on market days long ago."
)
BUILTIN_TEXT_CHARS = 12_000
#: Tokens per forward batch: bounds the activations (the MLP's [tokens, intermediate] products are the
#: largest: 1024 x 14336 float32 = 59 MB each at Llama-3-8B).
BATCH_TOKENS = 1024
#: Tokens whose hidden states are held at once: the model is streamed once per group of windows.
GROUP_TOKENS = 8192  # enough for two 512-token windows with a Llama-style tokenizer


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be float32 or float64, got {dtype!r}")
    return DTYPES[dtype]


def load_tokenizer(folder: Path):
    """The folder's ``tokenizer.json`` through the ``tokenizers`` package, or None if either is absent."""
    path = folder / "tokenizer.json"
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


def encode(tokenizer, text: str, vocab: int) -> list[int]:
    """Token ids of ``text`` without special tokens (as calibration and ``eval-ppl`` tokenize)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if any(i >= vocab or i < 0 for i in ids):
        raise InputError(f"the tokenizer produced ids outside the model's vocabulary of {vocab}")
    return ids


def fixed_ids(n: int, vocab: int, seed: int = 1234) -> list[int]:
    """Deterministic pseudo-random token ids, for checkpoints without a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def builtin_eval_text() -> tuple[str, str]:
    """(text, description): the start of ``transgqla.texts``' held-out text, else an embedded paragraph."""
    try:
        from ..texts import builtin_text

        text = builtin_text("eval")[:BUILTIN_TEXT_CHARS]
        if text.strip():
            return text, f"built-in eval text (first {len(text)} characters)"
    except (ImportError, TransGQLAError, OSError):
        pass
    return FALLBACK_TEXT, "built-in paragraph"


def read_text(path: Path) -> str:
    """A text file (JSONL: its ``text`` fields), or ``builtin:NAME`` (the offline texts of
    :mod:`transgqla.texts`), read as calibration and ``eval-ppl`` read it; a bad file is a one-line error."""
    if not str(path).startswith("builtin:"):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"--text {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--text {path} cannot be read as UTF-8 text: {exc}".splitlines()[0]) from None
        if not text.strip():
            raise InputError(f"--text {path} is empty")
    return read_sources([str(path)])


def windows(ids: list[int], seqlen: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seqlen`` tokens; a last shorter window is kept if it has 2+ tokens."""
    if seqlen < 2:
        raise InputError(f"--seqlen must be at least 2, got {seqlen}")
    out = [torch.tensor(ids[i : i + seqlen]) for i in range(0, len(ids), seqlen)]
    out = [w for w in out if w.numel() >= 2]
    return out[:max_windows] if max_windows else out


def text_windows(tokenizer, text: str, seqlen: int, vocab: int) -> list[torch.Tensor]:
    """``--text`` windows exactly as ``eval-ppl`` makes them (:func:`~transgqla.calib.text.token_windows`:
    no special tokens, non-overlapping ``seqlen`` windows, a short tail dropped), so that both commands
    report the same perplexity for the same file."""
    wins = token_windows(text, tokenizer, seqlen)
    if int(wins.max()) >= vocab or int(wins.min()) < 0:
        raise InputError(f"the tokenizer produced ids outside the model's vocabulary of {vocab}")
    return list(wins)


def batches(wins: list[torch.Tensor], max_tokens: int = BATCH_TOKENS) -> list[torch.Tensor]:
    """Consecutive windows of equal length stacked into ``[B, T]`` batches of at most ``max_tokens``."""
    out: list[torch.Tensor] = []
    group: list[torch.Tensor] = []
    for w in wins:
        if group and (w.numel() != group[0].numel() or (len(group) + 1) * w.numel() > max_tokens):
            out.append(torch.stack(group))
            group = []
        group.append(w)
    if group:
        out.append(torch.stack(group))
    return out


def groups(wins: list[torch.Tensor], max_tokens: int = GROUP_TOKENS) -> list[list[torch.Tensor]]:
    """Consecutive windows in groups of at most ``max_tokens`` tokens (a longer window is alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for w in wins:
        if not out or size + w.numel() > max_tokens:
            out.append([])
            size = 0
        out[-1].append(w)
        size += w.numel()
    return out
