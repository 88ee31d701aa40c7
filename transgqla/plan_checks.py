"""What ``convert`` would write wrong, refused in its plan before one byte is written (and before calibration).

Why: a conversion that finishes and exits 0 must produce something its own ``verify`` and the shipped runtime
accept. Each of these used to be found only afterwards (verify dying on a ``KeyError``, a runtime refusing the
activation, verify calling tensors "not part of the format"):

* the activation and the RoPE frequencies are built once, here, for the source and for the output geometry:
  an unknown ``hidden_act`` is refused (exit 3), bad rope-scaling parameters are one line (exit 2);
* the ``config.json`` the run would write goes through the format contract and the runtime's geometry
  (:func:`transgqla.format.config_problems`, :func:`transgqla.model.geometry.geometry_problems`);
* every planned tensor goes through the inventory verify checks (:mod:`transgqla.inventory`): a tensor the
  family's block does not name is refused with the list (transgqla cannot say what it does, so it would
  either drop it silently or write a checkpoint its verify rejects), and so is a shape the format does not imply.

Finiteness of the data is not known here; the copy loop scans it (:mod:`transgqla.convert`).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError, UnsupportedError
from .format import build_config, config_problems
from .inventory import expected_tensors
from .io import TensorSpec
from .mathx.rope import inv_freq
from .model.block import ACTIVATIONS
from .model.geometry import geometry_problems
from .settings import ConversionSettings
from .source_geometry import SourceGeometry

MAX_LISTED = 5


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def refuse_unbuildable(geo: SourceGeometry, rope_dims: tuple[int, ...]) -> None:
    """The activation and the RoPE frequencies (at each of ``rope_dims``), built once; one line when they
    cannot be."""
    if geo.block.activation not in ACTIVATIONS:
        raise UnsupportedError(f"activation {geo.block.activation!r} (hidden_act) is not supported; supported are "
                               f"{', '.join(ACTIVATIONS)}")
    for dim in rope_dims:
        try:
            freqs = inv_freq(dim, geo.rope_base, geo.rope_scaling)
        except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
            raise InputError(f"config.json: the RoPE frequencies cannot be built from rope_theta {geo.rope_base} and "
                             f"rope scaling {geo.rope_scaling}: {type(exc).__name__} {exc}"[:400]) from None
        if not bool(torch.isfinite(freqs).all()) or bool((freqs <= 0).any()):
            raise InputError(f"config.json: rope_theta {geo.rope_base} with rope scaling {geo.rope_scaling} gives "
                             "RoPE frequencies that are not all finite and positive")


def refuse_unwritable(source_config: dict[str, Any], geo: SourceGeometry, settings: ConversionSettings,
                      identity: dict[str, Any], outputs: list[TensorSpec], o_proj_bias: bool) -> None:
    """The config and tensors this plan would write, checked as verify will check them."""
    refuse_unbuildable(geo, (geo.head_dim, settings.qk_rope_head_dim))
    cfg = build_config(source_config, geo, settings, identity, [], o_proj_bias=o_proj_bias)
    problems = config_problems(cfg) or geometry_problems(cfg)
    if problems:
        raise InputError(f"the converted config.json would not hold: {'; '.join(problems[:3])}"[:500])
    exp = expected_tensors(cfg)
    unknown = [s.name for s in outputs if s.name not in exp.required and s.name not in exp.optional]
    if unknown:
        raise UnsupportedError(f"the source holds {len(unknown)} tensor(s) the {geo.family.name} block does not name: "
                               f"{_listed(unknown)}; transgqla cannot say what they do, so it does not convert this "
                               "checkpoint (remove them, or merge them into the weights they belong to)")
    wrong = [f"{s.name} {list(s.shape)} (expected {list(exp.required.get(s.name) or exp.optional[s.name])})"
             for s in outputs if tuple(s.shape) != tuple(exp.required.get(s.name) or exp.optional[s.name])]
    if wrong:
        raise InputError(f"tensor shapes the config does not imply: {_listed(wrong)}")
