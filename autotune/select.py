"""Which config a kernel launch uses.

Lookup order: in-process memo → user tuning cache → shared read-only caches (``$SLAGEN_CACHE_PATH``)
→ the backend's built-in per-arch default (``None`` here: the caller uses its default). With
``SLAGEN_AUTOTUNE=1`` a spec with no usable record is tuned on first use (and the result stored);
otherwise slagen never tunes inside a user's forward pass.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from slagen.autotune import cache, records
from slagen.spec import KernelSpec

log = logging.getLogger("slagen")
_MEMO: Dict[Tuple, Optional[dict]] = {}
_GENERATION = [0]   # how many times the memo was dropped: per-call plans that hold a config key on it


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def config_for(spec: KernelSpec, backend: str, device: torch.device, seq_len: int, density: float,
               check: Optional[Callable[[dict, KernelSpec], object]] = None) -> Optional[dict]:
    """The tuned config of ``spec`` for this GPU and shape bucket, or None (use the default).

    ``check`` (the backend's check_config) vets a stored config first: one the kernel no longer accepts
    (written by another version of its template) is reported once and not used.
    """
    if device.type != "cuda":
        return None
    key = (spec, backend, device.index, records.shape_bucket(seq_len, density))
    if key in _MEMO:
        return _MEMO[key]
    gpu, bucket = gpu_name(device), key[-1]
    found = cache.lookup(spec.canonical, backend, gpu, spec.arch, bucket)
    config = found[0]["config"] if found else None
    if config is not None and check is not None:
        try:
            check(config, spec)
        except (ValueError, KeyError, TypeError) as err:
            log.warning("slagen: ignoring the tuned config of %s from the %s cache: %s", spec.canonical,
                        found[1], err)
            config = found = None
    if found:
        log.debug("slagen: %s on %s [%s]: tuned config from the %s cache", spec.canonical, gpu, bucket, found[1])
    elif os.environ.get("SLAGEN_AUTOTUNE") == "1":
        from slagen.autotune import problems
        log.warning("slagen: SLAGEN_AUTOTUNE=1: tuning %s for %s [%s] now", spec.canonical, gpu, bucket)
        config = problems.tune_and_store(spec, backend, device, seq_len=seq_len, density=density).best
    _MEMO[key] = config
    return config


def forget() -> None:
    """Drop the in-process memo (after tuning or importing records)."""
    _MEMO.clear()
    _GENERATION[0] += 1


def generation() -> int:
    """Changes whenever :func:`forget` runs: a memo of resolved configs is stale once this differs."""
    return _GENERATION[0]
