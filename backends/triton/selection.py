"""Glue of the Triton block map (templates/triton/block_map.py.j2): spec, tunables, launches.

Three launches per call, all accumulating in fp32 whatever the input dtype, no atomics (deterministic):
  1. ``pool_kernel``, grid (ceil(T_m / G) + ceil(T_n / G), B·H): block means q̄ (T_m, D) and k̄ (T_n, D)
     and per-group key sums (G = ``pool_group`` blocks per program), read once from q and k.
  2. ``select_kernel``, grid (ceil(T_m / score_rows), B·H): key mean from the group sums, scores
     S = q̄ (k̄ − mean K)ᵀ into an fp32 scratch (B·H, T_m, T_n), then per row an exact radix select on an
     order-preserving int32 image of the scores (early exit once the k-th is isolated; ties: smaller key
     index first) giving the int8 mask, the row lists (ascending, via a prefix sum) and their counts.
  3. ``column_kernel``, grid (ceil(T_n / col_cols), B·H): column lists of both classes from the mask
     (prefix sums down the columns), -1 padded, and their counts.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from slagen import codegen
from slagen.backends.triton import HEAD_DIMS
from slagen.dispatch import device_arch
from slagen.reference import num_blocks
from slagen.spec import BLOCK_SIZES, KernelSpec

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SCORE_DOTS = ("tf32x3", "ieee")  # plain tf32 (~1e-3 relative) would reorder blocks far from ties

# Tunables per arch. Shared memory (sm80 ~163 KB, sm86/sm89 ~99 KB, sm90 ~227 KB) is not the limit here:
# the score dots take score_dchunk columns of D at a time (~10 KB). Registers are: the selection keeps
# ~16 scores per thread (select_elems = 512 * score_warps), pooling <= 64 elements per thread (ptxas -v
# of every arch x head_dim default: <= 177 registers, spills <= 12 bytes).
_ARCH = {
    "sm80": dict(pool_warps=4, pool_group=8, score_rows=16, score_warps=4, score_stages=1, select_elems=2048,
                 col_rows=32, col_cols=64, col_warps=4),
    "sm86": dict(pool_warps=4, pool_group=8, score_rows=16, score_warps=4, score_stages=1, select_elems=2048,
                 col_rows=32, col_cols=64, col_warps=4),
    "sm89": dict(pool_warps=4, pool_group=8, score_rows=16, score_warps=4, score_stages=1, select_elems=2048,
                 col_rows=32, col_cols=64, col_warps=4),
    "sm90": dict(pool_warps=8, pool_group=8, score_rows=16, score_warps=8, score_stages=1, select_elems=4096,
                 col_rows=32, col_cols=64, col_warps=4),
}
# (arch, head_dim) -> (pool_rows cap: rows per pooling load, score_cols: key blocks per score tile,
#                      score_dchunk: columns of D per score dot)
_BY_HEAD_DIM: Dict[Tuple[str, int], Tuple[int, int, int]] = {
    **{(arch, d): (8192 // d, 64, min(32, d)) for arch in ("sm80", "sm86", "sm89") for d in HEAD_DIMS},
    **{("sm90", d): (16384 // d, 64, min(32, d)) for d in HEAD_DIMS},
}


def default_config(spec: KernelSpec) -> dict:
    """Default tunables of the block map of ``spec`` on its arch.

    Keys: pool_rows (rows per pooling load, divides both blocks), pool_group (blocks per pooling program),
    pool_warps; score_rows (query blocks per select program, >= 16 for the dot), score_cols (key blocks per
    score tile), score_dchunk (columns of D per score dot), score_dot (input precision of the fp32 score
    dots: 'tf32x3' tensor cores or 'ieee' FMA), score_warps, score_stages; select_elems (scores
    per selection step: rows x next_pow2(T_n)); col_rows x col_cols (mask tile of the column-list kernel),
    col_warps.
    """
    if spec.head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={spec.head_dim} is not supported by the Triton block map; allowed: {HEAD_DIMS}")
    pool_cap, score_cols, score_dchunk = _BY_HEAD_DIM[(spec.arch, spec.head_dim)]
    return dict(_ARCH[spec.arch], pool_rows=min(spec.block_q, spec.block_k, pool_cap), score_cols=score_cols,
                score_dchunk=score_dchunk, score_dot="tf32x3")


def check_config(cfg: dict, spec: KernelSpec) -> None:
    def pow2(name, lo, hi):
        val = cfg[name]
        if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi or val & (val - 1):
            raise ValueError(f"config[{name!r}]={val!r} must be a power of two in [{lo}, {hi}]")

    unknown = set(cfg) - set(default_config(spec))
    if unknown:
        raise ValueError(f"config has unknown keys {sorted(unknown)}; allowed: {sorted(default_config(spec))}")
    pow2("pool_rows", 1, min(spec.block_q, spec.block_k))
    pow2("score_dchunk", 16, spec.head_dim)
    for name, lo, hi in (("score_rows", 16, 256), ("score_cols", 16, 256),
                         ("select_elems", 1, 1 << 17), ("col_rows", 1, 4096), ("col_cols", 1, 4096),
                         ("pool_warps", 1, 16), ("score_warps", 1, 16), ("col_warps", 1, 16)):
        pow2(name, lo, hi)
    if cfg["score_dot"] not in SCORE_DOTS:
        raise ValueError(f"config['score_dot']={cfg['score_dot']!r} is not supported; allowed: {', '.join(SCORE_DOTS)}")
    for name in ("pool_group", "score_stages"):
        val = cfg[name]
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"config[{name!r}]={val!r} must be a positive int")


def kernel_spec(q: torch.Tensor, block_q: int, block_k: int, has_negligible: bool) -> KernelSpec:
    """The block-map KernelSpec of a call (CPU tensors map to sm80, the interpreter's generic kernels)."""
    if q.dtype not in DTYPES:
        raise ValueError(f"q.dtype={q.dtype} is not supported; allowed: {', '.join(map(str, DTYPES))}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[-1]} is not supported by the Triton block map; allowed: {HEAD_DIMS}")
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(val, bool) or val not in BLOCK_SIZES:
            raise ValueError(f"{name}={val!r} is not supported; allowed: {', '.join(map(str, BLOCK_SIZES))}")
    return KernelSpec(arch=device_arch(q.device) or "sm80", head_dim=q.shape[-1], block_q=block_q,
                      block_k=block_k, feature_map=None, has_negligible=has_negligible, dtype=DTYPES[q.dtype],
                      role="block_map")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, n_crit: int, n_negl: int, t_n: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, L, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and D")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q and k must share dtype and device, got {q.dtype}/{q.device} and {k.dtype}/{k.device}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"q and k need unit stride on D, got strides {q.stride()} and {k.stride()}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Lq={q.shape[2]}, Lk={k.shape[2]}")
    if not 1 <= n_crit <= t_n:
        raise ValueError(f"n_crit={n_crit} must be in [1, T_n={t_n}]")
    if not 0 <= n_negl <= t_n - n_crit:
        raise ValueError(f"n_negl={n_negl} must be in [0, T_n - n_crit = {t_n - n_crit}]")


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def select_rows(cfg: dict, tn_pad: int) -> int:
    """Rows per selection step of select_kernel: select_elems // next_pow2(T_n), within [1, score_rows]."""
    return max(1, min(cfg["score_rows"], cfg["select_elems"] // tn_pad))


def _outputs(B: int, H: int, t_m: int, t_n: int, n_crit: int, n_negl: int, device) -> Tuple[torch.Tensor, ...]:
    """Uninitialised BlockMap tensors in the order of slagen.blockmap.LUT_FIELDS (every slot gets written)."""
    i32 = dict(dtype=torch.int32, device=device)
    return (torch.empty((B, H, t_m, t_n), dtype=torch.int8, device=device),
            torch.empty((B, H, t_m, n_crit), **i32), torch.empty((B, H, t_m), **i32),
            torch.empty((B, H, t_n, t_m), **i32), torch.empty((B, H, t_n), **i32),
            torch.empty((B, H, t_m, n_negl), **i32), torch.empty((B, H, t_m), **i32),
            torch.empty((B, H, t_n, t_m), **i32), torch.empty((B, H, t_n), **i32))


def _scratch(device, **shapes) -> Dict[str, torch.Tensor]:
    """fp32 work tensors of the given shapes, carved out of one allocation."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=device).split(sizes)
    return {name: t.view(shape) for (name, shape), t in zip(shapes.items(), flat)}


def block_map(q: torch.Tensor, k: torch.Tensor, n_crit: int, n_negl: int, block_q: int, block_k: int,
              config: Optional[dict] = None) -> Tuple[torch.Tensor, ...]:
    """The 9 BlockMap tensors (slagen.blockmap.LUT_FIELDS) of q (B, H, Lq, D) and k (B, H, Lk, D).

    n_crit key blocks per query block are critical and n_negl negligible (SLA.md §1); ``config`` overrides
    entries of :func:`default_config`. Returns mask int8 (B, H, T_m, T_n); crit_lut (B, H, T_m, n_crit),
    crit_count (B, H, T_m), crit_col_lut (B, H, T_n, T_m), crit_col_count (B, H, T_n), and the same four
    for the negligible class (negl_lut width n_negl), all int32 and contiguous.
    """
    t_n = num_blocks(k.shape[2], block_k) if k.dim() == 4 else 0
    _check_inputs(q, k, n_crit, n_negl, t_n)
    spec = kernel_spec(q, block_q, block_k, n_negl > 0)
    cfg = {**default_config(spec), **(config or {})}
    check_config(cfg, spec)
    B, H, Lq, D = q.shape
    Lk, t_m, bh = k.shape[2], num_blocks(Lq, block_q), B * H
    out = _outputs(B, H, t_m, t_n, n_crit, n_negl, q.device)
    if bh == 0:
        return out
    mask, crit_lut, crit_count, crit_col, crit_col_count, negl_lut, negl_count, negl_col, negl_col_count = out
    mod = codegen.load(spec, "triton")
    group, rows, tn_pad = cfg["pool_group"], cfg["score_rows"], _next_pow2(t_n)
    n_qg, n_parts, grid_m = -(-t_m // group), -(-t_n // group), -(-t_m // rows)
    work = _scratch(q.device, q_mean=(bh, t_m, D), k_mean=(bh, t_n, D), k_part=(bh, n_parts, D),
                    key_mean=(bh, grid_m, D), scores=(bh, t_m, t_n))
    mod.pool_kernel[(n_qg + n_parts, bh)](
        q, k, work["q_mean"], work["k_mean"], work["k_part"], *q.stride(), *k.stride(),
        H, Lq, Lk, t_m, t_n, n_qg, n_parts, ROWS=cfg["pool_rows"], GROUP=group, num_warps=cfg["pool_warps"])
    mod.select_kernel[(grid_m, bh)](
        work["q_mean"], work["k_mean"], work["k_part"], work["key_mean"], work["scores"],
        mask, crit_lut, crit_count, negl_lut, negl_count, Lk, t_m, t_n, n_parts, n_crit, n_negl,
        ROWS=rows, COLS=cfg["score_cols"], DCHUNK=cfg["score_dchunk"], DOT=cfg["score_dot"],
        SEL_ROWS=select_rows(cfg, tn_pad), TN_PAD=tn_pad,
        num_warps=cfg["score_warps"], num_stages=cfg["score_stages"])
    cols = min(cfg["col_cols"], tn_pad)
    mod.column_kernel[(-(-t_n // cols), bh)](
        mask, crit_col, crit_col_count, negl_col, negl_col_count, t_m, t_n,
        ROWS=cfg["col_rows"], COLS=cols, num_warps=cfg["col_warps"])
    return out
