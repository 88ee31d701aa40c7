"""Hugging Face remote code for GQLA checkpoints.

``configuration_gqla.py`` and ``modeling_gqla.py`` are copied, as they are, next to the weights of
every converted checkpoint, and ``config.json``'s ``auto_map`` points at them, so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads the checkpoint without transgqla installed. They import only torch and transformers (and each
other); nothing in this package may import transgqla. This ``__init__`` exists so that the two
files ship with the wheel and can be located with ``importlib.resources``; it is not copied.
"""
