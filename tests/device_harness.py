"""A fake second device for CPU-only CI: it catches the device mistakes a GPU run would crash on.

Tensors "on the device" are wrappers that report ``device == meta`` (so code that asks
``x.device`` and creates tensors there does the right thing) but hold real CPU values (so the
whole computation runs and its results can be compared with a plain CPU run). Under
:class:`FakeDevice` every torch op is checked with CUDA's rules: a non-scalar tensor made on the
CPU meeting device data raises :class:`DeviceMismatch` (CUDA: "Expected all tensors to be on the same
device"); ``copy_``/``to`` between devices, CPU index tensors and CPU 0-dim scalars are allowed, as on
CUDA; ``.numpy()`` of device data fails, as on CUDA.

The mode is thread-local (torch dispatch modes are): run conversions with
``TRANSGQLA_LAYER_WORKERS=0`` so that the layer math runs on the thread that holds it.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")
CROSS_DEVICE_OPS = {"aten::copy_", "aten::_to_copy", "aten::lift_fresh", "aten::detach"}
INDEX_OPS = {"aten::index.Tensor", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}


class DeviceMismatch(AssertionError):
    """A CPU-made tensor met device data: the op that would fail on a GPU."""


class OnDevice(torch.Tensor):
    """A CPU tensor that says it lives on the fake device."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=FAKE, requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    def tolist(self):  # CUDA tensors have it; wrapper subclasses do not
        return self.inner.tolist()

    def __repr__(self) -> str:
        return f"OnDevice({self.inner!r})"


def _is_plain(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, OnDevice)


def _check(func, args, kwargs) -> None:
    name = func._schema.name if func._schema.overload_name == "" else f"{func._schema.name}.{func._schema.overload_name}"
    if func._schema.name in CROSS_DEVICE_OPS:
        return
    if name in INDEX_OPS or func._schema.name in INDEX_OPS:
        args = (args[0],) + tuple(args[2:])  # CPU index tensors may index device data
    for t in tree_flatten((args, kwargs))[0]:
        if _is_plain(t) and t.dim() > 0:
            raise DeviceMismatch(f"{func}: a {t.device} tensor of shape {tuple(t.shape)} meets device data")


def _adopt(t):
    """A real meta tensor made where the mode could not see it (``torch.tensor([], device=...)`` builds
    in C++): empty ones carry no data and join the device; others cannot be emulated."""
    if _is_plain(t) and t.device == FAKE:
        if t.numel():
            raise RuntimeError(f"a meta tensor of shape {tuple(t.shape)} was made outside the harness")
        return OnDevice(torch.empty(t.shape, dtype=t.dtype))
    return t


def _dispatch(func, args, kwargs):
    args, kwargs = tree_map(_adopt, (args, kwargs))
    on_device = any(isinstance(t, OnDevice) for t in tree_flatten((args, kwargs))[0])
    if on_device:
        _check(func, args, kwargs)
    wrap = on_device
    if kwargs.get("device") is not None:
        wrap = torch.device(kwargs["device"]) == FAKE
        kwargs = {**kwargs, "device": torch.device("cpu")}
    inner_args, inner_kwargs = tree_map(lambda t: t.inner if isinstance(t, OnDevice) else t, (args, kwargs))
    out = func(*inner_args, **inner_kwargs)
    if not wrap:
        return out
    if args and isinstance(args[0], OnDevice) and out is args[0].inner:  # in-place ops return self
        return args[0]
    return tree_map(lambda t: OnDevice(t) if _is_plain(t) else t, out)


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class _DataFactories(TorchFunctionMode):
    """``torch.tensor(data, device=...)`` copies its data in C++, out of a dispatch mode's sight:
    make it on the CPU, then move it (which the dispatch mode sees)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]) == FAKE:
            return func(*args, **{**kwargs, "device": "cpu"}).to(FAKE)
        return func(*args, **kwargs)


class FakeDevice:
    """Within this context, ``device="meta"`` is a working second device with CUDA's mixing rules."""

    def __enter__(self):
        self._modes = [_DataFactories(), _Dispatch()]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False
