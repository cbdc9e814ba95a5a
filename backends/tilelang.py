"""The ``tilelang`` backend (Hopper, sm90) — its kernels are not written yet (issue: TileLang backend).

Until they are, this backend reports itself unavailable: ``backend="auto"`` passes over it and an
explicit ``backend="tilelang"`` raises with this reason.
"""

from __future__ import annotations

from typing import Optional

REASON = "the TileLang kernels are not implemented in this version of slagen; use backend='triton'"


def unavailable_reason(device, spec) -> Optional[str]:
    return REASON


def block_map(*args, **kwargs):
    raise RuntimeError(REASON)


forward = backward = block_map
