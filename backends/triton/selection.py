"""Glue of the Triton block map (templates/triton/block_map.py.j2): spec, tunables, launches.

Four launches per call, all accumulating in fp32 whatever the input dtype, no atomics (deterministic):
  1. ``pool_kernel``, 1-D grid ((n_kprog + n_qprog) * B·H): block means q̄ (T_m, D), k̄ (T_n, D) and the
     row sums of ``n_kprog <= pool_kprogs`` key groups per (b, h), read once from q and k. The key programs
     (ceil(T_n / n_kprog) blocks each) are first in the grid; then ``pool_qgroup`` query blocks per program.
     A caller that pooled already (the TileLang backend, whose pre-pass pools K and Q as it reads K) passes
     ``pooled`` = (q̄, k̄, key group sums) and this launch does not run.
  2. ``scores_kernel``, grid (tiles, B·H): key mean from the group sums, S = q̄ (k̄ − mean K)ᵀ per
     (score_rows x score_cols) tile (fp32), stored as its order-preserving int32 image in a scratch
     (B·H, T_m, ld), rows padded to ld = T_n rounded up to 16 with INT32_MIN.
  3. ``select_kernel``, grid (ceil(T_m / select_rows), B·H), one warp per program: one row at a time,
     read in chunks of ``select_chunk`` keys once per pass (L1 after the first): an exact radix select of
     both thresholds at once on the int32 keys (early exit once both are isolated; ties: smaller key index
     first), then one more read giving the int8 mask, the row lists (ascending, via prefix sums) and their
     counts. Every reduction is within the warp; registers do not depend on T_n.
     With ``marginal`` (:class:`MarginalOperands`) the scores' grid has a program per column of tiles more,
     which sums the linear z terms of its key blocks, and each selection row writes the mask GEMM's 0/1
     operand row and Z_i (the head's z total minus its critical and negligible blocks' terms, gathered
     through the row lists just written); :func:`marginal_operands` forms the same for a given map.
  4. ``column_kernel``, grid (ceil(T_n / col_cols), B·H): column lists of both classes from the mask
     (prefix sums down the columns), -1 padded, and their counts.
A call's checks, config, extents and grids are resolved once per input layout (:func:`_plan_of`,
slagen.backends.plans) and its launches relaunch the compiled kernels (slagen.backends.triton.launch).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from slagen import codegen
from slagen.blockmap import no_columns
from slagen.backends import plans
from slagen.backends.triton import HEAD_DIMS, launch
from slagen.dispatch import device_arch
from slagen.reference import num_blocks
from slagen.spec import BLOCK_SIZES, KernelSpec

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
Pooled = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # (q̄, k̄, key group sums), see block_map
SCORE_DOTS = ("tf32x3", "ieee")  # plain tf32 (~1e-3 relative) would reorder blocks far from ties

# Tunables per arch. Shared memory is not the limit (pooling stages 16 KB per block in flight, the score
# dots score_dchunk columns of D per operand). Registers are (ptxas -v of the d=128 kernels, Triton 3.9 /
# 3.6, see tests/test_triton_blockmap.py): pooling 94 / 80 (4 warps, 64 elements per thread per load),
# scores 123 on sm90 (64x64 tile, 4 warps, wgmma; 212 / 216 with 128x128 and 8 warps; sm80's mma: 64x128, 203),
# selection 128 / 167 on sm90 with the negligible class, 80 / 113 without (one warp, rows of up to 512
# keys in registers), columns 108 / 80; none spills.
# pool_kprogs 64 rather than 32 (H200, headline shape, interleaved rounds, session 13): pool 0.0703 -> 0.0687 ms.
# sm90 scores in 64x64 tiles of 4 warps (H200, headline shape, CUDA graph of 20 launches, session 18): 11.9 us
# against 14.5 for 128x128 / 8 warps; 22.8 for 64x64 / 8 warps, 13.0 with score_dchunk 64, 32.1 with 'ieee' dots.
# select_maxnreg: the selection that also writes the marginal-block operands (MarginalOperands) needs 96
# registers by ptxas's choice (d 128, no negligible class), 80 without spilling under the cap, as the plain
# selection: 25 one-warp programs per SM instead of 21, one wave for 3072 rows on 132 SMs. Its time did not
# change (H200, headline shape: 17.4 vs 17.9 us; the gather's L2 traffic bounds it, session 24).
_COMMON = dict(pool_warps=4, pool_stages=2, pool_kprogs=64, score_rows=128, score_cols=128, score_warps=8,
               score_stages=1, score_parts=32, select_rows=1, select_chunk=512, select_maxnreg=80, col_rows=64,
               col_cols=16, col_warps=4)
_ARCH = {"sm90": dict(_COMMON, score_rows=64, score_cols=64, score_warps=4),
         **{arch: dict(_COMMON, score_rows=64) for arch in ("sm80", "sm86", "sm89")}}
# (arch, head_dim) -> (pool_rows cap: rows per pooling load, score_dchunk: columns of D per score dot)
_BY_HEAD_DIM: Dict[Tuple[str, int], Tuple[int, int]] = {
    (arch, d): (8192 // d, min(32, d)) for arch in _ARCH for d in HEAD_DIMS}
# rows of queries per pooling program (pool_qgroup = this // block_q, at least 1)
_POOL_Q_ROWS = 128


def default_config(spec: KernelSpec) -> dict:
    """Default tunables of the block map of ``spec`` on its arch.

    Keys: pool_rows (rows per pooling load, divides both blocks), pool_qgroup (query blocks per pooling
    program), pool_kprogs (at most this many key-pooling programs per (b, h); their group sums give the key
    mean), pool_warps, pool_stages (blocks of a pooling program in flight: cp.async pipelining of its block
    loop); score_rows x score_cols (score tile per program, >= 16 for the dot), score_dchunk
    (columns of D per score dot), score_dot (input precision of the fp32 score dots: 'tf32x3' tensor
    cores or 'ieee' FMA), score_parts (group sums per load of the key mean), score_warps, score_stages;
    select_rows (query-block rows per selection program, one after the other), select_chunk (keys per
    load of the one-warp selection program, 32..1024; a row of up to this many stays in registers);
    select_maxnreg (register cap of the selection launch that also writes marginal operands, a multiple of
    8 in [32, 255], or None: ptxas's choice; the default 80 fits select_chunk 512 without the negligible
    class, None with it; a larger chunk needs a larger cap or None);
    col_rows x col_cols (mask tile of the column-list kernel, col_cols key blocks per program), col_warps.
    """
    if spec.head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={spec.head_dim} is not supported by the Triton block map; allowed: {HEAD_DIMS}")
    pool_cap, score_dchunk = _BY_HEAD_DIM[(spec.arch, spec.head_dim)]
    cfg = dict(_ARCH[spec.arch], pool_rows=min(spec.block_q, spec.block_k, pool_cap),
               pool_qgroup=max(1, _POOL_Q_ROWS // spec.block_q), score_dchunk=score_dchunk, score_dot="tf32x3")
    if spec.has_negligible:
        cfg["select_maxnreg"] = None
    return cfg


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
    for name, lo, hi in (("score_rows", 16, 256), ("score_cols", 16, 256), ("score_parts", 1, 1024),
                         ("select_chunk", 32, 1024), ("col_rows", 1, 4096), ("col_cols", 1, 4096),
                         ("pool_warps", 1, 16), ("score_warps", 1, 16), ("col_warps", 1, 16)):
        pow2(name, lo, hi)
    if cfg["score_dot"] not in SCORE_DOTS:
        raise ValueError(f"config['score_dot']={cfg['score_dot']!r} is not supported; allowed: {', '.join(SCORE_DOTS)}")
    cap = cfg["select_maxnreg"]
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or not 32 <= cap <= 255 or cap % 8):
        raise ValueError(f"config['select_maxnreg']={cap!r} must be None or a multiple of 8 in [32, 255]")
    for name in ("pool_qgroup", "pool_kprogs", "pool_stages", "score_stages", "select_rows"):
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
    return KernelSpec.of(arch=device_arch(q.device) or "sm80", head_dim=q.shape[-1], block_q=block_q,
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


def _outputs(B: int, H: int, t_m: int, t_n: int, n_crit: int, n_negl: int, device,
             columns: bool = True) -> Tuple[torch.Tensor, ...]:
    """Uninitialised BlockMap tensors in the order of slagen.blockmap.LUT_FIELDS (every slot gets written;
    without ``columns`` the column tables are slagen.blockmap.no_columns stand-ins)."""
    i32 = dict(dtype=torch.int32, device=device)
    mask = torch.empty((B, H, t_m, t_n), dtype=torch.int8, device=device)
    if columns:
        cols = (torch.empty((B, H, t_n, t_m), **i32), torch.empty((B, H, t_n), **i32),
                torch.empty((B, H, t_n, t_m if n_negl else 0), **i32), torch.empty((B, H, t_n), **i32))
    else:
        cols = no_columns(mask)
    return (mask, torch.empty((B, H, t_m, n_crit), **i32), torch.empty((B, H, t_m), **i32), *cols[:2],
            torch.empty((B, H, t_m, n_negl), **i32), torch.empty((B, H, t_m), **i32), *cols[2:])


def _scratch(device, **shapes) -> Dict[str, torch.Tensor]:
    """fp32 work tensors of the given shapes, carved out of one allocation."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=device).split(sizes)
    return {name: t.view(shape) for (name, shape), t in zip(shapes.items(), flat)}


