"""The split of a KV-cache budget between the latent and the RoPE key: ``--kv-budget`` and ``--qk-rope-dim auto``.

The absorb path caches ``N = r + d_R`` values per token per layer (DESIGN.md section 2). For one ``N`` the
split is a trade: a wider RoPE key keeps more of the source's position signal exactly, a wider latent
reconstructs more of the nope keys and the values. Which wins depends on the model (TransMLA reports
448 + 128 far better than 512 + 64 on Llama-3-8B before fine-tuning), so ``--qk-rope-dim auto`` measures it
(calib/split_search.py); this module is only the rule: which splits exist and which ones the flags fix.

* ``--kv-budget N --qk-rope-dim D``: ``r = N - D``; ``--kv-budget N --kv-lora-rank R``: ``d_R = N - R``;
  all three: they must add up; ``--kv-budget N`` alone: ``d_R`` of the recipe (or the default rule).
* ``--qk-rope-dim auto`` (with ``--kv-budget N``, else the recipe's or default rule's ``r + d_R``): every
  candidate ``d_R`` that the GQLA format and the RoPE search support, i.e. even, dividing ``head_dim``
  (DeepSeek's slot geometry rotates pair ``p`` at source frequency ``p * head_dim / d_R``), at most
  :data:`MAX_COLLAPSE` times narrower than ``head_dim``, with ``1 <= N - d_R <= max rank``. It needs a
  calibrated method: the candidates are judged by their calibration error.
* A recipe named with ``--recipe`` pins ``d_R`` when it sets one: ``auto`` keeps it and says so. (A recipe
  matched automatically only supplies defaults.) Shapes the serving engines need (``r = 512, d_R = 64``
  for their fast kernels, engines.py) are the export's business: a searched split may need padding there,
  which ``export`` and ``verify`` say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .mathx.gqla_layer import max_rank
from .source_geometry import SourceGeometry

AUTO = "auto"
# Narrowest RoPE key searched: head_dim / 4 (16 of 64, 32 of 128). Narrower keys rotate one pair in 8 or
# more source frequencies; each candidate costs a closed-form conversion of the probe layers.
MAX_COLLAPSE = 4


@dataclass(frozen=True)
class BudgetSplit:
    budget: int
    candidates: tuple[int, ...]  # d_R the search chooses among; () when the flags or a recipe fix it
    pinned: str | None = None  # why ``auto`` was not searched

    def settings_fields(self, method: str) -> dict[str, Any]:
        """The :class:`~transgqla.settings.ConversionSettings` fields of this split for ``method``;
        InputError when ``auto`` has nothing to judge the candidates by."""
        if len(self.candidates) > 1 and method == "pca":
            raise InputError("--qk-rope-dim auto chooses the split by calibration error: it needs calibration "
                             "text (--calib) and a calibrated --method (transmla or gqla)")
        report = None
        if self.pinned:
            report = {"budget": self.budget, "pinned": self.pinned}
        elif len(self.candidates) == 1:
            report = {"budget": self.budget, "candidates": {str(self.candidates[0]): None},
                      "chosen_qk_rope_head_dim": self.candidates[0], "note": "the only split this model admits"}
        return {"kv_budget": self.budget,
                "split_candidates": list(self.candidates) if len(self.candidates) > 1 else None,
                "split_search": report}


def split_candidates(geo: SourceGeometry, budget: int) -> list[int]:
    """Every ``d_R`` ``auto`` may choose for ``budget``, narrowest first."""
    d = geo.head_dim
    out = []
    for d_r in range(2, d + 1, 2):
        if d % d_r or d // d_r > MAX_COLLAPSE:
            continue
        if 1 <= budget - d_r <= max_rank(geo.n_groups, d, d_r, geo.hidden):
            out.append(d_r)
    return out


def _check_fixed(geo: SourceGeometry, budget: int, rank: int, rope: int) -> None:
    d = geo.head_dim
    if rope < 2 or rope % 2 or d % rope:
        raise InputError(f"--kv-budget {budget} = r {rank} + d_R {rope}: d_R must be even and divide head_dim {d}")
    top = max_rank(geo.n_groups, d, rope, geo.hidden)
    if not 1 <= rank <= top:
        raise InputError(f"--kv-budget {budget} with d_R = {rope} needs latent rank {rank}; this model admits "
                         f"1..{top} (budgets {rope + 1}..{rope + top})")


def budget_split(geo: SourceGeometry, base: dict[str, Any], kv_budget: int | None, kv_lora_rank: int | None,
                 qk_rope_dim: int | str | None, pinned_by: str | None = None) -> tuple[int, int, BudgetSplit]:
    """``(r, d_R, split)`` from the flags (``base``: the recipe's settings; ``pinned_by``: the name of a
    recipe given with ``--recipe``). With ``auto``, ``(r, d_R)`` is a provisional candidate (the one nearest
    the default ``d_R``) until the search picks one. Raises InputError on impossible budgets."""
    from .settings import default_rank, default_rope_dim

    auto = qk_rope_dim == AUTO
    if isinstance(qk_rope_dim, str) and not auto:
        raise InputError(f"--qk-rope-dim must be an even integer or 'auto', got {qk_rope_dim!r}")
    base_rope = int(base.get("qk_rope_head_dim", default_rope_dim(geo)))
    if kv_budget is None:  # auto alone: the budget the recipe or the default rule would spend
        if kv_lora_rank is not None:
            raise InputError("--qk-rope-dim auto chooses r + d_R within a budget: give it as --kv-budget N "
                             "instead of --kv-lora-rank")
        kv_budget = int(base.get("kv_lora_rank", default_rank(geo, base_rope))) + base_rope
    if kv_budget < 3:
        raise InputError("--kv-budget must be at least 3 values per token per layer (r >= 1, d_R >= 2), "
                         f"got {kv_budget}")
    if auto:
        if kv_lora_rank is not None:
            raise InputError("--qk-rope-dim auto sets r = N - d_R itself: "
                             "drop --kv-lora-rank (the budget is --kv-budget)")
        if pinned_by and "qk_rope_head_dim" in base:
            rope = base_rope
            _check_fixed(geo, kv_budget, kv_budget - rope, rope)
            return kv_budget - rope, rope, BudgetSplit(kv_budget, (),
                                                       f"recipe {pinned_by} pins qk_rope_head_dim = {rope}; kept")
        cands = split_candidates(geo, kv_budget)
        if not cands:
            top = max_rank(geo.n_groups, geo.head_dim, geo.head_dim // MAX_COLLAPSE, geo.hidden)
            raise InputError(
                f"--kv-budget {kv_budget} cannot be split for this model: d_R must be even, divide head_dim "
                f"{geo.head_dim} and be at least {max(2, geo.head_dim // MAX_COLLAPSE)}, with 1 <= r = N - d_R <= "
                f"{top} (budgets {max(2, geo.head_dim // MAX_COLLAPSE) + 1}..{2 * geo.n_groups * geo.head_dim})")
        rope = min(cands, key=lambda c: (abs(c - base_rope), c))
        return kv_budget - rope, rope, BudgetSplit(kv_budget, tuple(cands))
    if kv_lora_rank is not None and qk_rope_dim is not None:
        if kv_lora_rank + int(qk_rope_dim) != kv_budget:
            raise InputError(f"--kv-budget {kv_budget} is not --kv-lora-rank {kv_lora_rank} + --qk-rope-dim "
                             f"{qk_rope_dim}: give two of the three")
        rope = int(qk_rope_dim)
    elif kv_lora_rank is not None:
        rope = kv_budget - kv_lora_rank
    else:
        rope = int(qk_rope_dim) if qk_rope_dim is not None else base_rope
    rank = kv_budget - rope
    _check_fixed(geo, kv_budget, rank, rope)
    return rank, rope, BudgetSplit(kv_budget, ())
