"""The public functional API: ``slagen.attention`` and ``slagen.block_map``.

Inputs are (B, H, L, D) (``layout="bhld"``) or (B, L, H, D) (``layout="blhd"``, the diffusers/Wan
layout) with any strides that keep D contiguous; no copies are made. Everything is validated here, before
any kernel runs, with errors that name the argument and what is allowed.
"""

from __future__ import annotations

import numbers
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from slagen import backends, ops
from slagen.blockmap import BlockMap
from slagen.dispatch import resolve, spec_for
from slagen.reference import EPS, block_counts, num_blocks
from slagen.spec import BLOCK_SIZES, parse_feature_map, parse_scope

LAYOUTS = ("bhld", "blhd")
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _to_bhld(x: Tensor, name: str, layout: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D ({'B, H, L, D' if layout == 'bhld' else 'B, L, H, D'} for "
                         f"layout={layout!r}), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; allowed: bfloat16, float16, float32, "
                        f"float64 (float64: backend='torch' only)")
    if x.shape[-1] > 0 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride on the head dimension D (got strides "
                         f"{tuple(x.stride())}); call .contiguous() on it")
    return x if layout == "bhld" else x.transpose(1, 2)


def _check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)


def _check_ratios(topk, negligible) -> Tuple[float, float]:
    topk, negligible = _check_ratio("topk", topk), _check_ratio("negligible", negligible)
    if topk + negligible > 1.0:
        raise ValueError(f"topk + negligible = {topk + negligible} must be <= 1")
    return topk, negligible


def _check_block(name: str, value) -> int:
    if isinstance(value, bool) or value not in BLOCK_SIZES:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(str, BLOCK_SIZES))}")
    return int(value)


def _check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; allowed: {', '.join(LAYOUTS)}")
    return layout


def _check_qk(q: Tensor, k: Tensor) -> None:
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got q on {q.device} and k on {k.device}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have one dtype, got q {q.dtype} and k {k.dtype}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (B, H, Lq, D) = {tuple(q.shape)} and k (B, H, Lk, D) = {tuple(k.shape)} must "
                         f"agree on B, H and D")
    if q.shape[-2] < 1 or k.shape[-2] < 1 or q.shape[-1] < 1:
        raise ValueError(f"sequence lengths and head dim must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")


_RESOLVED: Dict[tuple, str] = {}


def _resolve_backend(backend, q: Tensor, **fields) -> str:
    """The backend that serves a call (slagen.dispatch.resolve), memoised per process for each backend
    request, device, dtype, head dim, spec fields and TRITON_INTERPRET setting (only choices that succeed
    are kept: a call that cannot be served raises every time)."""
    if not isinstance(backend, str):
        raise ValueError(f"backend={backend!r} must be a string: auto, torch, triton or tilelang")
    key = (backend, q.device, q.dtype, q.shape[-1], tuple(sorted(fields.items())), os.environ.get("TRITON_INTERPRET"))
    name = _RESOLVED.get(key)
    if name is None:
        spec, why = spec_for(q.device, q.dtype, head_dim=q.shape[-1], **fields)
        name = _RESOLVED[key] = resolve(backend, q.device, spec, why)
    # (not while torch.compile traces: Dynamo cannot trace the check, and traced calls take the operator path)
    if name != "torch" and not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(q):
        raise ValueError(f"backend={backend!r} (served by {name!r}) cannot run under torch.func transforms (grad, "
                         "vmap, jacrev, ...): its kernels cannot read functorch's wrapped tensors; use "
                         "backend='torch' there, or torch.autograd")
    return name


def _block_map_bhld(q: Tensor, k: Tensor, topk: float, negligible: float, block_q: int, block_k: int,
                    backend: str, columns: bool = True, pooled=None) -> BlockMap:
    tensors = ops.block_map(q, k, topk, negligible, block_q, block_k, backend, columns, pooled)
    return BlockMap(*tensors, block_q=block_q, block_k=block_k)


OVERLAP_ENV = "SLAGEN_OVERLAP_BLOCK_MAP"


