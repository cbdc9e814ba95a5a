"""Tuning records: plain JSON, validated against a fixed schema (never pickles, never code).

A record says: for this kernel spec on this backend, GPU and shape bucket, under this software stack,
this config was the fastest measured (time_ms), and the default config took default_ms.

    {"spec": "forward_sm90_d128_b128x64_softmax_marginal_nonegl_bf16", "backend": "triton",
     "gpu": "NVIDIA H100 80GB HBM3", "arch": "sm90", "bucket": "L32768_d5",
     "config": {"num_warps": 8, "num_stages": 3}, "time_ms": 0.81, "default_ms": 0.95,
     "created": 1790000000.0, "meta": {"slagen": "0.1.0", "torch": "2.11.0", "cuda": "13.0",
                                        "triton": "3.6.0", "tilelang": "0.1.15"}}
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any, Dict, Optional, Tuple

from slagen.spec import KernelSpec

KEY_FIELDS = ("spec", "backend", "gpu", "arch", "bucket")
META_FIELDS = ("slagen", "torch", "cuda", "triton", "tilelang")
CONFIG_NESTING = 2  # config["dq"] (a kernel of the role), config["linear"]["dq"] (a kernel it delegates to)
DENSITY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.5, 1.0)
Key = Tuple[str, ...]


class RecordError(ValueError):
    """A record that does not follow the schema."""


def shape_bucket(seq_len: int, density: float) -> str:
    """Bucket of a call's shape: sequence length rounded up to a power of two, density to a step of
    DENSITY_BUCKETS (in percent). Calls in one bucket share a tuned config."""
    length = 1 << max(int(seq_len) - 1, 0).bit_length()
    step = next((b for b in DENSITY_BUCKETS if density <= b + 1e-9), 1.0)
    return f"L{length}_d{step * 100:g}"


def stack_meta() -> Dict[str, str]:
    """Versions of the running software stack that a record must match to be used."""
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "none"

    return {"slagen": version("slagen"), "torch": torch.__version__.split("+")[0],
            "cuda": torch.version.cuda or "none", "triton": version("triton"), "tilelang": version("tilelang")}


def _need(rec: dict, field: str, kind, where: str):
    value = rec.get(field)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RecordError(f"{where}: field {field!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _check_config_values(config: dict, where: str, depth: int) -> None:
    """A config maps names to ints, finite floats, strings or booleans, or to such maps nested at most ``depth``
    levels (one per kernel, one more for a kernel's sub-configs: the TileLang backward's config["linear"]["dq"])."""
    for name, value in config.items():
        if depth > 0 and isinstance(name, str) and isinstance(value, dict):
            _check_config_values(value, f"{where} config[{name!r}]", depth - 1)
        elif not isinstance(name, str) or not (isinstance(value, (int, str)) or  # bool is an int
                                               isinstance(value, float) and math.isfinite(value)):
            raise RecordError(f"{where}: config entries must map names to ints, finite floats, strings or booleans "
                              f"(or to such maps, nested at most {CONFIG_NESTING} levels), got {name!r}: {value!r}")


def validate(rec: Any, where: str = "record") -> dict:
    """Check one record against the schema; returns it (a clean copy) or raises RecordError."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: a record must be a JSON object")
    for field in KEY_FIELDS:
        _need(rec, field, str, where)
    try:
        spec = KernelSpec.from_canonical(rec["spec"])
        spec.replace()  # re-validates every field
    except ValueError as err:
        raise RecordError(f"{where}: bad spec: {err}") from None
    config = _need(rec, "config", dict, where)
    _check_config_values(config, where, depth=CONFIG_NESTING)
    for field in ("time_ms", "default_ms", "created"):
        value = rec.get(field)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise RecordError(f"{where}: field {field!r} must be a finite number >= 0, got {value!r}")
    meta = _need(rec, "meta", dict, where)
    for field in META_FIELDS:
        _need(meta, field, str, f"{where} meta")
    return {**{f: rec[f] for f in KEY_FIELDS}, "config": json.loads(json.dumps(config)), "time_ms": float(rec["time_ms"]),
            "default_ms": float(rec["default_ms"]), "created": float(rec["created"]),
            "meta": {f: meta[f] for f in META_FIELDS}}


def key_of(rec: dict) -> Key:
    """Identity of a record: its lookup key plus its software stack (records of two stacks coexist)."""
    return tuple(rec[f] for f in KEY_FIELDS) + tuple(rec["meta"][f] for f in META_FIELDS)


def better(new: dict, old: Optional[dict]) -> bool:
    """Merge rule for one key: the faster record wins; on equal time, the newer one."""
    if old is None:
        return True
    return (new["time_ms"], -new["created"]) < (old["time_ms"], -old["created"])
