"""Kernel launches that skip Triton's per-call argument binding once a specialisation is compiled.

``fn[grid](*args, **kwargs)`` (JITFunction.run) binds the arguments, computes their specialisation and the
cache key, and looks the compiled kernel up on every call: ~40–60 µs of host time per launch on the H200 box
(tools/host_overhead.py), which bounds eager calls at ≤ 32k tokens (about ten launches per SLA forward).
``fast(fn)[grid](*args, **kwargs)`` does the same launch: its first call of a specialisation goes through
``fn[grid]`` (compiling if needed) and keeps the CompiledKernel it returns; later calls with the same key
launch that kernel through Triton's own launcher (``CompiledKernel[grid]``), skipping the binding.

The key is at least as fine as Triton's specialisation (triton.runtime.jit's ``specialize_impl``): per
parameter, a tensor's dtype and 16-byte alignment, an int's width class, ``== 1`` and ``% 16 == 0``, a
constexpr's value (and any other argument's type and value); the launch options (num_warps, ...) and the
current device. Only a kernel Triton compiled for exactly such arguments is relaunched.

The plain path runs instead under Triton's interpreter (TRITON_INTERPRET=1: no compiled kernels), for a
Triton without ``CompiledKernel[grid]`` and with SLAGEN_TRITON_LAUNCH=jit (an opt-out, e.g. to compare).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Dict, Tuple

import torch

LAUNCH_ENV = "SLAGEN_TRITON_LAUNCH"
_I32, _I64 = (-(2 ** 31), 2 ** 31), (-(2 ** 63), 2 ** 63)
_MISSING = object()


def _arg_key(value: Any, constexpr: bool):
    """The part of the specialisation key one argument decides (see the module docstring)."""
    if constexpr:
        return ("c", value)
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None:
        return ("v", value)
    if isinstance(value, int):
        width = 32 if _I32[0] <= value < _I32[1] else 64 if _I64[0] <= value < _I64[1] else 65
        return (width, value == 1, value % 16 == 0)
    if isinstance(value, float):
        return float
    return (type(value), value)


class FastKernel:
    """A Triton JITFunction launched as ``kernel[grid](*args, **kwargs)``, with the relaunch described in the
    module docstring. ``compiled`` maps keys to the CompiledKernels kept so far."""

    def __init__(self, fn):
        self.fn, self.name = fn, fn.__name__
        params = fn.params
        self._names = [p.name for p in params]
        self._constexpr = [p.is_constexpr for p in params]
        self._defaults = [p.default for p in params]   # inspect.Parameter.empty where there is none
        self._index = {name: i for i, name in enumerate(self._names)}
        self.compiled: Dict[tuple, Any] = {}

    def __getitem__(self, grid) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _bind(self, args: tuple, kwargs: dict) -> Tuple[list, tuple]:
        """(every parameter's value in signature order, the launch options as a sorted tuple)."""
        values = list(args) + [_MISSING] * (len(self._names) - len(args))
        options = []
        for name, value in kwargs.items():
            i = self._index.get(name)
            if i is None:
                options.append((name, value))
            else:
                values[i] = value
        for i, value in enumerate(values):
            if value is _MISSING:
                default = self._defaults[i]
                if default is inspect.Parameter.empty:
                    raise TypeError(f"{self.name}: missing argument {self._names[i]!r}")
                values[i] = default
        return values, tuple(sorted(options))

    def launch(self, grid, args: tuple, kwargs: dict) -> None:
        values, options = self._bind(args, kwargs)
        key = (torch.cuda.current_device(), options,
               tuple(_arg_key(v, c) for v, c in zip(values, self._constexpr)))
        compiled = self.compiled.get(key)
        if compiled is not None:
            grid = tuple(grid) + (1,) * (3 - len(grid))
            compiled[grid](*values)
            return
        compiled = self.fn[grid](*args, **kwargs)
        if hasattr(compiled, "__getitem__") and hasattr(compiled, "run"):
            self.compiled[key] = compiled


_FAST: Dict[int, Any] = {}


def enabled() -> bool:
    """Whether launches may skip the binding: compiled Triton kernels (not the interpreter), not opted out."""
    if os.environ.get(LAUNCH_ENV, "fast") == "jit" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    from triton.compiler.compiler import CompiledKernel
    return hasattr(CompiledKernel, "__getitem__")


def fast(fn):
    """``fn`` as :class:`FastKernel` (one per JITFunction), or ``fn`` itself where :func:`enabled` is False
    or ``fn`` is not a JITFunction (the interpreter's kernels)."""
    from triton.runtime.jit import JITFunction
    if not isinstance(fn, JITFunction) or not enabled():
        return fn
    kernel = _FAST.get(id(fn))
    if kernel is None or kernel.fn is not fn:
        kernel = _FAST[id(fn)] = FastKernel(fn)
    return kernel