def _overlaps_block_map(backend: str, feature_map: Optional[str], *tensors) -> bool:
    """Whether ``attention`` computes its block map on a side stream, beside the forward's linear pre-pass
    (which does not read it): opted in with SLAGEN_OVERLAP_BLOCK_MAP=1 (experimental; H200, session 7: within
    noise of the serial order), on CUDA, for an eager call on plain tensors, a kernel backend and a linear
    branch."""
    return (os.environ.get(OVERLAP_ENV) == "1" and tensors[0].is_cuda and feature_map is not None
            and backend in ("triton", "tilelang") and ops.direct(*tensors))


def _block_map_beside(q: Tensor, k: Tensor, topk: float, negligible: float, block_q: int, block_k: int,
                      backend: str, columns: bool = True) -> Tuple[BlockMap, "torch.cuda.Event"]:
    """The block map computed on a side stream that first waits for the current one: (the BlockMap, the
    event the forward waits for before it reads the map). Its tensors are marked as used by the current
    stream, so the allocator does not hand them out again while the forward still reads them."""
    cur = torch.cuda.current_stream(q.device)
    side = backends.side_stream(q.device, "block_map")
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        bmap = _block_map_bhld(q, k, topk, negligible, block_q, block_k, backend, columns)
        ready = torch.cuda.Event()
        ready.record(side)
    for t in bmap.tensors():
        t.record_stream(cur)
    return bmap, ready


def _early_terms(name: str, q: Tensor, k: Tensor, v: Tensor, topk: float, negligible: float, block_q: int,
                 block_k: int, feature_map: Optional[str], scope: str, has_negligible: bool, *others):
    """The backend's linear pre-pass run before the block map so that it pools q and k for it
    (slagen.backends.tilelang.early_terms), for an eager call on plain tensors; None where the backend has
    none or it does not apply (the block map then pools, and the forward runs its pre-pass)."""
    if feature_map is None or not ops.direct(q, k, v, *others):
        return None
    early = getattr(backends.get(name), "early_terms", None)
    if early is None:
        return None
    t_n = num_blocks(k.shape[2], block_k)
    n_crit, _ = block_counts(t_n, topk, negligible)
    return early(q.detach(), k.detach(), v.detach(), block_q=block_q, block_k=block_k, feature_map=feature_map,
                 scope=scope, has_negligible=has_negligible, density=n_crit / t_n)


def block_map(q: Tensor, k: Tensor, *, topk: float = 0.05, negligible: float = 0.0, block_q: int = 64,
              block_k: int = 64, layout: str = "bhld", backend: str = "auto") -> BlockMap:
    """Classify every (query block, key block) pair as critical / marginal / negligible (SLA.md §1).

    q: (B, H, Lq, D), k: (B, H, Lk, D) in ``layout``. Per query block the ``clamp(floor(topk * T_n), 1,
    T_n)`` best key blocks are critical and the ``min(floor(negligible * T_n), T_n - n_crit)`` worst are
    negligible. Returns a BlockMap (mask, row/column lookup tables, counts, density). Not differentiable.
    """
    layout = _check_layout(layout)
    qb, kb = _to_bhld(q, "q", layout), _to_bhld(k, "k", layout)
    _check_qk(qb, kb)
    topk, negligible = _check_ratios(topk, negligible)
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    name = _resolve_backend(backend, qb, block_q=block_q, block_k=block_k, role="block_map",
                            has_negligible=negligible > 0)
    return _block_map_bhld(qb.detach(), kb.detach(), topk, negligible, block_q, block_k, name)


def _check_block_map(bmap, q: Tensor, k: Tensor, block_q: int, block_k: int) -> None:
    if not isinstance(bmap, BlockMap):
        raise TypeError(f"block_map must be a slagen.BlockMap (from slagen.block_map or BlockMap.from_mask), "
                        f"got {type(bmap).__name__}")
    want = (q.shape[0], q.shape[1], num_blocks(q.shape[-2], block_q), num_blocks(k.shape[-2], block_k))
    if (bmap.block_q, bmap.block_k) != (block_q, block_k) or tuple(bmap.mask.shape) != want:
        raise ValueError(f"block_map was built for blocks {bmap.block_q}x{bmap.block_k} and mask shape "
                         f"{tuple(bmap.mask.shape)}; this call needs {block_q}x{block_k} and {want}")
    if bmap.mask.device != q.device:
        raise ValueError(f"block_map is on {bmap.mask.device} but q is on {q.device}")


