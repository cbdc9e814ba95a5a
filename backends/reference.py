"""The ``torch`` backend: slagen.reference on any device; the backward is autograd of the reference."""

from __future__ import annotations

from typing import Optional

import torch

from slagen import reference
from slagen.blockmap import lists_from_mask


def unavailable_reason(device: torch.device, spec) -> Optional[str]:
    return None


def block_map(q, k, n_crit: int, n_negl: int, block_q: int, block_k: int, columns: bool = True):
    with torch.no_grad():
        mask = reference.classify(reference.block_scores(q, k, block_q, block_k), n_crit, n_negl)
        return lists_from_mask(mask, n_crit, n_negl, columns)


def _parts(q, k, v, maps, proj_weight, proj_bias, *, block_q, block_k, scale, feature_map, scope, eps):
    return reference.attention_parts(q, k, v, maps[0], block_q=block_q, block_k=block_k, scale=scale,
                                     feature_map=None if feature_map == "none" else feature_map,
                                     scope=scope, proj_weight=proj_weight, proj_bias=proj_bias, eps=eps)


def forward(q, k, v, maps, proj_weight, proj_bias, save, **cfg):
    o, lse, o_lin, den = _parts(q, k, v, maps, proj_weight, proj_bias, **cfg)
    out = torch.empty_like(q)
    out.copy_(o)
    if save and o_lin is not None:
        return out, lse.float().contiguous(), o_lin.to(q.dtype).contiguous(), den.float().contiguous()
    return out, lse.float().contiguous(), q.new_empty((0,)), q.new_empty((0,), dtype=torch.float32)


def backward(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, **cfg):
    # Inside an op implementation the autograd dispatch key is excluded, so tape-based autograd
    # cannot record; torch.func.vjp pushes its own transform level and works here.
    given = [t for t in (proj_weight, proj_bias) if t is not None]

    def fn(q_, k_, v_, *proj):
        it = iter(proj)
        w = next(it) if proj_weight is not None else None
        b = next(it) if proj_bias is not None else None
        return _parts(q_, k_, v_, maps, w, b, **cfg)[0]

    out, vjp = torch.func.vjp(fn, q, k, v, *given)
    grads = list(vjp(do.to(out.dtype)))
    dq, dk, dv = grads[:3]
    rest = iter(grads[3:])
    dw = next(rest).to(proj_weight.dtype) if proj_weight is not None else q.new_empty((0,), dtype=torch.float32)
    db = next(rest).to(proj_bias.dtype) if proj_bias is not None else q.new_empty((0,), dtype=torch.float32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dw, db
