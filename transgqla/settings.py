"""Resolve conversion settings: default rule < matched (or named) recipe < explicit flags; then validate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import InputError
from .mathx.gqla_layer import max_rank
from .mathx.rorope import check_geometry
from .recipe_book import Recipe, load_recipe, match_recipe
from .source_geometry import SourceGeometry

# Cache share the default rule aims for when no recipe matches: the paper's Llama-3-8B ratio 576/2048.
DEFAULT_CACHE_RATIO = 576 / 2048
RANK_MULTIPLE = 16
# Refinement steps per layer when neither a flag nor a recipe says (calibrated methods only).
DEFAULT_REFINE_STEPS = 50  # on by default: it wins in and out of domain (benchmarks/quality.py, benchmarks/README.md)


@dataclass
class ConversionSettings:
    kv_lora_rank: int
    qk_rope_head_dim: int
    freqfold: int
    freqfold_requested: str
    balance_kv: bool
    method: str
    calib: str
    dtype: str
    recipe: str | None
    refine: int = 0  # gradient steps per layer after the closed form (calib/refine.py); 0 = off
    refine_seed: int = 0
    kv_budget: int | None = None  # --kv-budget / --qk-rope-dim auto: r + d_R, values per token per layer
    split_candidates: list[int] | None = None  # d_R to choose from by calibration error (calib/split_search.py)
    split_search: dict[str, Any] | None = None  # what that search measured and chose

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_rope_dim(geo: SourceGeometry) -> int:
    """Half the head dim (DeepSeek's 64 of 128)."""
    return max(2, geo.head_dim // 2)


def default_rank(geo: SourceGeometry, rope_dim: int) -> int:
    """Latent rank keeping ``r + d_R`` near 28.125% of the GQA cache, rounded to a multiple of 16."""
    target = DEFAULT_CACHE_RATIO * geo.kv_values_per_token - rope_dim
    rank = int(target / RANK_MULTIPLE + 0.5) * RANK_MULTIPLE
    return max(RANK_MULTIPLE, min(rank, max_rank(geo.n_groups, geo.head_dim, rope_dim, geo.hidden)))


def auto_freqfold(geo: SourceGeometry, rope_dim: int) -> int:
    """Data-free choice: blocks of ``2 * collapse`` frequencies (TransMLA's FreqFold 4 at collapse 2),
    falling back to ``collapse`` where that does not divide the frequencies."""
    collapse = geo.head_dim // rope_dim
    half = geo.head_dim // 2
    return 2 * collapse if half % (2 * collapse) == 0 else collapse


METHODS = ("pca", "transmla", "gqla")


def _method(requested: str | None, calib: str) -> str:
    """Default: ``gqla`` with calibration text, ``pca`` (data-free) without; calibrated methods need text."""
    method = requested or ("pca" if calib == "none" else "gqla")
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "pca" and calib == "none":
        raise InputError(f"--method {method} needs calibration text (--calib PATH or --calib builtin:calib)")
    if method == "pca" and calib != "none":
        raise InputError("--method pca is data-free; drop --calib or pick --method transmla|gqla")
    return method


def resolve_settings(
    geo: SourceGeometry,
    *,
    kv_lora_rank: int | None = None,
    qk_rope_dim: int | str | None = None,
    freqfold: str | int | None = None,
    recipe: str | None = None,
    calib: str = "none",
    method: str | None = None,
    dtype: str,
    refine: int | None = None,
    kv_budget: int | None = None,
) -> ConversionSettings:
    """Combine the default rule, the recipe and the flags; raise InputError on impossible values."""
    chosen: Recipe | None = load_recipe(recipe) if recipe else match_recipe(geo)
    base = dict(chosen.settings) if chosen else {}
    if kv_budget is not None or qk_rope_dim == "auto":
        from .kv_budget import budget_split

        kv_lora_rank, qk_rope_dim, split = budget_split(geo, base, kv_budget, kv_lora_rank, qk_rope_dim,
                                                        pinned_by=chosen.name if recipe and chosen else None)
    else:
        split = None
    rope_dim = qk_rope_dim if qk_rope_dim is not None else base.get("qk_rope_head_dim", default_rope_dim(geo))
    if rope_dim < 2 or rope_dim % 2 or geo.head_dim % rope_dim:
        raise InputError(
            f"--qk-rope-dim {rope_dim} must be even and divide head_dim {geo.head_dim}"
        )
    rank = kv_lora_rank if kv_lora_rank is not None else base.get("kv_lora_rank", default_rank(geo, rope_dim))
    top = max_rank(geo.n_groups, geo.head_dim, rope_dim, geo.hidden)
    if rank < 1 or rank > top:
        raise InputError(
            f"--kv-lora-rank {rank} is out of range: this model admits 1..{top} "
            f"(min(2 n_g d - d_R, hidden) = min({2 * geo.n_groups * geo.head_dim - rope_dim}, {geo.hidden}))"
        )
    requested = str(freqfold if freqfold is not None else base.get("freqfold", "auto"))
    if requested == "auto":
        ff = auto_freqfold(geo, rope_dim)
    else:
        try:
            ff = int(requested)
        except ValueError:
            raise InputError(f"--freqfold must be a positive integer or 'auto', got {requested!r}") from None
    try:
        check_geometry(geo.head_dim, rope_dim, ff)
    except ValueError as exc:
        raise InputError(f"--freqfold: {exc}") from None
    chosen_method = _method(method or base.get("method"), calib)
    steps = int(refine if refine is not None else base.get("refine", DEFAULT_REFINE_STEPS))
    if steps < 0:
        raise InputError(f"--refine must be a non-negative number of steps, got {steps}")
    if chosen_method == "pca":
        if refine:  # asked for explicitly
            raise InputError("--refine needs calibration text (--calib); the data-free method has nothing to fit")
        steps = 0
    return ConversionSettings(
        kv_lora_rank=int(rank),
        qk_rope_head_dim=int(rope_dim),
        freqfold=ff,
        freqfold_requested=requested,
        balance_kv=bool(base.get("balance_kv", True)),
        method=chosen_method,
        calib=calib,
        dtype=dtype,
        recipe=chosen.name if chosen else None,
        refine=steps,
        **_split_fields(split, chosen_method, geo, requested),
    )


def _split_fields(split, method: str, geo: SourceGeometry, freqfold_requested: str) -> dict[str, Any]:
    """The budget fields of the settings; an explicit FreqFold keeps the candidates it fits."""
    if split is None:
        return {}
    fields = split.settings_fields(method)
    if fields["split_candidates"] and freqfold_requested != "auto":
        fits = []
        for d_r in fields["split_candidates"]:
            try:
                check_geometry(geo.head_dim, d_r, int(freqfold_requested))
                fits.append(d_r)
            except ValueError:
                pass
        fields["split_candidates"] = fits if len(fits) > 1 else None
    return fields


def with_split(geo: SourceGeometry, s: ConversionSettings, rope_dim: int) -> ConversionSettings:
    """``s`` with its KV budget split as ``(kv_budget - rope_dim) + rope_dim`` (FreqFold re-resolved if 'auto')."""
    ff = auto_freqfold(geo, rope_dim) if s.freqfold_requested == "auto" else s.freqfold
    return replace(s, kv_lora_rank=s.kv_budget - rope_dim, qk_rope_head_dim=rope_dim, freqfold=ff)
