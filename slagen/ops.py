"""The torch.library operators of slagen: ``slagen::block_map``, ``slagen::sla_fwd``, ``slagen::sla_bwd``.

They take logical (B, H, L, D) tensors (any strides with unit stride on D) and a concrete backend name;
the public API in slagen.api validates inputs and resolves ``backend="auto"`` before calling them. Fake
(meta) implementations give torch.compile the output shapes without running a kernel, and
``sla_fwd``'s autograd formula calls ``sla_bwd``, so a model using SLA compiles with ``fullgraph=True``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from slagen import backends
from slagen.reference import block_counts, num_blocks

MapTensors = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("slagen::block_map", mutates_args=())
def block_map_op(q: Tensor, k: Tensor, topk: float, negligible: float, block_q: int, block_k: int,
                 backend: str) -> MapTensors:
    """The 9 BlockMap tensors (slagen.blockmap.LUT_FIELDS) of q (B, H, Lq, D) and k (B, H, Lk, D)."""
    tn = num_blocks(k.shape[-2], block_k)
    n_crit, n_negl = block_counts(tn, topk, negligible)
    return tuple(backends.get(backend).block_map(q, k, n_crit, n_negl, block_q, block_k))


@block_map_op.register_fake
def _(q, k, topk, negligible, block_q, block_k, backend):
    B, H, lq, _ = q.shape
    tm, tn = num_blocks(lq, block_q), num_blocks(k.shape[-2], block_k)
    n_crit, n_negl = block_counts(tn, topk, negligible)
    i32 = dict(dtype=torch.int32, device=q.device)
    return (q.new_empty((B, H, tm, tn), dtype=torch.int8),
            q.new_empty((B, H, tm, n_crit), **i32), q.new_empty((B, H, tm), **i32),
            q.new_empty((B, H, tn, tm), **i32), q.new_empty((B, H, tn), **i32),
            q.new_empty((B, H, tm, n_negl), **i32), q.new_empty((B, H, tm), **i32),
            q.new_empty((B, H, tn, tm if n_negl else 0), **i32), q.new_empty((B, H, tn), **i32))


def _cfg(block_q, block_k, scale, feature_map, scope, eps):
    return dict(block_q=block_q, block_k=block_k, scale=scale, feature_map=feature_map, scope=scope, eps=eps)


@torch.library.custom_op("slagen::sla_fwd", mutates_args=())
def sla_fwd(q: Tensor, k: Tensor, v: Tensor, maps: List[Tensor], proj_weight: Optional[Tensor],
            proj_bias: Optional[Tensor], block_q: int, block_k: int, scale: float, feature_map: str,
            scope: str, eps: float, save: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """SLA forward: (o, lse, o_lin, den) as described in slagen.backends."""
    cfg = _cfg(block_q, block_k, scale, feature_map, scope, eps)
    return tuple(backends.get(backend).forward(q, k, v, list(maps), proj_weight, proj_bias, save, **cfg))


@sla_fwd.register_fake
def _(q, k, v, maps, proj_weight, proj_bias, block_q, block_k, scale, feature_map, scope, eps, save, backend):
    f32 = dict(dtype=torch.float32)
    if save and feature_map != "none":
        return (torch.empty_like(q), q.new_empty(q.shape[:-1], **f32), q.new_empty(q.shape),
                q.new_empty(q.shape[:-1], **f32))
    return (torch.empty_like(q), q.new_empty(q.shape[:-1], **f32), q.new_empty((0,)), q.new_empty((0,), **f32))


@torch.library.custom_op("slagen::sla_bwd", mutates_args=())
def sla_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, o_lin: Tensor, den: Tensor,
            maps: List[Tensor],
            proj_weight: Optional[Tensor], proj_bias: Optional[Tensor], block_q: int, block_k: int,
            scale: float, feature_map: str, scope: str, eps: float,
            backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SLA backward: (dq, dk, dv, dw, db); dw/db are empty when proj_weight/proj_bias are None."""
    cfg = _cfg(block_q, block_k, scale, feature_map, scope, eps)
    return tuple(backends.get(backend).backward(do, q, k, v, o, lse, o_lin, den, list(maps), proj_weight,
                                                proj_bias, **cfg))


@sla_bwd.register_fake
def _(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, block_q, block_k, scale, feature_map, scope,
      eps, backend):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(proj_weight) if proj_weight is not None else q.new_empty((0,), dtype=torch.float32),
            torch.empty_like(proj_bias) if proj_bias is not None else q.new_empty((0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, maps, proj_weight, proj_bias, block_q, block_k, scale, feature_map, scope, eps, save, backend = inputs
    o, lse, o_lin, den = output
    ctx.save_for_backward(q, k, v, o, lse, o_lin, den, proj_weight, proj_bias, *maps)
    ctx.cfg = (block_q, block_k, scale, feature_map, scope, eps, backend)


def _backward(ctx, do, dlse, do_lin, dden):
    q, k, v, o, lse, o_lin, den, proj_weight, proj_bias, *maps = ctx.saved_tensors
    dq, dk, dv, dw, db = sla_bwd(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, *ctx.cfg)
    return (dq, dk, dv, [None] * len(maps),
            dw if proj_weight is not None else None,
            db if proj_bias is not None else None,
            *([None] * 8))


sla_fwd.register_autograd(_backward, setup_context=_setup_context)
