"""The torch.library operators of slagen: ``slagen::block_map``, ``slagen::sla_fwd``, ``slagen::sla_bwd``,
and the eager entry points the public API calls: :func:`block_map` and :func:`forward`.

The operators take logical (B, H, L, D) tensors (any strides with unit stride on D) and a concrete backend
name; the public API in slagen.api validates inputs and resolves ``backend="auto"`` before calling them.
Fake (meta) implementations give torch.compile the output shapes without running a kernel, and
``sla_fwd``'s autograd formula calls ``sla_bwd``, so a model using SLA compiles with ``fullgraph=True``.

:func:`block_map` and :func:`forward` call the operators while torch.compile / torch.export trace, or when
an input is not a plain ``torch.Tensor`` (a subclass or a fake tensor dispatches through them); otherwise
they call the same backend functions directly (the forward through a torch.autograd.Function with the same
backward): the operator dispatch costs ~50 µs (block map) and ~50 µs (forward) of host time per call on
an H200 box (tools/host_overhead.py, session 17), which matters for eager calls at short lengths.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from slagen import backends
from slagen.blockmap import has_columns
from slagen.reference import block_counts, num_blocks

MapTensors = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _block_map(q: Tensor, k: Tensor, topk: float, negligible: float, block_q: int, block_k: int,
               backend: str, columns: bool = True, pooled=None) -> MapTensors:
    tn = num_blocks(k.shape[-2], block_k)
    n_crit, n_negl = block_counts(tn, topk, negligible)
    extra = {} if pooled is None else dict(pooled=pooled)
    return tuple(backends.get(backend).block_map(q, k, n_crit, n_negl, block_q, block_k, columns, **extra))


@torch.library.custom_op("slagen::block_map", mutates_args=())
def block_map_op(q: Tensor, k: Tensor, topk: float, negligible: float, block_q: int, block_k: int,
                 backend: str) -> MapTensors:
    """The 9 BlockMap tensors (slagen.blockmap.LUT_FIELDS) of q (B, H, Lq, D) and k (B, H, Lk, D)."""
    return _block_map(q, k, topk, negligible, block_q, block_k, backend)


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


def _forward(q, k, v, maps, proj_weight, proj_bias, save, cfg, backend, maps_ready=None,
             full: bool = True, early=None) -> Tuple[Tensor, ...]:
    """(o, lse, o_lin, den, h_lin, z_lin) as slagen.backends describes them (h_lin / z_lin empty unless the
    backend keeps the linear sums for the backward); ``full`` False: the backend's own tuple (o first)."""
    extra = {} if maps_ready is None else dict(maps_ready=maps_ready)
    if early is not None:
        extra["early"] = early
    if backends.keeps_linear_sums(backend, save, cfg["feature_map"], cfg["scope"]):
        extra["states"] = True
    out = tuple(backends.get(backend).forward(q, k, v, list(maps), proj_weight, proj_bias, save, **cfg, **extra))
    if full and len(out) == 4:
        out += (q.new_empty((0,)), q.new_empty((0,), dtype=torch.float32))
    return out


