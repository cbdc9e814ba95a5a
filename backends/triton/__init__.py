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


def block_map(q, k, n_crit, n_negl, block_q, block_k):
    from slagen.backends.triton import selection
    return selection.block_map(q, k, n_crit, n_negl, block_q, block_k)


def forward(q, k, v, maps, proj_weight, proj_bias, save, **cfg):
    from slagen.backends.triton import fwd
    return fwd.forward(q, k, v, maps, proj_weight, proj_bias, save, **cfg)


def backward(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, **cfg):
    from slagen.backends.triton import bwd
    return bwd.backward(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, **cfg)
