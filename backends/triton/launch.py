"""Relaunching a compiled Triton kernel without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` binds and specialises every argument at each call (25–45 µs of host
time for the block map's kernels on an H200 host, against ~5 µs for the launch itself; session 17). A caller
that already knows a launch repeats an earlier one — same grid, constexprs, options, argument dtypes and the
integer values and pointer alignments Triton specialises on — names it by a key and launches through
:class:`Relauncher`: the first launch of a key goes through Triton (which compiles or finds the kernel and
returns it), later ones call that compiled kernel's own launcher (``CompiledKernel[grid]``) with the same
argument list. The key is the caller's promise; the per-call plans (slagen.backends.plans: the block map's
and both forwards') derive it from the shapes, strides, dtypes, devices and alignments of their inputs.
Under ``TRITON_INTERPRET=1`` (no compiled kernels) every launch goes through Triton.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Hashable, Tuple

import torch


def _compiled_kernel_type():
    from triton.compiler.compiler import CompiledKernel
    return CompiledKernel


class Relauncher:
    """Launches of the Triton kernel ``fn`` (a ``triton.jit`` function) by key; see the module docstring."""

    def __init__(self, fn):
        self.fn = fn
        self._params = inspect.signature(getattr(fn, "fn", fn)).parameters   # of the Python function it wraps
        self._runners: Dict[Hashable, Tuple[Any, tuple, int]] = {}

    def __call__(self, key: Hashable, grid: Tuple[int, ...], args: tuple, **kwargs) -> None:
        """Launch ``fn[grid](*args, **kwargs)``: positional runtime arguments, keyword constexprs and launch
        options (num_warps, num_stages). ``key`` (hashable; None: never relaunch) must change whenever
        anything Triton specialises on does (see the module docstring); within one process a key always
        means the same grid and kwargs."""
        hit = self._runners.get(key) if key is not None else None
        if hit is not None:
            runner, tail, device = hit
            if torch.cuda.current_device() == device:   # the compiled kernel is loaded on that device
                runner(*args, *tail)
                return
        compiled = self.fn[grid](*args, **kwargs)
        if key is not None and isinstance(compiled, _compiled_kernel_type()):
            if len(self._runners) >= 1024:     # a bound, as for the plans that name the keys
                self._runners.clear()
            runner = compiled[tuple(grid) + (1,) * (3 - len(grid))]
            self._runners[key] = (runner, self._tail(len(args), kwargs), torch.cuda.current_device())

    def _tail(self, n_args: int, kwargs: dict) -> tuple:
        """The values after the positional ones, in the kernel's parameter order: every parameter after them
        is a constexpr given by keyword or left at its default (the compiled launcher takes them all)."""
        tail = []
        for name in list(self._params)[n_args:]:
            default = self._params[name].default
            if name not in kwargs and default is inspect.Parameter.empty:
                raise TypeError(f"{name!r} of {list(self._params)} was not given")
            tail.append(kwargs.get(name, default))
        return tuple(tail)

    def __len__(self) -> int:
        """How many keys relaunch directly (tests)."""
        return len(self._runners)


_BY_KERNEL: Dict[str, Relauncher] = {}


def of(mod, name: str) -> Relauncher:
    """The Relauncher of kernel ``name`` of the generated module ``mod`` (one per kernel and module)."""
    key = f"{mod.__name__}.{name}"
    found = _BY_KERNEL.get(key)
    if found is None:
        found = _BY_KERNEL[key] = Relauncher(getattr(mod, name))
    return found