@torch.library.custom_op("slagen::sla_fwd", mutates_args=())
def sla_fwd(q: Tensor, k: Tensor, v: Tensor, maps: List[Tensor], proj_weight: Optional[Tensor],
            proj_bias: Optional[Tensor], block_q: int, block_k: int, scale: float, feature_map: str,
            scope: str, eps: float, save: bool,
            backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SLA forward: (o, lse, o_lin, den, h_lin, z_lin) as described in slagen.backends."""
    return _forward(q, k, v, maps, proj_weight, proj_bias, save, _cfg(block_q, block_k, scale, feature_map, scope, eps),
                    backend)


@sla_fwd.register_fake
def _(q, k, v, maps, proj_weight, proj_bias, block_q, block_k, scale, feature_map, scope, eps, save, backend):
    f32 = dict(dtype=torch.float32)
    B, H, lq, d = q.shape
    kept = backends.keeps_linear_sums(backend, save, feature_map, scope)
    if kept:
        tm = num_blocks(lq, block_q)
        sums = (q.new_empty((B, H, tm, d, d)), q.new_empty((B, H, tm, d), **f32))
    else:
        sums = (q.new_empty((0,)), q.new_empty((0,), **f32))
    if save and feature_map != "none" and not kept:     # (kept sums: O^l and den formed again from them)
        return (torch.empty_like(q), q.new_empty(q.shape[:-1], **f32), q.new_empty(q.shape),
                q.new_empty(q.shape[:-1], **f32)) + sums
    return (torch.empty_like(q), q.new_empty(q.shape[:-1], **f32), q.new_empty((0,)),
            q.new_empty((0,), **f32)) + sums


@torch.library.custom_op("slagen::sla_bwd", mutates_args=())
def sla_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, o_lin: Tensor, den: Tensor,
            h_lin: Tensor, z_lin: Tensor, maps: List[Tensor],
            proj_weight: Optional[Tensor], proj_bias: Optional[Tensor], block_q: int, block_k: int,
            scale: float, feature_map: str, scope: str, eps: float,
            backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SLA backward: (dq, dk, dv, dw, db); dw/db are empty when proj_weight/proj_bias are None."""
    cfg = _cfg(block_q, block_k, scale, feature_map, scope, eps)
    return _backward_call(backend, do, q, k, v, o, lse, o_lin, den, (h_lin, z_lin) if h_lin.numel() else None,
                          list(maps), proj_weight, proj_bias, cfg)


def _backward_call(backend, do, q, k, v, o, lse, o_lin, den, sums, maps, proj_weight, proj_bias, cfg):
    """The backend's backward, given the forward's linear sums where it kept them (``sums``: None, the pair
    (H_i, Z_i), or the list [H_i, Z_i] holding the last references, which the backward empties as soon as it
    no longer reads them). A broadcast output gradient (``out.sum().backward()`` gives one with zero strides)
    or one without unit stride on D is made contiguous first: the kernels read dO as tiles."""
    if do.stride(-1) != 1 or 0 in do.stride():
        do = do.contiguous()
    extra = dict(lin_sums=sums) if sums is not None else {}
    return tuple(backends.get(backend).backward(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias,
                                                **cfg, **extra))


@sla_bwd.register_fake
def _(do, q, k, v, o, lse, o_lin, den, h_lin, z_lin, maps, proj_weight, proj_bias, block_q, block_k, scale,
      feature_map, scope, eps, backend):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(proj_weight) if proj_weight is not None else q.new_empty((0,), dtype=torch.float32),
            torch.empty_like(proj_bias) if proj_bias is not None else q.new_empty((0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, maps, proj_weight, proj_bias, block_q, block_k, scale, feature_map, scope, eps, save, backend = inputs
    ctx.save_for_backward(q, k, v, *output, proj_weight, proj_bias, *maps)
    ctx.cfg = (block_q, block_k, scale, feature_map, scope, eps, backend)
    ctx.set_materialize_grads(False)    # see _Forward.setup_context


def _backward(ctx, do, *_):
    q, k, v, o, lse, o_lin, den, h_lin, z_lin, proj_weight, proj_bias, *maps = ctx.saved_tensors
    if do is None:      # grads not materialised: O's is None when autograd runs the backward without one
        do = torch.zeros_like(o)    # (a loss reaching only the other outputs; gradcheck's undefined-gradient check)
    dq, dk, dv, dw, db = sla_bwd(do, q, k, v, o, lse, o_lin, den, h_lin, z_lin, maps, proj_weight, proj_bias,
                                 *ctx.cfg)
    return (dq, dk, dv, [None] * len(maps),
            dw if proj_weight is not None else None,
            db if proj_bias is not None else None,
            *([None] * 8))


sla_fwd.register_autograd(_backward, setup_context=_setup_context)


_PLAIN = (Tensor, torch.nn.Parameter)   # no __torch_dispatch__ / __torch_function__ of their own


def direct(*tensors) -> bool:
    """Whether a call may skip the operator dispatch: eager mode and only plain tensors (or None)."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def block_map(q: Tensor, k: Tensor, topk: float, negligible: float, block_q: int, block_k: int,
              backend: str, columns: bool = True, pooled=None) -> MapTensors:
    """``slagen::block_map``'s result (see :func:`block_map_op`), through the operator only when needed.
    ``columns`` False (eager calls only; the operator always forms them): the column tables, which only a
    backward reads, are zero-size stand-ins (slagen.blockmap.no_columns) and their kernel does not run.
    ``pooled`` (eager calls only): q's and k's pooled means from the backend's early pre-pass
    (slagen.backends.tilelang.early_terms)."""
    if direct(q, k):
        return _block_map(q, k, topk, negligible, block_q, block_k, backend, columns, pooled)
    if pooled is not None:
        raise ValueError("pooled is only for eager calls on plain tensors")
    return block_map_op(q, k, topk, negligible, block_q, block_k, backend)


class _Forward(torch.autograd.Function):
    """The eager twin of ``slagen::sla_fwd`` with its autograd formula (same kernels, same saved tensors)."""

    @staticmethod
    def forward(q, k, v, proj_weight, proj_bias, maps, cfg, backend, maps_ready, early):
        return _forward(q, k, v, maps, proj_weight, proj_bias, True, cfg, backend, maps_ready, early=early)

    @staticmethod
    def setup_context(ctx, inputs, output):   # the separate form also serves torch.func.grad
        q, k, v, proj_weight, proj_bias, maps, cfg, backend, _, _ = inputs
        o, lse, o_lin, den, h_lin, z_lin = output
        ctx.save_for_backward(q, k, v, o, lse, o_lin, den, proj_weight, proj_bias, *maps)
        # The kept linear sums (H_i, Z_i) are held in a list, not saved: the backward hands the list over and
        # the backend empties it once dQ no longer needs them, so H_i (96 MiB at the headline shape) is freed
        # before the dK/dV stage's peak. A second backward through the graph (retain_graph) forms them again.
        ctx.sums = [h_lin, z_lin] if h_lin.numel() else None
        ctx.cfg, ctx.backend = cfg, backend
        ctx.mark_non_differentiable(*output[1:])
        # The other outputs' gradients stay None: materialised, they are zero tensors of their shapes, which the
        # backward never reads — O^l's and H_i's alone were 2 × 96 MiB at the headline shape's f+b peak (H200,
        # session 25: 988 MiB, the two named by backward_memory --stacks all as autograd's VariableInfo::zeros).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, do, *_):
        q, k, v, o, lse, o_lin, den, proj_weight, proj_bias, *maps = ctx.saved_tensors
        if do is None:      # grads not materialised: O's is None when autograd runs the backward without one
            do = torch.zeros_like(o)    # (gradcheck's undefined-gradient check does)
        sums = ctx.sums
        if sums is not None and not sums:       # an earlier backward of this graph released them: form them again
            sums = list(_forward(q, k, v, maps, proj_weight, proj_bias, True, ctx.cfg, ctx.backend)[4:])
        dq, dk, dv, dw, db = _backward_call(ctx.backend, do, q, k, v, o, lse, o_lin, den, sums, maps,
                                            proj_weight, proj_bias, ctx.cfg)
        return (dq, dk, dv, dw if proj_weight is not None else None, db if proj_bias is not None else None,
                None, None, None, None, None)


def forward(q: Tensor, k: Tensor, v: Tensor, maps: List[Tensor], proj_weight: Optional[Tensor],
            proj_bias: Optional[Tensor], block_q: int, block_k: int, scale: float, feature_map: str, scope: str,
            eps: float, save: bool, backend: str, maps_ready=None, early=None) -> Tensor:
    """SLA's output O (differentiable when ``save``): ``slagen::sla_fwd`` and its autograd formula, through
    the operator only when needed (see the module docstring). ``maps_ready`` (direct calls only, a kernel
    backend): the event of a block map computed on a side stream, see slagen.backends. ``early`` (direct calls
    only): the linear pre-pass the backend ran before the block map (slagen.backends.tilelang.early_terms)."""
    if not direct(q, k, v, proj_weight, proj_bias, *maps):
        if maps_ready is not None or early is not None:
            raise ValueError("maps_ready and early are only for eager calls on plain tensors (the operator path "
                             "has no side stream and runs its own pre-pass)")
        return sla_fwd(q, k, v, maps, proj_weight, proj_bias, block_q, block_k, scale, feature_map, scope, eps,
                       save, backend)[0]
    cfg = _cfg(block_q, block_k, scale, feature_map, scope, eps)
    if save:
        if not has_columns(maps):
            raise ValueError("a forward that saves for the backward needs a block map with its column tables "
                             "(this one was built without them, for a call that is not differentiated)")
        return _Forward.apply(q, k, v, proj_weight, proj_bias, tuple(maps), cfg, backend, maps_ready, early)[0]
    return _forward(q, k, v, maps, proj_weight, proj_bias, False, cfg, backend, maps_ready, full=False,
                    early=early)[0]
