"""The ``triton`` backend: kernels rendered from templates/triton/*.py.j2 per KernelSpec.

Runs on every CUDA GPU from sm80 (sm90 included) and, for tests, on CPU tensors under
``TRITON_INTERPRET=1``. One glue module per kernel role: ``selection`` (block map), ``fwd``, ``bwd``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from slagen.spec import KernelSpec

HEAD_DIMS = (16, 32, 64, 128)


def unavailable_reason(device: torch.device, spec: KernelSpec) -> Optional[str]:
    """Why the Triton backend cannot serve ``spec`` on ``device``, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors run Triton kernels only under TRITON_INTERPRET=1 (tests); use backend='torch'"
    elif device.type != "cuda":
        return f"device type {device.type!r} is not supported (CUDA GPUs, or CPU under TRITON_INTERPRET=1)"
    if spec.head_dim not in HEAD_DIMS:
        return f"head_dim={spec.head_dim} is not supported by the Triton kernels; allowed: {HEAD_DIMS}"
    return None


def tuned_config(role_module, spec: KernelSpec, q: torch.Tensor, seq_len: int, density: float) -> Optional[dict]:
    """The tuned config of ``spec`` for this GPU and shape (slagen.autotune.select), or None: default."""
    from slagen.autotune import select
    return select.config_for(spec, "triton", q.device, seq_len, density, check=role_module.check_config)


def block_map(q, k, n_crit, n_negl, block_q, block_k, columns=True, pooled=None, marginal=None):
    from slagen.backends.triton import selection
    from slagen.backends import plans
    return selection.block_map(q, k, n_crit, n_negl, block_q, block_k, config=plans.TUNED, columns=columns,
                               pooled=pooled, marginal=marginal)


def _spec_and_density(role_module, q, maps, cfg) -> tuple:
    spec = role_module.kernel_spec(q, block_q=cfg["block_q"], block_k=cfg["block_k"],
                                   feature_map=cfg["feature_map"], scope=cfg["scope"],
                                   has_negligible=maps[5].shape[-1] > 0)
    return spec, maps[1].shape[-1] / max(maps[0].shape[-1], 1)


def forward(q, k, v, maps, proj_weight, proj_bias, save, maps_ready=None, **cfg):
    from slagen.backends import plans
    from slagen.backends.triton import fwd
    return fwd.forward(q, k, v, maps, proj_weight, proj_bias, save, config=plans.TUNED, maps_ready=maps_ready, **cfg)


def _backward_config(q, k, maps, cfg) -> Optional[dict]:
    from slagen.backends.triton import bwd
    spec, density = _spec_and_density(bwd, q, maps, cfg)
    return tuned_config(bwd, spec, q, k.shape[-2], density)


def backward(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, lin_sums=None, **cfg):
    from slagen.backends.triton import bwd
    return bwd.backward(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias,
                        config=_backward_config(q, k, maps, cfg), lin_sums=lin_sums, **cfg)


def backward_linear_part(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, *, sparse_dq, sparse_dkdv,
                         linear=None, lin_sums=None, fused_dq=False, fused_dkdv=False, query_state=None, **cfg):
    """The backward without its sparse loops (slagen.backends.triton.bwd.linear_part) for a backend whose
    ``sparse_dq`` / ``sparse_dkdv`` run the sparse branch: (dq, dk, dv, dw, db). Config: the Triton backward's
    tuned one (or None: its default), passed through ``linear(config) -> config`` when given (the caller's
    overrides for these kernels); ``query_state``: see bwd.linear_part."""
    from slagen.backends.triton import bwd
    config = _backward_config(q, k, maps, cfg)
    if linear is not None:
        config = linear(config)
    return bwd.linear_part(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, sparse_dq=sparse_dq,
                           sparse_dkdv=sparse_dkdv, config=config, lin_sums=lin_sums, fused_dq=fused_dq,
                           fused_dkdv=fused_dkdv, query_state=query_state, **cfg)
