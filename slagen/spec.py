"""KernelSpec: the declarative description of one generated SLA kernel.

A spec says *what* a kernel computes (arch, head dim, selection block sizes, feature map, linear scope,
negligible class on/off, dtype, role). *How* it computes it (tile sizes, warps, stages) lives in the
tunables of each backend. Sequence length, top-k, batch and heads are run-time values and never part of
a spec, so a new video resolution never asks for a new kernel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Dict, Optional

ARCHS = ("sm80", "sm86", "sm89", "sm90")
HEAD_DIMS = (16, 32, 64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128, 256)
FEATURE_MAPS = ("softmax", "elu", "relu")
SCOPES = ("marginal", "all")
DTYPES = ("bf16", "fp16", "fp32")
ROLES = ("block_map", "forward", "backward")

_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
}


def _allowed(values) -> str:
    return ", ".join(str(v) for v in values)


def parse_arch(value) -> str:
    """Canonical arch name ('sm90') from user spellings: 'sm90', 'sm_90a', '9.0', '9.0a', 90, (9, 0)."""
    if isinstance(value, tuple) and len(value) == 2:
        text = f"{value[0]}{value[1]}"
    else:
        text = str(value).strip().lower()
    m = re.fullmatch(r"(?:sm_?|compute_?)?(\d)\.?(\d)a?", text)
    name = f"sm{m.group(1)}{m.group(2)}" if m else None
    if name not in ARCHS:
        raise ValueError(f"arch={value!r} is not supported; allowed: {_allowed(ARCHS)} "
                         f"(also spelled like 'sm_90a', '9.0', '9.0a')")
    return name


def parse_dtype(value) -> str:
    """Canonical dtype name ('bf16', 'fp16', 'fp32') from strings or torch dtypes."""
    key = str(value).strip().lower()
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"dtype={value!r} is not supported; allowed: {_allowed(DTYPES)} "
                         f"(or bfloat16, float16, float32)")
    return _DTYPE_ALIASES[key]


def parse_feature_map(value) -> Optional[str]:
    """'softmax' | 'elu' | 'relu', or None for sparse-only ('none' and '' also mean None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    key = str(value).strip().lower()
    if key not in FEATURE_MAPS:
        raise ValueError(f"feature_map={value!r} is not supported; allowed: {_allowed(FEATURE_MAPS)} "
                         f"or None (sparse-only)")
    return key


def parse_scope(value) -> str:
    key = str(value).strip().lower()
    if key not in SCOPES:
        raise ValueError(f"scope={value!r} is not supported; allowed: {_allowed(SCOPES)}")
    return key


def _check_choice(field: str, value, allowed) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; allowed: {_allowed(allowed)}")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What one generated kernel computes.

    Fields (all validated and canonicalised in ``__post_init__``):
      arch:          'sm80' | 'sm86' | 'sm89' | 'sm90'
      head_dim:      D, a power of two in 16..256
      block_q:       query rows per selection block
      block_k:       key rows per selection block
      feature_map:   'softmax' | 'elu' | 'relu' | None (sparse-only: no linear branch)
      scope:         'marginal' (the paper) | 'all' (thu-ml/SLA main)
      has_negligible: whether the negligible class (k_l > 0) exists (kept only where it changes the result:
                     the block map, and a marginal-scope linear branch)
      dtype:         'bf16' | 'fp16' | 'fp32' (fp32 serves the CPU interpreter tests)
      role:          'block_map' | 'forward' | 'backward'
    """

    arch: str = "sm90"
    head_dim: int = 128
    block_q: int = 64
    block_k: int = 64
    feature_map: Optional[str] = "softmax"
    scope: str = "marginal"
    has_negligible: bool = False
    dtype: str = "bf16"
    role: str = "forward"

    def __post_init__(self):
        set_ = lambda name, val: object.__setattr__(self, name, val)  # noqa: E731 (frozen dataclass)
        set_("arch", parse_arch(self.arch))
        _check_choice("head_dim", self.head_dim, HEAD_DIMS)
        _check_choice("block_q", self.block_q, BLOCK_SIZES)
        _check_choice("block_k", self.block_k, BLOCK_SIZES)
        set_("feature_map", parse_feature_map(self.feature_map))
        set_("scope", parse_scope(self.scope))
        if not isinstance(self.has_negligible, bool):
            raise ValueError(f"has_negligible={self.has_negligible!r} must be True or False")
        set_("dtype", parse_dtype(self.dtype))
        _check_choice("role", self.role, ROLES)
        # Fields that do not change what the role computes are normalised, so that equal computations have
        # equal specs (one generated module, one tuning record): the block map has no linear branch; the
        # scope means nothing without a linear branch; the negligible class only shapes a marginal branch.
        if self.role == "block_map":
            set_("feature_map", None)
        if self.feature_map is None:
            set_("scope", "marginal")
        if self.role != "block_map" and (self.feature_map is None or self.scope == "all"):
            set_("has_negligible", False)

    @property
    def canonical(self) -> str:
        """Stable, human-readable name of the spec; its hash names generated files."""
        fmap = self.feature_map or "none"
        negl = "negl" if self.has_negligible else "nonegl"
        return (f"{self.role}_{self.arch}_d{self.head_dim}_b{self.block_q}x{self.block_k}_{fmap}_"
                f"{self.scope}_{negl}_{self.dtype}")

    @property
    def short_hash(self) -> str:
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:12]

    def uri(self, backend: str) -> str:
        """Unique name of this specialisation for one backend, e.g. 'triton_forward_sm90_d128_...'."""
        return f"{backend}_{self.canonical}"

    def replace(self, **changes) -> "KernelSpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, **fields) -> "KernelSpec":
        """``KernelSpec(**fields)``, memoised: the per-call paths (dispatch, each backend role) build the same
        few specs at every call, and validation is most of a call's Python time in slagen. Field types are
        part of the key, so an invalid spelling (``has_negligible=1``) is still rejected."""
        key = tuple(sorted((name, type(val), val) for name, val in fields.items()))
        spec = _SPECS.get(key)
        if spec is None:
            if len(_SPECS) >= 4096:    # a bound, never reached by real use (a few specs per model)
                _SPECS.clear()
            spec = _SPECS[key] = cls(**fields)
        return spec

    @classmethod
    def from_canonical(cls, text: str) -> "KernelSpec":
        """Inverse of :attr:`canonical`."""
        m = re.fullmatch(r"(block_map|forward|backward)_(sm\d+)_d(\d+)_b(\d+)x(\d+)_(\w+?)_(marginal|all)_"
                         r"(negl|nonegl)_(bf16|fp16|fp32)", text)
        if not m:
            raise ValueError(f"not a canonical KernelSpec name: {text!r}")
        role, arch, d, bq, bk, fmap, scope, negl, dtype = m.groups()
        return cls(arch=arch, head_dim=int(d), block_q=int(bq), block_k=int(bk), feature_map=fmap,
                   scope=scope, has_negligible=(negl == "negl"), dtype=dtype, role=role)


_SPECS: Dict[tuple, KernelSpec] = {}   # KernelSpec.of's memo (a dict: torch.compile traces it without warnings)
