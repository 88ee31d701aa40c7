"""Per-layer attention conversion, data-free or calibrated; the writer asks for layers in order.

Both converters are callables ``layer -> ConvertedAttention``. The calibrated one owns the
layer-by-layer calibration pass, so asking for layer ``l`` first pushes the calibration hidden
states through layers ``< l``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .calib.methods import LayerContext, convert_layer
from .calib.refine import refine_layer
from .calib.runner import LayerwiseCalibration
from .io import SafetensorsCheckpoint
from .mathx.gqla_layer import ConvertedAttention, LayerSettings, SourceAttention, convert_attention
from .mathx.moments import InputMoment
from .mathx.rope import inv_freq
from .settings import ConversionSettings
from .source_checkpoint import read_attention
from .source_geometry import SourceGeometry


def layer_settings(s: ConversionSettings) -> LayerSettings:
    return LayerSettings(s.kv_lora_rank, s.qk_rope_head_dim, s.freqfold, s.balance_kv)


class DataFreeConverter:
    """Statistics from the weights alone (``--calib none``): input moment ``diag(gamma^2)``, and
    float32 arithmetic (``LayerSettings.work_dtype`` says why), on ``device``."""

    def __init__(self, ckpt: SafetensorsCheckpoint, geo: SourceGeometry, settings: ConversionSettings,
                 device: str = "cpu"):
        self.ckpt, self.geo, self.device = ckpt, geo, torch.device(device)
        self.settings = replace(layer_settings(settings), work_dtype=torch.float32)

    def __call__(self, layer: int) -> ConvertedAttention:
        src = _on_device(read_attention(self.ckpt, self.geo, layer, self.settings.work_dtype), self.device)
        gamma = self.ckpt.read(self.geo.family.norm(layer)).to(self.device) + self.geo.block.norm_offset  # 1 + w (Gemma2)
        moment = InputMoment.data_free(gamma)
        return convert_attention(src, moment, self.settings)


class CalibratedConverter:
    """Statistics from calibration text, gathered layer by layer from the streaming source.

    The calibration pass and the per-layer method math (calib/methods.py, named in its ``LayerContext``)
    both run on ``device``: every tensor the math is handed (projections, ``W_O``, statistics) is moved
    there first, and the methods create their own tensors on the device of their inputs
    (tests/test_device.py runs the whole calibrated path on a fake device to prove it).
    """

    def __init__(self, ckpt, geo: SourceGeometry, settings: ConversionSettings, source_config: dict,
                 windows, *, sequential: bool, device: str = "cpu", sample_windows: int = 2):
        self.ckpt, self.geo, self.settings = ckpt, geo, settings
        self.layer_settings = layer_settings(settings)
        self.runner = LayerwiseCalibration(ckpt, source_config, windows, sample_windows=sample_windows,
                                           sequential=sequential, device=device)
        self.gqla_config = {
            **source_config,
            "qk_nope_head_dim": geo.head_dim, "qk_rope_head_dim": settings.qk_rope_head_dim,
            "v_head_dim": geo.head_dim, "kv_lora_rank": settings.kv_lora_rank,
            "gqla": {"family": geo.block.record()},
        }
        self.device = self.math_device = torch.device(device)
        self.freqs = inv_freq(geo.head_dim, geo.rope_base, geo.rope_scaling)

    def __call__(self, layer: int) -> ConvertedAttention:
        while self.runner.next_layer < layer:  # layers with nothing to convert still move the states
            self.runner.advance(self.runner.next_layer)
        dev = self.math_device
        src = _on_device(read_attention(self.ckpt, self.geo, layer), dev)
        calib = self.runner.statistics(layer, attention_weighted=self.settings.method == "gqla").to(dev)
        ctx = LayerContext(
            wo=self.ckpt.read(self.geo.family.tensor(layer, "o")).to(device=dev, dtype=torch.float64),
            freqs=self.freqs.to(dev), window=self.geo.block.window(layer), gqla_config=self.gqla_config, device=dev,
        )
        conv = convert_layer(src, calib, self.layer_settings, self.settings.method, ctx,
                             search_freqfold=self.settings.freqfold_requested == "auto")
        if self.settings.refine:
            conv = refine_layer(self.runner, layer, conv, self.gqla_config, self.settings)
        self.runner.advance(layer, conv.tensors, self.gqla_config)
        return conv


def _on_device(src: SourceAttention, device: torch.device) -> SourceAttention:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return replace(src, wq=move(src.wq), wk=move(src.wk), wv=move(src.wv), bq=move(src.bq), bk=move(src.bk), bv=move(src.bv))
