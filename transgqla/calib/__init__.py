"""Calibration on text: token windows, a layer-by-layer pass over the source, per-layer statistics."""
