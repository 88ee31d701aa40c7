"""The one parser of ``--device`` for every command (convert, eval-ppl, verify, export).

One device decides everything a command computes (DESIGN.md section 8): the CLI resolves the flag
once, here, and the library takes a ``torch.device``-like value from then on. ``auto`` is CUDA when
there is one; asking for CUDA on a machine without it is a one-line :class:`InputError` (exit 2),
not the traceback torch would give at the first tensor moved there.
"""

from __future__ import annotations

import torch

from .errors import InputError

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a usable ``torch.device``."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine (use auto or cpu)")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise InputError(f"--device {name!r} is not a valid CUDA device") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise InputError(f"--device must be one of {', '.join(CHOICES)} (or cuda:N), got {name!r}")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (timings and progress lines must not count work still queued)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
