"""Plain-torch reference decoders: GQLA with both decoding paths (and their caches)."""