def _check_proj(proj_weight, proj_bias, d: int, device, feature_map) -> None:
    for name, t, shape in (("proj_weight", proj_weight, (d, d)), ("proj_bias", proj_bias, (d,))):
        if t is None:
            continue
        if feature_map is None:
            raise ValueError(f"{name} was given but feature_map=None (sparse-only) has no linear branch")
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (D = {d}), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, topk: float = 0.05, negligible: float = 0.0,
              feature_map: Optional[str] = "softmax", scope: str = "marginal", block_q: int = 64,
              block_k: int = 64, scale: Optional[float] = None, proj_weight: Optional[Tensor] = None,
              proj_bias: Optional[Tensor] = None, layout: str = "bhld", block_map: Optional[BlockMap] = None,
              backend: str = "auto", eps: float = EPS) -> Tensor:
    """Sparse-Linear Attention, O = O^s + Proj(O^l) (SLA.md), differentiable in q, k, v and Proj.

    Args:
      q: (B, H, Lq, D), k and v: (B, H, Lk, D) in ``layout`` ('bhld', or 'blhd' for (B, L, H, D)).
      topk, negligible: fractions of key blocks per query block that are critical / negligible.
      feature_map: 'softmax' | 'elu' | 'relu' | None (None: sparse-only, no linear branch).
      scope: 'marginal' (linear branch over marginal blocks, the paper) | 'all' (every key block).
      block_q, block_k: selection block sizes (rows).
      scale: softmax scale, default 1/sqrt(D).
      proj_weight (D, D), proj_bias (D,): Proj(x) = x W^T + b; None means identity / no bias.
      block_map: a precomputed BlockMap (topk and negligible are then not used).
      backend: 'auto' | 'torch' | 'triton' | 'tilelang'.
    Returns: O with q's shape, layout and dtype.
    """
    layout = _check_layout(layout)
    qb, kb, vb = (_to_bhld(x, n, layout) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    _check_qk(qb, kb)
    if vb.shape != kb.shape or vb.dtype != kb.dtype or vb.device != kb.device:
        raise ValueError(f"v must match k in shape, dtype and device: k {tuple(kb.shape)} {kb.dtype} "
                         f"{kb.device}, v {tuple(vb.shape)} {vb.dtype} {vb.device}")
    feature_map, scope = parse_feature_map(feature_map), parse_scope(scope)
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    d = qb.shape[-1]
    if scale is None:
        scale = d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not float(scale) > 0:
        raise ValueError(f"scale={scale!r} must be a positive number (or None for 1/sqrt(D))")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0:
        raise ValueError(f"eps={eps!r} must be a positive number")
    _check_proj(proj_weight, proj_bias, d, qb.device, feature_map)
    if block_map is None:
        topk, negligible = _check_ratios(topk, negligible)
        has_negligible = negligible > 0
    else:
        _check_block_map(block_map, qb, kb, block_q, block_k)
        has_negligible = block_map.has_negligible
    fields = dict(block_q=block_q, block_k=block_k, feature_map=feature_map, scope=scope,
                  has_negligible=has_negligible, role="forward")
    name = _resolve_backend(backend, qb, **fields)
    ready = early = None
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (qb, kb, vb, proj_weight, proj_bias))
    # the column tables serve only the backward: a call that saves nothing for one does not build them
    if block_map is None and _overlaps_block_map(name, feature_map, qb, kb, vb, proj_weight, proj_bias):
        block_map, ready = _block_map_beside(qb.detach(), kb.detach(), topk, negligible, block_q, block_k, name,
                                             columns=save)
    elif block_map is None:
        early = _early_terms(name, qb, kb, vb, topk, negligible, block_q, block_k, feature_map, scope,
                             has_negligible, proj_weight, proj_bias)
        block_map = _block_map_bhld(qb.detach(), kb.detach(), topk, negligible, block_q, block_k, name,
                                    columns=save, pooled=None if early is None else early.pooled)
    try:
        o = ops.forward(qb, kb, vb, list(block_map.tensors()), proj_weight, proj_bias, block_q, block_k,
                        float(scale), feature_map or "none", scope, float(eps), save, name, maps_ready=ready,
                        early=early)
    finally:   # whatever the forward did, later work on this stream comes after the side stream's
        if ready is not None:
            torch.cuda.current_stream(qb.device).wait_event(ready)
    return o if layout == "bhld" else o.transpose(1, 2)
