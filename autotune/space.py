"""Search spaces: the configs worth timing for one kernel, pruned by the arch's limits before compiling.

A space varies the tunables a backend's ``default_config(spec)`` has, over the options below; every
candidate must pass the backend's own ``check_config(cfg, spec)`` and fit the arch's shared memory. A
config may be flat or nested by kernel ({"dq": {...}, "dkdv": {...}}): a nested one is varied one
kernel at a time (the others keep their defaults), which keeps the space linear in the kernel count.
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Sequence

from slagen.spec import KernelSpec

SHARED_MEMORY = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm89": 99 * 1024, "sm90": 227 * 1024}
OPTIONS: Dict[str, Sequence] = {
    "tile_m": (32, 64, 128),
    "tile_n": (32, 64, 128),
    "block_m": (32, 64, 128),
    "block_n": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (1, 2, 3, 4),
    "marginal": ("gemm", "onchip"),     # how the Triton forward forms marginal-scope corrections
    "marginal_states": ("gemm", "gather"),  # how the Triton backward forms them (its 'prep' kernels)
    "epilogue": ("fused", "split", "lowp"),  # the Triton forward's linear epilogue
    "pre_stages": (1, 2, 3),             # the Triton forward's linear pre-pass
    "pre_per_sm": (2, 4, 8),
    "pre_async": (True, False),          # the TileLang pre-pass leaves each H tile's TMA store in flight
    "backward": ("triton", "tilelang"),  # the TileLang backend's backward: Triton's, or its own sparse loops
    "query_state": ("tilelang", "triton"),  # its per-query-block state where the forward kept H_i, Z_i
    "ctas_per_sm": (1, 2),               # the TileLang forward's requested residency
    "prefetch_h": (False, True),         # the TileLang forward loads H_i before its key loop
    "tma_store": (False, True),          # the TileLang forward stores O through shared memory (TMA)
    "row_regs": (False, True),           # the TileLang backward's dq takes Q and dO from registers
    "h_prefetch": (False, True),         # the TileLang backward's dq loads H_i before its key loop
    "overlap": (False, True),            # the TileLang forward overlaps S_{t+1} = QK_{t+1}ᵀ with step t's softmax
    "pingpong": (False, True),           # the TileLang forward's two warpgroups take turns at the tensor cores
    "lazy_rescale": (True, False),       # the TileLang forward moves a row's softmax reference only past 2^8
}
_HAS_LINEAR = lambda spec: spec.feature_map is not None  # noqa: E731
_HAS_MARGINAL = lambda spec: spec.scope == "marginal" and spec.feature_map is not None  # noqa: E731
RELEVANT = {"marginal": _HAS_MARGINAL, "marginal_states": _HAS_MARGINAL, "epilogue": _HAS_LINEAR,
            "pre_stages": _HAS_LINEAR, "pre_per_sm": _HAS_LINEAR, "prefetch_h": _HAS_LINEAR,
            "pre_async": _HAS_MARGINAL, "h_prefetch": _HAS_MARGINAL, "query_state": _HAS_MARGINAL}


def copy_config(config: dict) -> dict:
    """A copy of a config (names to scalars, nested by kernel at any depth) that shares no dict with it."""
    return {name: copy_config(value) if isinstance(value, dict) else value for name, value in config.items()}


def shared_bytes(cfg: dict, spec: KernelSpec) -> int:
    """Rough shared memory of a tile loop: a (tile_m x D) query tile plus num_stages (tile_n x D) K and V
    tiles, in the input dtype (a lower bound: kernels that stage more are pruned by the compiler)."""
    esize = 4 if spec.dtype == "fp32" else 2
    tm = cfg.get("tile_m", cfg.get("block_m", spec.block_q))
    tn = cfg.get("tile_n", cfg.get("block_n", spec.block_k))
    return esize * spec.head_dim * (tm + 2 * tn * max(cfg.get("num_stages", 1), 1))


def candidates(spec: KernelSpec, default: dict, check: Callable[[dict, KernelSpec], None]) -> List[dict]:
    """The default config first, then every valid variation of its tunables within OPTIONS."""
    nested = all(isinstance(v, dict) for v in default.values())
    groups = [(name, sub) for name, sub in default.items()] if nested else [(None, default)]
    out = [dict(default)]
    limit = SHARED_MEMORY[spec.arch]
    for name, sub in groups:
        keys = [k for k in OPTIONS if k in sub and RELEVANT.get(k, lambda _: True)(spec)]
        for values in itertools.product(*(OPTIONS[k] for k in keys)):
            new_sub = {**sub, **dict(zip(keys, values))}
            cfg = new_sub if name is None else {**default, name: new_sub}
            if cfg in out or shared_bytes(new_sub, spec) > limit:
                continue
            try:
                check(cfg, spec)
            except ValueError:
                continue
            out.append(cfg)
    return out


def spread(configs: List[dict], limit: Optional[int]) -> List[dict]:
    """At most ``limit`` of ``configs``: the first (the default) and an even spread of the others
    (all of them when ``limit`` is None or not smaller than their number)."""
    if limit is None or len(configs) <= limit:
        return list(configs)
    rest = configs[1:]
    picks = limit - 1
    return [configs[0]] + [rest[(i * len(rest)) // picks] for i in range(picks)]
