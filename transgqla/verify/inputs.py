"""Inputs the model checks share: device and dtype, tokenizer, prompt and text, windows, and a
checkpoint read layer by layer (one layer's tensors resident at a time, plus embeddings and head).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, TransGQLAError, UnsupportedError
from ..io import SafetensorsCheckpoint
from ..model.decoder import Decoder, rms_norm

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
BUILTIN_TEXT_CHARS = 12_000  # enough for two 512-token windows with a Llama-style tokenizer


def resolve_device(device: str) -> torch.device:
    from ..devices import resolve_device as shared  # the one --device parser

    return shared(device)


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
    ids = tokenizer.encode(text).ids
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
    """A text file, or ``builtin:NAME`` (the offline texts of :mod:`transgqla.texts`) as for calibration."""
    if str(path).startswith("builtin:"):
        from ..calib.text import read_text as read_sources

        return read_sources([str(path)])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--text {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--text {path} cannot be read as UTF-8 text: {exc}".splitlines()[0]) from None
    if not text.strip():
        raise InputError(f"--text {path} is empty")
    return text


def windows(ids: list[int], seqlen: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seqlen`` tokens; a last shorter window is kept if it has 2+ tokens."""
    if seqlen < 2:
        raise InputError(f"--seqlen must be at least 2, got {seqlen}")
    out = [torch.tensor(ids[i : i + seqlen]) for i in range(0, len(ids), seqlen)]
    out = [w for w in out if w.numel() >= 2]
    return out[:max_windows] if max_windows else out


def batches(wins: list[torch.Tensor], max_tokens: int = 4096) -> list[torch.Tensor]:
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


class LayerwiseModel:
    """A checkpoint run block by block: ``layer(i)`` is a decoder holding only layer ``i``'s tensors.

    Memory holds one layer (plus the embedding and head once asked for), so a model of any depth
    can be checked; ``full()`` loads everything, for the cached decoding loop.
    """

    def __init__(self, ckpt: SafetensorsCheckpoint, config: dict[str, Any], decoder_cls: type[Decoder], dtype: torch.dtype, device: torch.device):
        self.ckpt, self.config, self.cls = ckpt, config, decoder_cls
        self.dtype, self.device = dtype, device
        self.shell = self._decoder({})
        self.geo = self.shell.geo
        self.by_layer: dict[int, list[str]] = defaultdict(list)
        for name in ckpt.names:
            parts = name.split(".")
            if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
                self.by_layer[int(parts[2])].append(name)
        self._embed: torch.Tensor | None = None
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None

    def _decoder(self, tensors: dict[str, torch.Tensor]) -> Decoder:
        try:
            return self.cls(self.config, tensors, dtype=self.dtype, device=self.device)
        except ValueError as exc:  # e.g. an activation the reference decoder does not implement
            raise UnsupportedError(f"{self.ckpt.folder}: {exc}") from None

    def _load(self, name: str) -> torch.Tensor:
        return self.ckpt.read(name).to(device=self.device, dtype=self.dtype)

    @property
    def n_layers(self) -> int:
        return self.geo.n_layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._embed is None:
            self._embed = self._load("model.embed_tokens.weight")
        return self._embed[ids.to(self.device)]

    def layer(self, i: int) -> Decoder:
        return self._decoder({n: self._load(n) for n in self.by_layer[i]})

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self._head is None:
            head = "lm_head.weight" if "lm_head.weight" in self.ckpt else "model.embed_tokens.weight"
            self._head = (self._load("model.norm.weight"), self._load(head))
        norm, head = self._head
        return torch.nn.functional.linear(rms_norm(h, norm, self.geo.eps), head)

    def full(self) -> Decoder:
        return self._decoder({n: self._load(n) for n in self.ckpt.names})

    def positions(self, t: int) -> torch.Tensor:
        return torch.arange(t, device=self.device)
