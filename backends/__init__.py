"""Backends of slagen (installed as ``slagen.backends``).

Each backend module exposes the same four functions, all on logical (B, H, L, D) tensors with any
strides that keep D contiguous:

  unavailable_reason(device, spec) -> str | None   why it cannot serve ``spec`` on ``device`` (None: it can)
  block_map(q, k, n_crit, n_negl, block_q, block_k) -> the 9 BlockMap tensors (slagen.blockmap.LUT_FIELDS)
  forward(q, k, v, maps, proj_weight, proj_bias, save, **cfg) -> (o, lse, o_lin, den)
  backward(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, **cfg) -> (dq, dk, dv, dw, db)

where cfg = block_q, block_k, scale, feature_map ('none' for sparse-only), scope, eps, and
  o      like q (same shape, dtype and stride order): O = O^s + Proj(O^l)
  lse    float32 (B, H, Lq): natural-log LSE of the sparse branch (-inf for a row with no critical block)
  o_lin  (B, H, Lq, D) in q's dtype: O^l before Proj; den float32 (B, H, Lq): φ(Q_i)Z_i + eps.
         Both are written only when ``save`` is true and there is a linear branch; otherwise they are
         empty (0 elements) tensors.
  dw, db grads of proj_weight (D, D) / proj_bias (D,) in their dtypes; empty float32 tensors (distinct
         objects: op outputs may not alias) when those are None.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("torch", "triton", "tilelang")
_MODULES = {"torch": "slagen.backends.reference", "triton": "slagen.backends.triton",
            "tilelang": "slagen.backends.tilelang"}


def get(name: str) -> ModuleType:
    """The backend module called ``name`` (one of NAMES)."""
    if name not in _MODULES:
        raise ValueError(f"backend={name!r} is not known; allowed: auto, {', '.join(NAMES)}")
    return importlib.import_module(_MODULES[name])
