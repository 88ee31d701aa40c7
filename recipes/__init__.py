"""Named conversion settings (TOML files), installed as the data package ``transgqla.recipes``."""
