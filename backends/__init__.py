"""Backends of slagen (installed as ``slagen.backends``).

Each backend module exposes the same four functions, all on logical (B, H, L, D) tensors with any
strides that keep D contiguous:

  unavailable_reason(device, spec) -> str | None   why it cannot serve ``spec`` on ``device`` (None: it can)
  block_map(q, k, n_crit, n_negl, block_q, block_k, columns=True) -> the 9 BlockMap tensors
      (slagen.blockmap.LUT_FIELDS; with columns=False the column tables are zero-size stand-ins, for a call
      that will not be differentiated: slagen.blockmap.no_columns; the kernel backends also take
      ``pooled``: the ``pooled`` of the same backend's ``early_terms`` object, opaque to the caller)
  forward(q, k, v, maps, proj_weight, proj_bias, save, **cfg) -> (o, lse, o_lin, den)
      (the kernel backends also take ``maps_ready``: a CUDA event the maps' producer recorded on another
      stream; they wait for it after launching their linear pre-pass, which does not read the maps;
      the backends named in KEEPS_LINEAR_SUMS also take ``states=True`` and then return (o, lse, o_lin, den,
      h_lin, z_lin))
  early_terms(q, k, v, **flags) -> an object with ``pooled`` or None (optional; the TileLang backend): the
      linear pre-pass of an eager call run before its block map, pooling q and k for it; the call passes
      ``pooled`` to block_map and the object to forward as ``early`` (the map built from that ``pooled``)
  backward(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, **cfg) -> (dq, dk, dv, dw, db)
      (those backends also take ``lin_sums=(h_lin, z_lin)``: the backward then does not form them again; given
      as a list ``[h_lin, z_lin]``, the caller's last reference, the backward empties the list as soon as no
      kernel reads them any more (after dQ, before the dK/dV stage), so they are freed before its peak)

where cfg = block_q, block_k, scale, feature_map ('none' for sparse-only), scope, eps, and
  o      like q (same shape, dtype and stride order): O = O^s + Proj(O^l)
  lse    float32 (B, H, Lq): natural-log LSE of the sparse branch (-inf for a row with no critical block)
  o_lin  (B, H, Lq, D) in q's dtype: O^l before Proj; den float32 (B, H, Lq): φ(Q_i)Z_i + eps.
         Both are written only when ``save`` is true, there is a linear branch and the forward does not keep
         h_lin / z_lin (below); otherwise they are empty (0 elements) tensors.
  h_lin  (B, H, T_m, D, D) in q's dtype: H_i = Σ_{j marginal} h_j of every query block (before Proj), and
  z_lin  (B, H, T_m, D) float32: Z_i — the sums the forward's linear epilogue read, kept for the backward's
         dφ(Q) (100 MB at the headline shape instead of a key-state pass and a GEMM there), and for its den
         and O^l = φ(Q_i)H_i / den, formed again there instead of saved (96 MiB less at the f+b peak); only
         with ``save``, a linear branch and scope 'marginal' (:func:`keeps_linear_sums`), else empty.
  dw, db grads of proj_weight (D, D) / proj_bias (D,) in their dtypes; empty float32 tensors (distinct
         objects: op outputs may not alias) when those are None.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional, Sequence

NAMES = ("torch", "triton", "tilelang")
_MODULES = {"torch": "slagen.backends.reference", "triton": "slagen.backends.triton",
            "tilelang": "slagen.backends.tilelang"}


KEEPS_LINEAR_SUMS = ("tilelang",)


def keeps_linear_sums(name: str, save: bool, feature_map: str, scope: str) -> bool:
    """Whether backend ``name``'s forward with these arguments returns non-empty h_lin / z_lin (see above)."""
    return name in KEEPS_LINEAR_SUMS and bool(save) and feature_map not in (None, "none") and scope == "marginal"


def get(name: str) -> ModuleType:
    """The backend module called ``name`` (one of NAMES)."""
    if name not in _MODULES:
        raise ValueError(f"backend={name!r} is not known; allowed: auto, {', '.join(NAMES)}")
    return importlib.import_module(_MODULES[name])


def check_forward_inputs(q, k, v, maps: Sequence, proj_weight: Optional[object], proj_bias: Optional[object]) -> None:
    """The contract-level checks every kernel backend's forward makes (shapes, dtypes, the 9 map tensors,
    Proj shapes); each backend adds what only it needs (devices, strides, head dims)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (B, H, Lq, D) and k, v (B, H, Lk, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and D")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-2] < 1 or k.shape[-2] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Lq={q.shape[-2]}, Lk={k.shape[-2]}")
    if len(maps) != 9:
        raise ValueError(f"maps must be the 9 BlockMap tensors (slagen.blockmap.LUT_FIELDS), got {len(maps)}")
    d = q.shape[-1]
    for name, t, shape in (("proj_weight", proj_weight, (d, d)), ("proj_bias", proj_bias, (d,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def call_spec(q, dtypes: dict, backend: str, **fields):
    """The KernelSpec of a call: head_dim and dtype from q (``dtypes`` maps the torch dtypes a backend
    serves to spec names), the rest from ``fields`` (arch, block sizes, feature_map, scope, role, ...),
    validated by KernelSpec itself."""
    from slagen.spec import KernelSpec
    if q.dtype not in dtypes:
        allowed = ", ".join(str(t).replace("torch.", "") for t in dtypes)
        raise ValueError(f"q.dtype={q.dtype} is not supported by the {backend} kernels; allowed: {allowed}")
    return KernelSpec.of(head_dim=q.shape[-1], dtype=dtypes[q.dtype], **fields)


_SIDE_STREAMS: dict = {}


def side_stream(device, role: str):
    """The CUDA stream of ``device`` kept for ``role`` (one per role and device, made at first use: a stream is
    cheap to keep and costly to make per call); roles keep independent work off each other's stream."""
    stream = _SIDE_STREAMS.get((device, role))
    if stream is None:
        import torch
        stream = _SIDE_STREAMS[(device, role)] = torch.cuda.Stream(device=device)
    return stream


def wait_for_maps(maps_ready, device) -> None:
    """Make the current stream wait for ``maps_ready`` (a torch.cuda.Event, or None: nothing to wait for)
    before its next launch reads the block map."""
    if maps_ready is not None:
        import torch
        torch.cuda.current_stream(device).wait_event(maps_ready)
