"""verify reads checkpoints through the one layer-by-layer runner, :mod:`transgqla.model.layerwise`."""

from ..model.layerwise import HEAD_CHUNK_BYTES, LayerwiseModel

__all__ = ["HEAD_CHUNK_BYTES", "LayerwiseModel"]
