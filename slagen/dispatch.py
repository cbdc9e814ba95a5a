"""Backend choice: ``backend="auto"`` picks TileLang on sm90 when it serves the spec, else Triton on CUDA,
else the PyTorch reference. An explicit backend that cannot serve a call raises; nothing falls back
silently. The automatic choice is logged once per (device kind, choice) at INFO level."""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from slagen import backends
from slagen.spec import ARCHS, KernelSpec

log = logging.getLogger("slagen")
_ANNOUNCED = set()


def device_arch(device: torch.device) -> Optional[str]:
    """'sm90'-style arch of a CUDA device, or None for any other device."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def spec_for(device: torch.device, dtype: torch.dtype, **fields) -> Tuple[Optional[KernelSpec], str]:
    """(the KernelSpec of a call on ``device``, "") or (None, why no generated kernel can serve it).

    CPU tensors map to sm80 (the Triton interpreter runs the generic kernels).
    """
    arch = device_arch(device) or "sm80"
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if arch not in ARCHS:
        return None, f"no generated kernels for {arch} (supported: {', '.join(ARCHS)})"
    if dtype not in names:
        return None, f"dtype {dtype} has no generated kernels (bfloat16, float16, float32 do)"
    try:
        return KernelSpec.of(arch=arch, dtype=names[dtype], **fields), ""
    except ValueError as err:
        return None, str(err)


def resolve(backend: str, device: torch.device, spec: Optional[KernelSpec], why_no_spec: str) -> str:
    """Name of the backend that serves this call (see the module docstring)."""
    if backend == "auto":
        order = ("tilelang", "triton", "torch") if device.type == "cuda" else ("torch",)
        for name in order:
            if name == "torch" or (spec is not None and backends.get(name).unavailable_reason(device, spec) is None):
                key = (device.type, device_arch(device), name)
                if key not in _ANNOUNCED:
                    _ANNOUNCED.add(key)
                    log.info("slagen: backend='auto' chose %r on %s (%s)", name, device,
                             device_arch(device) or device.type)
                return name
    if backend not in backends.NAMES:
        raise ValueError(f"backend={backend!r} is not known; allowed: auto, {', '.join(backends.NAMES)}")
    if backend == "torch":
        return backend
    if spec is None:
        raise ValueError(f"backend={backend!r} cannot serve this call: {why_no_spec}")
    reason = backends.get(backend).unavailable_reason(device, spec)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot serve this call: {reason}")
    return backend