@dataclasses.dataclass(frozen=True)
class _Plan(plans.Plan):
    """What a block-map call's shapes, strides, dtype, device, counts, blocks and config decide: the checked
    spec and config, the extents and grids (see :func:`_plan_of`)."""
    cfg: dict
    mod: Any
    B: int
    H: int
    t_m: int
    t_n: int
    pool_grid: Tuple[int, ...]
    pool_args: Tuple[int, ...]       # the pool kernel's integer arguments after its five pointers
    score_grid: Tuple[int, ...]
    n_kprog: int
    n_tiles_n: int
    ld: int
    select_grid: Tuple[int, ...]
    column_grid: Tuple[int, ...]
    column_cols: int


_PLANS: plans.Plans[_Plan] = plans.Plans()


def _plan_of(q: torch.Tensor, k: torch.Tensor, n_crit: int, n_negl: int, block_q: int, block_k: int,
             config, columns: bool) -> _Plan:
    """The plan of a call (slagen.backends.plans), built and checked once per process for each key: q's and
    k's layouts, the counts, blocks, config and ``columns`` (everything the checks, the grids and Triton's
    specialisation of the launches depend on)."""
    return _PLANS.get(lambda: (plans.layout(q), plans.layout(k), n_crit, n_negl, block_q, block_k,
                               plans.config_key(config), bool(columns)),
                      lambda key: _build_plan(key, q, k, n_crit, n_negl, block_q, block_k, config, columns))


