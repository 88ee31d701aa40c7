"""How vLLM sizes a GQLA model before building it: one latent KV head on absorb, ``n_g`` heads on gqa.

Why: vLLM decides from the config alone (``ModelConfig.use_mla``, head size, KV heads) whether a model is MLA,
which MLA kernels and block size the platform picks and how much memory one token of cache takes; it keys
that decision on ``model_type`` through ``MODEL_ARCH_CONFIG_CONVERTORS``. A GQLA checkpoint is MLA or GQA
depending on the path it is served on, so its entry asks :func:`serving_path` (the one rule, also used when
the layers are built) and answers accordingly:

=========  ===========  ===================  ==================================================
path       use_mla      head size            KV heads
=========  ===========  ===================  ==================================================
absorb     yes          ``r + d_R``          1 (the latent, shared by every head: MLA's cache)
gqa        no           ``d_nope + d_R``     ``n_g`` (per-group keys; values padded to the key's size)
=========  ===========  ===================  ==================================================
"""

from __future__ import annotations

from typing import Any

from ..serving import resolve_path

_LOGGED: set[tuple[str, str]] = set()


def _device() -> tuple[str, str | None]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name(0)
    return "cpu", None


def serving_path(hf_config: Any) -> str:
    """The decode path vLLM serves ``hf_config`` on (:func:`transgqla.serving.resolve_path`), logged once."""
    cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    device, gpu = _device()
    path, why = resolve_path(cfg, device, gpu)
    if (path, why) not in _LOGGED:
        from vllm.logger import init_logger

        init_logger("vllm.transgqla").info("transgqla: GQLA checkpoint served on the %s path (%s)", path, why)
        _LOGGED.add((path, why))
    return path


def register_arch() -> None:
    from vllm.transformers_utils.model_arch_config_convertor import (
        MODEL_ARCH_CONFIG_CONVERTORS,
        ModelArchConfigConvertorBase,
    )

    class GQLAArchConfigConvertor(ModelArchConfigConvertorBase):
        def is_deepseek_mla(self) -> bool:
            return serving_path(self.hf_text_config) == "absorb"

        def get_head_size(self) -> int:
            cfg = self.hf_text_config
            if self.is_deepseek_mla():
                return cfg.kv_lora_rank + cfg.qk_rope_head_dim
            return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim

    MODEL_ARCH_CONFIG_CONVERTORS["gqla"] = GQLAArchConfigConvertor
