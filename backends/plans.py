"""Per-call plans: what a kernel call's argument layouts and flags decide, resolved once per process.

An eager call's checks, spec, config, grids and compiled kernels depend only on the layouts of its tensors
(shape, strides, dtype, device, 16-byte alignment) and its flags, never on their values. A backend builds a
plan for the first call of a key and reuses it for every later call of the same key (session 17: this halved
the host time of an eager SLA forward). Keys hold no tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Generic, Optional, TypeVar

import torch

P = TypeVar("P")   # a Plan, or any other value a call's key decides (a resolved config)
TUNED = "tuned"   # a kernel's config argument meaning: the tuned config of this GPU and shape, else its default


def config_key(config) -> Optional[tuple]:
    """A plan key's part for a config: :data:`TUNED` per generation of slagen.autotune.select's memo (a plan
    built before a ``slagen tune`` is not reused after it), a dict by its items, None for the defaults."""
    if config is TUNED:
        from slagen.autotune import select
        return TUNED, select.generation()
    return None if config is None else tuple(sorted(config.items()))


def layout(x: Optional[torch.Tensor]) -> Optional[tuple]:
    """What a plan's checks and launches see of a tensor: shape, strides, dtype, device, 16-byte alignment."""
    if x is None:
        return None
    return tuple(x.shape), x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """A plan's key (None for arguments that cannot form one); backends add what their calls decide."""
    key: Optional[tuple]

    def launch_key(self, name: str) -> Optional[tuple]:
        """The slagen.backends.triton.launch.Relauncher key of launch ``name`` (None for a plan without a key:
        never relaunched)."""
        return None if self.key is None else (self.key, name)


class Plans(Generic[P]):
    """Plans (or other per-key values) by key, at most ``bound`` of them (all dropped when full: a bound real use
    never reaches, a few layouts per model)."""

    def __init__(self, bound: int = 256):
        self.bound = bound
        self._plans: Dict[tuple, P] = {}

    def get(self, key_of: Callable[[], tuple], build: Callable[[Optional[tuple]], P]) -> P:
        """The plan of ``key_of()``, built by ``build(key)`` on its first call. Arguments that cannot form a key
        (malformed ones: ``key_of`` raises TypeError, IndexError or AttributeError) are built with key None and
        not kept, so the build's checks name the problem at every call."""
        try:
            key = key_of()
            found = self._plans.get(key)
        except (TypeError, IndexError, AttributeError):
            key = found = None
        if found is not None:
            return found
        plan = build(key)
        if key is not None:
            if len(self._plans) >= self.bound:
                self._plans.clear()
            self._plans[key] = plan
        return plan