def _build_plan(key: Optional[tuple], q: torch.Tensor, k: torch.Tensor, n_crit: int, n_negl: int, block_q: int,
                block_k: int, config, columns: bool) -> _Plan:
    t_n = num_blocks(k.shape[2], block_k) if k.dim() == 4 else 0
    _check_inputs(q, k, n_crit, n_negl, t_n)
    spec = kernel_spec(q, block_q, block_k, n_negl > 0)
    if config is plans.TUNED:
        from slagen.backends import triton as triton_backend
        config = triton_backend.tuned_config(sys.modules[__name__], spec, q, k.shape[-2], n_crit / t_n)
    cfg = {**default_config(spec), **(config or {})}
    check_config(cfg, spec)
    B, H, Lq, D = q.shape
    Lk, t_m, bh = k.shape[2], num_blocks(Lq, block_q), B * H
    q_per = cfg["pool_qgroup"]
    k_per = -(-t_n // min(cfg["pool_kprogs"], t_n))
    n_qprog, n_kprog = -(-t_m // q_per), -(-t_n // k_per)
    n_tiles_m, n_tiles_n = -(-t_m // cfg["score_rows"]), -(-t_n // cfg["score_cols"])
    cols = min(cfg["col_cols"], _next_pow2(t_n))
    return _Plan(key=key, cfg=cfg, mod=codegen.load(spec, "triton"), B=B, H=H, t_m=t_m, t_n=t_n,
                 pool_grid=((n_kprog + n_qprog) * bh,),
                 pool_args=(*q.stride(), *k.stride(), bh, H, Lq, Lk, t_m, t_n, q_per, k_per, n_qprog, n_kprog),
                 score_grid=(n_tiles_m * n_tiles_n, bh), n_kprog=n_kprog, n_tiles_n=n_tiles_n,
                 ld=-(-t_n // 16) * 16,  # key rows padded to 16 (INT32_MIN) for 16-byte loads
                 select_grid=(-(-t_m // cfg["select_rows"]), bh), column_grid=(-(-t_n // cols), bh),
                 column_cols=cols)


@dataclasses.dataclass(frozen=True)
class MarginalOperands:
    """The linear branch's marginal-block operands that a block map may form as it selects (scope 'marginal',
    a caller whose z terms exist before the map: the TileLang backend's early pre-pass), or
    :func:`marginal_operands` for a given map, in place of a separate operand kernel and z GEMM
    (slagen.backends.linear_terms.marginal_sums' ``operands``).

    z_terms (B, H, z_rows, D) fp32, contiguous: the per-unit z_t, ``per_block`` consecutive units per key
    block, rows past the last key zero. Written by the map: sel (B, H, T_m, k_cols), k_cols >= T_n, contiguous,
    in the mask GEMM's operand dtype: 1 on each row's marginal blocks, 0 elsewhere and past T_n; z_sums
    (B, H, T_m, D) fp32, contiguous: Σ_{marginal j} z_j (the head's total minus the critical and negligible
    blocks' terms, gathered through the row lists; exactly 0 for a row without marginal blocks)."""
    z_terms: torch.Tensor
    per_block: int
    sel: torch.Tensor
    z_sums: torch.Tensor

    def layout(self) -> tuple:
        """What the launches specialise on (part of their relaunch keys)."""
        return (plans.layout(self.z_terms), self.per_block, plans.layout(self.sel), plans.layout(self.z_sums))


def _check_marginal(m: MarginalOperands, p: _Plan, d: int, device: torch.device) -> None:
    """Raise ValueError unless ``m`` fits a map of plan ``p`` on ``device``."""
    lead = (p.B, p.H)
    checks = (("z_terms", m.z_terms, torch.float32, m.z_terms.dim() == 4 and m.z_terms.shape[:2] == lead
               and m.z_terms.shape[-1] == d and m.z_terms.shape[2] >= 1),
              ("sel", m.sel, None, m.sel.dim() == 4 and m.sel.shape[:3] == (*lead, p.t_m) and m.sel.shape[3] >= p.t_n
               and m.sel.dtype in (torch.bfloat16, torch.float16, torch.float32)),
              ("z_sums", m.z_sums, torch.float32, tuple(m.z_sums.shape) == (*lead, p.t_m, d)))
    for name, t, dtype, shape_ok in checks:
        if not (shape_ok and (dtype is None or t.dtype == dtype) and t.is_contiguous() and t.device == device):
            raise ValueError(f"marginal operands: {name} ({t.dtype} {tuple(t.shape)} on {t.device}) must be "
                             f"contiguous on {device} as MarginalOperands describes for B={p.B}, H={p.H}, "
                             f"T_m={p.t_m}, T_n={p.t_n}, D={d}")
    if not (isinstance(m.per_block, int) and m.per_block >= 1):
        raise ValueError(f"marginal operands: per_block={m.per_block!r} must be an int >= 1")


def _operand_rows_cap(cfg: dict) -> dict:
    """The launch option of the one-warp programs that write marginal operands (the selection with them,
    marginal_rows_kernel): config select_maxnreg as ptxas's register cap, or none."""
    return {} if cfg["select_maxnreg"] is None else dict(maxnreg=cfg["select_maxnreg"])


def plan(q: torch.Tensor, k: torch.Tensor, n_crit: int, n_negl: int, block_q: int, block_k: int,
         config: Optional[dict] = None, columns: bool = True, pooled: Optional[Pooled] = None,
         marginal: Optional[MarginalOperands] = None) -> Tuple[Tuple[torch.Tensor, ...],
                                                                List[Tuple[str, Callable[[], None]]]]:
    """Allocate the outputs and scratch of a block map and return (outputs, launches): the 9 BlockMap
    tensors (uninitialised until the launches ran) and the four kernel launches in order, as
    (name, zero-argument callable) pairs (names pool, scores, select, column; without ``columns`` the column
    tables are zero-size stand-ins and the column launch is left out; with ``pooled`` the pool launch is left
    out and the scores read those sums; with ``marginal`` the scores and selection also write its operands,
    see :func:`block_map`). tools/bench_blockmap.py times them one by one; :func:`block_map` runs them."""
    p = _plan_of(q, k, n_crit, n_negl, block_q, block_k, config, columns)
    out = _outputs(p.B, p.H, p.t_m, p.t_n, n_crit, n_negl, q.device, columns)
    bh = p.B * p.H
    cfg, mod, D = p.cfg, p.mod, q.shape[-1]
    if marginal is not None:
        _check_marginal(marginal, p, D, q.device)
    if bh == 0:
        return out, []
    mask, crit_lut, crit_count, crit_col, crit_col_count, negl_lut, negl_count, negl_col, negl_col_count = out
    sums = dict(z_part=(bh, p.n_tiles_n, D)) if marginal is not None else {}
    if pooled is None:
        work = _scratch(q.device, q_mean=(bh, p.t_m, D), k_mean=(bh, p.t_n, D), k_part=(bh, p.n_kprog, D),
                        keys=(bh, p.t_m, p.ld), **sums)
        n_parts = p.n_kprog
    else:
        work = dict(zip(("q_mean", "k_mean", "k_part"), _check_pooled(pooled, p, D, q.device)))
        work.update(_scratch(q.device, keys=(bh, p.t_m, p.ld), **sums))
        n_parts = work["k_part"].shape[-2]
    keys = work["keys"].view(torch.int32)  # the scores' order-preserving int32 image
    if marginal is None:   # stand-ins for the pointers SUMS leaves unread
        m_args, m_key = (keys, keys, keys, keys), ()
        z_rows = k_cols = per_block = 1
    else:
        m_args, m_key = (marginal.sel, marginal.z_terms, work["z_part"], marginal.z_sums), marginal.layout()
        z_rows, k_cols, per_block = marginal.z_terms.shape[2], marginal.sel.shape[3], marginal.per_block

    score_grid = p.score_grid if marginal is None else (p.score_grid[0] + p.n_tiles_n, bh)
    select_cap = _operand_rows_cap(cfg) if marginal is not None else {}

    def launch_key(name):
        key = p.launch_key(name)
        return None if key is None else (key, m_key)

    def pool():
        launch.of(mod, "pool_kernel")(
            p.launch_key("pool"), p.pool_grid,
            (q, k, work["q_mean"], work["k_mean"], work["k_part"], *p.pool_args),
            ROWS=cfg["pool_rows"], STAGES=cfg["pool_stages"], num_warps=cfg["pool_warps"],
            num_stages=cfg["pool_stages"])

    def scores():
        launch.of(mod, "scores_kernel")(
            launch_key("scores"), score_grid,
            (work["q_mean"], work["k_mean"], work["k_part"], keys, m_args[1], m_args[2], k.shape[2], p.t_m, p.t_n,
             p.ld, n_parts, p.n_tiles_n, z_rows, per_block),
            BM=cfg["score_rows"], BN=cfg["score_cols"], DCHUNK=cfg["score_dchunk"], DOT=cfg["score_dot"],
            PARTS=cfg["score_parts"], SUMS=marginal is not None, num_warps=cfg["score_warps"],
            num_stages=cfg["score_stages"])

    def select():
        launch.of(mod, "select_kernel")(
            launch_key("select"), p.select_grid,
            (keys, mask, crit_lut, crit_count, negl_lut, negl_count, *m_args, p.t_m, p.t_n, p.ld, n_crit, n_negl,
             k_cols, z_rows, per_block, p.n_tiles_n),
            ROWS=cfg["select_rows"], CH=cfg["select_chunk"], SUMS=marginal is not None, num_warps=1, **select_cap)

    def column():
        launch.of(mod, "column_kernel")(
            p.launch_key("column"), p.column_grid,
            (mask, crit_col, crit_col_count, negl_col, negl_col_count, p.t_m, p.t_n),
            ROWS=cfg["col_rows"], COLS=p.column_cols, num_warps=cfg["col_warps"])

    launches = ([] if pooled is not None else [("pool", pool)]) + [("scores", scores), ("select", select)]
    return out, launches + [("column", column)] if columns else launches


def _check_pooled(pooled: Pooled, p: _Plan, d: int, device: torch.device) -> Pooled:
    """``pooled`` as the scores kernel reads it, checked: fp32, contiguous, on q's ``device``, q̄ (B, H, T_m, D),
    k̄ (B, H, T_n, D), the key group sums (B, H, n_parts >= 1, D)."""
    want = ((p.B, p.H, p.t_m, d), (p.B, p.H, p.t_n, d), (p.B, p.H, None, d))
    for name, t, shape in zip(("q_mean", "k_mean", "k_part"), pooled, want):
        ok = (t.dtype == torch.float32 and t.device == device and t.is_contiguous() and t.dim() == 4
              and t.shape[-2] >= 1
              and all(w is None or w == n for w, n in zip(shape, t.shape)))
        if not ok:
            raise ValueError(f"pooled {name} must be a contiguous float32 tensor of shape {shape} (None: any >= 1) "
                             f"on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return pooled


def marginal_operands(q: torch.Tensor, k: torch.Tensor, maps: Sequence[torch.Tensor], block_q: int, block_k: int,
                      marginal: MarginalOperands, config=plans.TUNED) -> None:
    """Write ``marginal``'s operands for a map given to a forward (the 9 BlockMap tensors ``maps`` of q and k):
    the block map's scores and selection would have written them with the same helpers and launch widths of
    the same ``config`` (two launches: the z parts, then one one-warp program per row), so a call given
    ``block_map(q, k)`` and a call that builds it get the same bits."""
    n_crit, n_negl = maps[1].shape[-1], maps[5].shape[-1]
    p = _plan_of(q, k, n_crit, n_negl, block_q, block_k, config, False)
    cfg, mod, D, bh = p.cfg, p.mod, q.shape[-1], p.B * p.H
    _check_marginal(marginal, p, D, q.device)
    if bh == 0 or p.t_m == 0:
        return
    mask, crit_lut, crit_count, negl_lut, negl_count = (maps[i].contiguous() for i in (0, 1, 2, 5, 6))
    z_part = torch.empty((bh, p.n_tiles_n, D), dtype=torch.float32, device=q.device)
    key = p.launch_key("given marginal")
    if key is not None:
        key = (key, marginal.layout(), *(plans.layout(t) for t in (mask, crit_lut, crit_count, negl_lut, negl_count)))
    z_rows, k_cols = marginal.z_terms.shape[2], marginal.sel.shape[3]
    launch.of(mod, "z_part_kernel")(
        key, (p.n_tiles_n, bh), (marginal.z_terms, z_part, z_rows, marginal.per_block, p.n_tiles_n),
        BN=cfg["score_cols"], num_warps=cfg["score_warps"], num_stages=cfg["score_stages"])
    launch.of(mod, "marginal_rows_kernel")(
        key, p.select_grid,
        (mask, crit_lut, crit_count, negl_lut, negl_count, marginal.sel, marginal.z_terms, z_part, marginal.z_sums,
         p.t_m, p.t_n, n_crit, n_negl, k_cols, z_rows, marginal.per_block, p.n_tiles_n),
        ROWS=cfg["select_rows"], CH=cfg["select_chunk"], num_warps=1, **_operand_rows_cap(cfg))


def block_map(q: torch.Tensor, k: torch.Tensor, n_crit: int, n_negl: int, block_q: int, block_k: int,
              config: Optional[dict] = None, columns: bool = True, pooled: Optional[Pooled] = None,
              marginal: Optional[MarginalOperands] = None) -> Tuple[torch.Tensor, ...]:
    """The 9 BlockMap tensors (slagen.blockmap.LUT_FIELDS) of q (B, H, Lq, D) and k (B, H, Lk, D).

    n_crit key blocks per query block are critical and n_negl negligible (SLA.md §1); ``config`` overrides
    entries of :func:`default_config` (slagen.backends.plans.TUNED: the tuned config of this GPU and shape, if any).
    Returns mask int8 (B, H, T_m, T_n); crit_lut (B, H, T_m, n_crit),
    crit_count (B, H, T_m), crit_col_lut (B, H, T_n, T_m), crit_col_count (B, H, T_n), and the same four
    for the negligible class (negl_lut width n_negl), all int32 and contiguous. Without ``columns`` the four
    column tables are zero-size stand-ins (slagen.blockmap.no_columns) and their launch does not run.
    ``pooled``: (q̄ (B, H, T_m, D), k̄ (B, H, T_n, D), key group sums (B, H, n, D)), fp32, from a caller that pooled
    q and k already (then only the scores, selection and column kernels run); the key mean is the group sums'
    total over Lk, so any grouping of the keys serves. ``marginal``: the linear branch's marginal-block operands
    to write as well (:class:`MarginalOperands`; no extra launch).
    """
    out, launches = plan(q, k, n_crit, n_negl, block_q, block_k, config, columns, pooled, marginal)
    for _, run in launches:
        run()
    return out
