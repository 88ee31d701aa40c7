"""vLLM plugin: ``vllm serve OUT/`` and ``LLM(model=OUT)`` serve a GQLA checkpoint itself, on either path.

Why a plugin: the exports pin one path each (DeepSeek-V3 for absorb, MiMo-V2 for gqa); a GQLA checkpoint holds
both, and the runtime should pick. vLLM loads out-of-tree architectures through the ``vllm.general_plugins``
entry point (``pyproject.toml``); :func:`register` is that entry point. It runs in every vLLM process, so it
only registers names (imports stay lazy):

* the ``gqla`` config (``configuration_gqla.GQLAConfig``, the remote code convert ships) with transformers'
  ``AutoConfig``, so no ``trust_remote_code`` is needed;
* vLLM's model-architecture description for ``model_type: gqla`` (:mod:`.arch`): on the absorb path vLLM must
  treat the model as MLA (one latent KV head of ``r + d_R``), on the gqa path as GQA (``n_g`` heads of
  ``d_nope + d_R``), before any layer is built;
* the architecture ``GQLAForCausalLM`` (:mod:`.model`).

The path: :func:`transgqla.serving.resolve_path` (``hf_overrides={"gqla_decode_path": ...}``, else
``config.gqla.decode_path``; ``auto`` by device).
"""

from __future__ import annotations

ARCHITECTURE = "GQLAForCausalLM"
_DONE = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent)."""
    global _DONE
    if _DONE:
        return
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..hf_remote.configuration_gqla import GQLAConfig
    from .arch import register_arch

    try:
        AutoConfig.register("gqla", GQLAConfig, exist_ok=True)
    except TypeError:  # transformers without exist_ok
        AutoConfig.register("gqla", GQLAConfig)
    register_arch()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "transgqla.vllm_plugin.model:GQLAForCausalLM")
    _DONE = True
