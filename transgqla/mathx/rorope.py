"""RoRoPE and FreqFold: choose the RoPE-carrying key subspace shared by all heads (DESIGN.md section 3).

Keys are seen as complex pairs ``z[g, i] = k_g[i] + j k_g[i + d/2]`` (group ``g``, frequency ``i``).
A real orthogonal mix of pairs that share one frequency commutes with RoPE, so rotating across
groups (RoRoPE) is exact. FreqFold pools ``ff`` adjacent frequencies into one block, takes the
block's principal components and lets the top ones rotate at one frequency: approximate, but it
concentrates the key energy into the ``d_R/2`` RoPE slots of DeepSeek's geometry, where slot ``p``
rotates at source frequency ``p * collapse`` (``collapse = d / d_R``).

The result is a real orthonormal basis ``V[n_g*d, d_R]`` of key space (rows: group-major
rotate_half coordinates; columns: interleaved slots ``(re_0, im_0, re_1, ...)``): the RoPE key is
``k_R = V^T k`` and every group keeps ``k_g - V_g k_R`` without RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linalg import eigh_descending


@dataclass
class RopeBasis:
    """Output of :func:`rope_basis`. ``energy_kept`` is the fraction of key energy carried by RoPE."""

    basis: torch.Tensor  # [n_g*d, d_R], orthonormal columns
    slot_freq_index: list[int]  # source frequency index each slot rotates at (= p * collapse)
    energy_kept: float


def check_geometry(head_dim: int, rope_dim: int, freqfold: int) -> None:
    """Raise ValueError unless ``rope_dim`` and ``freqfold`` fit ``head_dim`` (see module docstring)."""
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} is odd")
    if rope_dim < 2 or rope_dim % 2 or head_dim % rope_dim:
        raise ValueError(f"qk_rope_head_dim {rope_dim} must be even and divide head_dim {head_dim}")
    collapse = head_dim // rope_dim
    if freqfold < 1 or (head_dim // 2) % freqfold or (freqfold % collapse and collapse % freqfold):
        raise ValueError(
            f"freqfold {freqfold} must divide {head_dim // 2} and be a multiple or divisor of "
            f"head_dim/qk_rope_head_dim = {collapse}"
        )


def pair_energy(key_gram: torch.Tensor, n_groups: int, head_dim: int, freqs: list[int]) -> torch.Tensor:
    """Energy matrix of the complex pairs ``(g, i)``, ``g`` major, ``i`` in ``freqs``.

    ``E[(g,i),(h,l)] = Gram[re_gi, re_hl] + Gram[im_gi, im_hl]``: the mean squared magnitude of a
    real combination ``u`` of pairs is ``u^T E u`` because the same ``u`` mixes real and imaginary parts.
    """
    half = head_dim // 2
    idx = torch.tensor([g * head_dim + i for g in range(n_groups) for i in freqs], device=key_gram.device)
    return key_gram[idx][:, idx] + key_gram[idx + half][:, idx + half]


def block_components(key_gram, n_groups, head_dim, freqs, pair_weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal components of a frequency block: energies (descending) and vectors (columns).

    ``pair_weight[n_g, d/2]`` (optional) scales each pair's energy (``W^1/2 E W^1/2``) so that the
    components chosen are those whose loss of RoPE costs most, not merely the most energetic.
    """
    energy = pair_energy(key_gram, n_groups, head_dim, freqs)
    if pair_weight is not None:
        w = pair_weight[:, freqs].reshape(-1).sqrt()
        energy = w[:, None] * energy * w[None, :]
    return eigh_descending(energy)


def embed_component(u: torch.Tensor, n_groups: int, head_dim: int, freqs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-space columns ``(re, im)`` of a pair-space component ``u`` over block ``freqs``."""
    half = head_dim // 2
    re = torch.zeros(n_groups * head_dim, dtype=u.dtype, device=u.device)
    im = torch.zeros_like(re)
    idx = torch.tensor([g * head_dim + i for g in range(n_groups) for i in freqs], device=u.device)
    re[idx] = u
    im[idx + half] = u
    return re, im


def rope_basis(
    key_gram: torch.Tensor, n_groups: int, head_dim: int, rope_dim: int, freqfold: int, pair_weight: torch.Tensor | None = None
) -> RopeBasis:
    """Choose the RoPE subspace by FreqFold PCA of ``key_gram`` (``[n_g*d, n_g*d]`` key second moment).

    Blocks are ``freqfold`` adjacent frequencies; slot ``p`` belongs to the block holding frequency
    ``p * collapse``. A block fills its slots with its top components; components are matched to
    slots by their energy-weighted mean frequency, so the higher-frequency component takes the
    higher-frequency slot. With ``freqfold = 1`` and ``rope_dim = head_dim`` this is exact RoRoPE.
    """
    check_geometry(head_dim, rope_dim, freqfold)
    collapse = head_dim // rope_dim
    n_slots = rope_dim // 2
    slots_of_block: dict[int, list[int]] = {}
    for p in range(n_slots):
        slots_of_block.setdefault(p * collapse // freqfold, []).append(p)
    columns: list[torch.Tensor | None] = [None] * rope_dim
    for block, slots in sorted(slots_of_block.items()):
        freqs = list(range(block * freqfold, (block + 1) * freqfold))
        _, vecs = block_components(key_gram, n_groups, head_dim, freqs, pair_weight)
        kept = vecs[:, : len(slots)]
        weight = kept.reshape(n_groups, len(freqs), -1).pow(2).sum(0)  # [freq, component]
        mean_freq = (torch.tensor(freqs, dtype=weight.dtype, device=weight.device)[:, None] * weight).sum(0)
        for p, c in zip(slots, torch.argsort(mean_freq, stable=True).tolist()):
            columns[2 * p], columns[2 * p + 1] = embed_component(kept[:, c], n_groups, head_dim, freqs)
    basis = torch.stack(columns, dim=1)
    energy = float(torch.trace(basis.T @ key_gram @ basis) / torch.trace(key_gram).clamp_min(1e-300))
    return RopeBasis(basis=basis, slot_freq_index=[p * collapse for p in range(n_slots)], energy_kept=energy)
