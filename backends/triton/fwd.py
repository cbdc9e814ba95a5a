"""Glue of the Triton SLA forward (templates/triton/forward.py.j2): spec, tunables, launches.

Two launches per call (one without a linear branch), plus torch GEMMs for scope 'marginal' with 'gemm':
  1. ``sla_linear_totals_kernel`` (linear branch only), grid (n_chunks, B·H): per-chunk partials of the
     per-head totals H = Σ_all keys φ(K)ᵀV (D×D) and Z = Σ φ(K) (D), fp32; summed over chunks here
     (deterministic, no atomics). Scope 'marginal' with config['marginal'] = 'gemm' (the default): the
     chunks are whole key blocks and the kernel also writes every block's h_j = φ(K_j)ᵀV_j and z_j.
  2. 'gemm' only: slagen.backends.linear_terms.excluded_sums — one batched GEMM of the class mask's
     excluded (critical + negligible) blocks against the stacked h_j gives ΔH_i = Σ_{j excluded} h_j (fp32)
     for every query block, and Z_i = Z − Σ z_j (the TileLang backend's formulation, shared code).
  3. config['epilogue'] = 'split' (not with marginal='onchip'; the default is 'lowp' on sm90, 'fused'
     elsewhere): ``sla_linear_kernel``, grid (ceil(Lq / 64), B·H): the linear branch alone, ADD = Proj(O^l)
     (fp32, B·H·Lq·D: 201 MB at the headline shape), plus O^l and den when saving for the backward.
  4. ``sla_forward_kernel``, grid (ceil(Lq / tile_m), B·H): sparse branch over the critical blocks, then
     'split': O = O^s + ADD; 'lowp': O = O^s + Proj(φ(Q_i)H_i / den) with H_i formed in the glue (one
     input-dtype MMA); 'fused': the linear epilogue from the totals in the same kernel — scope
     'marginal': H_i = H − ΔH_i ('gemm': the key loop is scope 'all''s, negligible blocks cost nothing) or
     on-chip corrections φ(Q_i)φ(K_j)ᵀV_j of the critical and negligible tiles ('onchip': no temporaries,
     twice the loop's MMAs) — and Proj; one store of O. 'split' keeps the fused epilogue's registers (255 per
     thread with spills at D = 128 on sm90) out of the key loop's kernel, but its own kernel is slower than
     what it saves on an H200 (headline shape, scope 'all': 0.52 ms vs 0.29 ms of fused epilogue).
A call's checks, spec and config are resolved once per input layout (:func:`_forward_plan`,
slagen.backends.plans) and its launches relaunch the compiled kernels (slagen.backends.triton.launch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Dict, Optional, Tuple

import torch

from slagen import codegen
from slagen.backends import call_spec, check_forward_inputs, linear_terms, plans, wait_for_maps
from slagen.backends.triton import launch as triton_launch
from slagen.dispatch import device_arch
from slagen.spec import KernelSpec

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FP32_DOTS = ("tf32", "tf32x3", "ieee")
MARGINAL_MODES = ("gemm", "onchip")
EPILOGUES = ("fused", "split", "lowp")
_LIN_TILE = 64     # query rows per program of sla_linear_kernel (at most block_q)

# Default tunables per (arch, head_dim), chosen from offline compiles (shared memory, registers, spills
# inside the key loop): (tile_m, tile_n, num_warps, num_stages, epi_k, pre_warps). Shared memory: sm80
# ~163 KB, sm86/sm89 ~99 KB, sm90 ~227 KB. sm90 reads the D×D epilogue operands from shared memory (wider
# epi_k); mma.sync archs hold them in registers.
_TABLE: Dict[Tuple[str, int], Tuple[int, int, int, int, int, int]] = {
    ("sm80", 16): (128, 64, 4, 3, 16, 4), ("sm80", 32): (128, 64, 8, 3, 32, 4),
    ("sm80", 64): (128, 64, 8, 3, 16, 4), ("sm80", 128): (128, 64, 8, 3, 16, 8),
    ("sm86", 16): (128, 64, 4, 3, 16, 4), ("sm86", 32): (128, 64, 8, 3, 32, 4),
    ("sm86", 64): (128, 64, 8, 3, 16, 4), ("sm86", 128): (128, 64, 8, 2, 16, 8),
    ("sm89", 16): (128, 64, 4, 3, 16, 4), ("sm89", 32): (128, 64, 8, 3, 32, 4),
    ("sm89", 64): (128, 64, 8, 3, 16, 4), ("sm89", 128): (128, 64, 8, 2, 16, 8),
    ("sm90", 16): (128, 64, 4, 3, 16, 4), ("sm90", 32): (128, 64, 8, 3, 32, 4),
    ("sm90", 64): (128, 64, 8, 3, 16, 4), ("sm90", 128): (128, 64, 8, 3, 32, 8),
}
# With scope 'marginal' and marginal='onchip' the corrections double the loop's MMAs and live accumulators:
# at D=128 a 32-key tile keeps the loop free of register spills ('gemm' runs scope 'all''s loop).
_MARGINAL_TILE_N = {128: 32}


def _gemm_marginal(spec: KernelSpec, cfg: dict) -> bool:
    return spec.feature_map is not None and spec.scope == "marginal" and cfg["marginal"] == "gemm"


def default_config(spec: KernelSpec, marginal: Optional[str] = None, epilogue: Optional[str] = None) -> dict:
    """Default tunables of ``spec``'s forward on its arch (for marginal mode ``marginal``, default 'gemm', and
    the linear epilogue ``epilogue``, default per arch as below: both change other defaults).

    Keys: tile_m / tile_n (query rows / keys per tile of the main kernel, powers of two dividing block_q /
    block_k, or for tile_n also 2·block_k ≤ 128: two listed key blocks side by side per tile), num_warps,
    num_stages (main kernel), epi_k (columns of φ(Q) per step of the linear epilogue),
    pre_tile / pre_warps / pre_stages / pre_per_sm (pre-pass: key rows per step, warps, software-pipeline
    stages, programs per SM over all heads), fp32_dot (precision of the fp32 dots
    φ(Q)·H and O^l·Wᵀ: 'tf32' | 'tf32x3' | 'ieee'), marginal (scope 'marginal' only, ignored otherwise:
    'gemm' — excluded-block sums ΔH_i from one batched GEMM, the key loop of scope 'all'; temporaries per
    head: T_n·D² h_j in the input dtype and T_m·D² fp32 ΔH, ~420 MB at B·H = 12, L = 32760, D = 128, bf16,
    128×64 blocks; 'onchip' — corrections inside the key loop: no temporaries, twice the loop's MMAs),
    epilogue (linear branch only: 'fused' — in the main kernel's epilogue, fp32 (tf32) chunks of φ(Q)·H_i;
    'split' — a separate kernel computes Proj(O^l) into an fp32 temporary that the main kernel adds;
    'lowp' — the glue forms H_i (marginal blocks' h_j summed by a mask
    GEMM, or the per-head H) in the input dtype and the epilogue is one MMA over D with input-dtype operands
    and fp32 accumulation, as the TileLang backend does; 'split' and 'lowp' need marginal='gemm'). The
    default epilogue is 'lowp' on sm90 in bf16/fp16 (H200, headline shape: 1.48 vs 1.76 ms fused,
    docs/perf-notes.md), 'fused' elsewhere (not measured there); pre_stages is 3 on sm90 (1.449 vs 1.480 ms
    with 2, same run), 2 elsewhere; on sm90 16-bit at D = 128, scope 'marginal' with 'gemm' and 'lowp', the
    pre-pass (no per-head totals there) runs 4 warps and 4 programs per SM (1.370 vs 1.427 ms with 8 and 2,
    `slagen tune`, session 4).
    """
    mode = marginal if marginal in MARGINAL_MODES else MARGINAL_MODES[0]
    tile_m, tile_n, warps, stages, epi_k, pre_warps = _TABLE[(spec.arch, spec.head_dim)]
    pre_tile = 64
    linear_marginal = spec.feature_map is not None and spec.scope == "marginal"
    if linear_marginal and mode == "onchip":
        tile_n = _MARGINAL_TILE_N.get(spec.head_dim, tile_n)
    if spec.dtype == "fp32":          # fp32 operands need twice the shared memory and registers
        tile_m, tile_n, pre_tile = tile_m // 2, max(tile_n // 2, 16), pre_tile // 2
    if linear_marginal and mode == "gemm":
        pre_tile = min(pre_tile, spec.block_k)    # the pre-pass steps through whole key blocks
    hopper_16bit = spec.arch == "sm90" and spec.dtype != "fp32"    # where 'lowp' and pre_stages 3 were measured
    default_epilogue = "lowp" if hopper_16bit and mode == "gemm" else "fused"
    epi = epilogue if epilogue in EPILOGUES else default_epilogue
    # sm90 16-bit 'lowp' marginal at D = 128: the pre-pass keeps no running total (h_j only): 4 warps (it
    # spills 76 bytes, some inside its loop, and is still the faster one), 4 programs per SM
    lean_prepass = hopper_16bit and linear_marginal and mode == "gemm" and epi == "lowp" and spec.head_dim == 128
    tile_m = min(tile_m, spec.block_q)
    # at most 16 query rows per warp: a 64-row tile (block_q = 64) runs 4 warps (H200, 64x64 blocks, headline
    # shape, SLA marginal forward: 1.458 ms with 4 vs 2.334 ms with 8, `slagen tune`, session 4)
    warps = min(warps, max(tile_m // 16, 1))
    return dict(tile_m=tile_m, tile_n=min(tile_n, spec.block_k), num_warps=warps,
                num_stages=stages, epi_k=min(epi_k, spec.head_dim), pre_tile=pre_tile,
                pre_warps=4 if lean_prepass else pre_warps, fp32_dot="tf32", marginal=mode, epilogue=default_epilogue,
                pre_stages=3 if hopper_16bit else 2, pre_per_sm=4 if lean_prepass else 2)


def check_config(cfg: dict, spec: KernelSpec) -> None:
    """Raise ValueError naming the first invalid tunable of ``cfg`` (keys of :func:`default_config`)."""
    def pow2(name, lo, hi):
        val = cfg[name]
        if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi or val & (val - 1):
            raise ValueError(f"config[{name!r}]={val!r} must be a power of two in [{lo}, {hi}]")

    allowed = set(default_config(spec))
    if set(cfg) != allowed:
        raise ValueError(f"config has unknown keys {sorted(set(cfg) - allowed)} / lacks keys "
                         f"{sorted(allowed - set(cfg))}; keys: {sorted(allowed)}")
    pow2("tile_m", 16, spec.block_q)
    pow2("tile_n", 16, max(spec.block_k, min(2 * spec.block_k, 128)))   # above block_k: blocks side by side
    pow2("epi_k", 8, spec.head_dim)
    pow2("pre_tile", 16, 256)
    pow2("num_warps", 1, 16)
    pow2("pre_warps", 1, 16)
    pow2("pre_per_sm", 1, 64)
    for name in ("num_stages", "pre_stages"):
        if isinstance(cfg[name], bool) or not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ValueError(f"config[{name!r}]={cfg[name]!r} must be a positive int")
    if cfg["fp32_dot"] not in FP32_DOTS:
        raise ValueError(f"config['fp32_dot']={cfg['fp32_dot']!r} is not supported; allowed: {', '.join(FP32_DOTS)}")
    if cfg["marginal"] not in MARGINAL_MODES:
        raise ValueError(f"config['marginal']={cfg['marginal']!r} is not supported; allowed: "
                         f"{', '.join(MARGINAL_MODES)}")
    if cfg["epilogue"] not in EPILOGUES:
        raise ValueError(f"config['epilogue']={cfg['epilogue']!r} is not supported; allowed: {', '.join(EPILOGUES)}")
    if cfg["epilogue"] != "fused" and spec.scope == "marginal" and cfg["marginal"] != "gemm":
        raise ValueError(f"config['epilogue']={cfg['epilogue']!r} reads the linear terms formed by the mask GEMM: "
                         f"it needs marginal='gemm' (marginal='onchip' is always fused)")
    if _gemm_marginal(spec, cfg) and cfg["pre_tile"] > spec.block_k:
        raise ValueError(f"config['pre_tile']={cfg['pre_tile']} must be <= block_k={spec.block_k} with "
                         f"marginal='gemm' (the pre-pass writes one h_j per key block)")


def kernel_spec(q: torch.Tensor, *, block_q: int, block_k: int, feature_map: str, scope: str,
                has_negligible: bool) -> KernelSpec:
    """The forward KernelSpec of a call (CPU tensors map to sm80, the interpreter's generic kernels)."""
    return call_spec(q, DTYPES, "Triton", arch=device_arch(q.device) or "sm80", block_q=block_q, block_k=block_k,
                     feature_map=feature_map, scope=scope, has_negligible=has_negligible, role="forward")


# Where the per-block h_j of marginal='gemm' come from: the Triton pre-pass, which loads every K, V row for
# the totals anyway. At the headline shape (B·H = 12, L = 32760, D = 128, bf16, 64-key blocks, T_n = 512)
# it adds only the h_j writes, 12·512·128²·2 B = 201 MB (~0.04 ms at 4.8 TB/s), and 0 FLOPs (the totals'
# 2·L·D² = 12.9 GFLOP MMAs already produce each block's partial: h_j is the accumulator of one block, H
# stays an fp32 sum of the unrounded h_j). A torch version would materialise φ(K) (L·D, +100 MB written and
# read back), run a (T_n·B·H)-batched (D×64)·(64×D) bmm (12.9 GFLOP again, with its own read of K, V = 201 MB)
# and a sum over T_n for H (another read of the h_j): ≥ 3× the bytes for the same result.
# The h_j are stored in the input dtype (bf16 on GPUs): that is the precision of the MMA operands φ(K_j), V_j
# they come from (relative rounding 2^-9 per element, on the ~5-15 % excluded part of H_i, far inside the
# 2e-2 bf16 tolerance), it halves the GEMM's reads and lets cuBLAS run a bf16 tensor-core GEMM with an fp32
# result — ΔH and the subtraction H − ΔH_i stay fp32 (an fp32 h_j would need an fp32 SIMT GEMM: ~1 ms).
def linear_totals(mod, k: torch.Tensor, v: torch.Tensor, cfg: dict, block_k: Optional[int] = None,
                  totals: bool = True, relaunch_key=None):
    """Per-head H = Σ φ(K)ᵀV (B·H, D, D) and Z = Σ φ(K) (B·H, D), fp32, over all Lk keys; with ``block_k``
    also the per-key-block terms h_j (B, H, n, D, D) in k's dtype and z_j (B, H, n, D) fp32 (else None),
    n = linear_terms.padded_rows(T_n) with rows T_n.. zero (the mask GEMMs' K extent, a multiple of 8).
    ``totals=False`` (with ``block_k`` only: a caller that sums the h_j itself) skips H and Z (None).
    ``relaunch_key``: the launch's Relauncher key (a forward plan's, covering every argument), or None."""
    if not (totals or block_k):
        raise ValueError("linear_totals: totals=False needs block_k (the per-block terms are all it returns)")
    B, H, lk, d = k.shape
    tile = cfg["pre_tile"]
    unit = block_k or tile
    n_units = math.ceil(lk / unit)
    n_chunks, per = linear_terms.prepass_chunks(n_units, B * H, k.device, cfg["pre_per_sm"])
    hp = zp = hb = zb = None
    if totals:
        hp = torch.empty((B * H, n_chunks, d, d), dtype=torch.float32, device=k.device)
        zp = torch.empty((B * H, n_chunks, d), dtype=torch.float32, device=k.device)
    n_rows = linear_terms.padded_rows(n_units) if block_k else n_units
    if block_k:
        hb = torch.empty((B, H, n_rows, d, d), dtype=k.dtype, device=k.device)
        zb = torch.empty((B, H, n_rows, d), dtype=torch.float32, device=k.device)
        if n_rows > n_units:
            hb[:, :, n_units:].zero_()
            zb[:, :, n_units:].zero_()
    triton_launch.of(mod, "sla_linear_totals_kernel")(
        relaunch_key, (n_chunks, B * H), (k, v, hp, zp, hb, zb, *k.stride(), *v.stride(), H, lk, per * unit, n_rows),
        TILE=tile, BLOCKS=bool(block_k), TOTALS=totals, num_warps=cfg["pre_warps"], num_stages=cfg["pre_stages"])
    return (*(linear_terms.chunk_totals(hp, zp) if totals else (None, None)), hb, zb)


# sla_mask_operands_kernel's launch: rows and columns per program, warps (elementwise: 16 elements per thread).
MASK_OPERANDS_LAUNCH = dict(block_m=32, block_j=64, warps=4)


def mask_operands(mod, mask: torch.Tensor, z_blocks: torch.Tensor, k_cols: int, dtype: torch.dtype, *,
                  excluded: bool = False, launch: Optional[dict] = None, relaunch_key=None):
    """(a (B, H, T_m, k_cols) in ``dtype``: 1 on each row's selected blocks — marginal (mask == 0), or with
    ``excluded`` critical and negligible (mask != 0) — 0 elsewhere and in the columns T_n..k_cols;
    Σ_{selected j} z_j (B, H, T_m, D) fp32) from an int8 class mask (B, H, T_m, T_n; any strides, e.g. the
    transposed mask of the backward's dk/dv side) and per-block z_j (B, H, n ≥ T_n, D) fp32 (for
    linear_terms' ``operands``). One launch of ``mod``'s sla_mask_operands_kernel forms a and, for bf16
    operands, z split into three bf16 planes stacked along the GEMM's K (a three times side by side, a itself
    being the first third, a strided view); the z sums are then one tensor-core GEMM of those (fp32 result,
    linear_terms.operand_matmul; no sum over planes after it): fp32-accurate (session 6: the
    previous form, a tf32x3 dot per 32-block step inside one kernel, was latency-bound at 42 µs for a 2.6 µs
    floor). fp32 operands, fp16 ones (fp16's range cannot hold every z and its remainders) and torch < 2.8
    (no fp32-result half GEMM) take an fp32 GEMM of a instead. ``mod``: a marginal-scope forward module of the
    spec (its HEAD_DIM); ``launch`` overrides keys of MASK_OPERANDS_LAUNCH (tools/sweep_mask_operands.py times
    the choices). ``relaunch_key``: a key of slagen.backends.triton.launch.Relauncher that the caller derives
    from everything the kernel's launch depends on (the TileLang forward's per-call plan), or None."""
    B, H, tm, tn = mask.shape
    d = z_blocks.shape[-1]
    z = z_blocks.reshape(B * H, -1, d)
    assert z.is_contiguous() and z.dtype == torch.float32 and z.shape[1] >= tn and k_cols >= tn
    assert d == mod.HEAD_DIM.value and mask.dtype == torch.int8, (d, mod.HEAD_DIM, mask.dtype)
    cfg = {**MASK_OPERANDS_LAUNCH, **(launch or {})}
    split = dtype == torch.bfloat16 and (not mask.is_cuda or linear_terms.HAS_BMM_OUT_DTYPE)
    sel = torch.empty((B, H, tm, 3 * k_cols if split else k_cols), dtype=dtype, device=mask.device)
    planes = torch.empty((B, H, 3 * k_cols, d), dtype=dtype, device=mask.device) if split else sel
    row_tiles, col_tiles = math.ceil(tm / cfg["block_m"]), math.ceil(k_cols / cfg["block_j"])
    z_tiles = math.ceil(k_cols / (cfg["block_m"] * col_tiles)) if split else 0   # BLOCK_M z rows per program
    grid = (row_tiles + z_tiles, col_tiles, B * H)
    triton_launch.of(mod, "sla_mask_operands_kernel")(
        relaunch_key, grid, (mask, z, sel, planes, *mask.stride(), H, tm, tn, k_cols, z.shape[1], row_tiles),
        EXCLUDED=excluded, SPLIT=split, BLOCK_M=cfg["block_m"], BLOCK_J=cfg["block_j"], num_warps=cfg["warps"])
    a = sel[..., :k_cols]
    if split:   # [a a a] @ [hi; mid; lo]: the three planes summed by the GEMM's own accumulation
        return a, linear_terms.operand_matmul(sel, planes, torch.float32)
    return a, torch.matmul(a[..., :tn].to(torch.float32), z[:, :tn].view(B, H, tn, d))


def _linear_args(plan: "_ForwardPlan", q, k, v, maps, proj_weight, proj_bias, save: bool, o_lin, den, eps: float,
                 maps_ready=None):
    """Pointer arguments HT, ZT, (DH,) W, BIAS, OLIN, DEN, ADD of the main kernel's linear branch and its
    constexprs. Runs the pre-pass, then (after waiting for ``maps_ready``) for marginal='gemm' the
    excluded-block GEMM (epilogue 'lowp': the marginal-block GEMM forming H_i in q's dtype instead), and for
    epilogue='split' sla_linear_kernel (which writes ADD, and O^l / den when saving)."""
    mod, spec, cfg = plan.mod, plan.spec, plan.cfg
    gemm = _gemm_marginal(spec, cfg)
    split, lowp = cfg["epilogue"] == "split", cfg["epilogue"] == "lowp"
    # 'lowp' with 'gemm' sums the marginal blocks' h_j directly (H_i): the per-head totals are not read
    ht, zt, hb, zb = linear_totals(mod, k, v, cfg, spec.block_k if gemm else None, totals=not (lowp and gemm),
                                   relaunch_key=plan.launch_key("linear totals"))
    wait_for_maps(maps_ready, q.device)
    w = None if proj_weight is None else proj_weight.to(torch.float32).contiguous()
    bias = None if proj_bias is None else proj_bias.to(torch.float32).contiguous()
    if w is not None and spec.scope == "all" and not save:
        ht, w = torch.matmul(ht, w.t()), None     # Proj folds into the per-head constant H (SLA.md §6)
    consts = dict(EPI_K=cfg["epi_k"], HAS_W=w is not None, HAS_BIAS=bias is not None, SAVE=save,
                  FP32_DOT=cfg["fp32_dot"])
    marginal = spec.scope == "marginal"
    dh = None
    if lowp and gemm:   # H_i = Σ_{j marginal} h_j (B·H·T_m, D, D) in q's dtype, Z_i fp32, replace H and Z
        h_i, z_i = linear_terms.marginal_sums(hb, zb, maps[0], out_dtype=q.dtype, operands=functools.partial(
            mask_operands, mod, relaunch_key=plan.launch_key("mask operands")))
        ht, zt = h_i.reshape(-1, q.shape[-1], q.shape[-1]), z_i.reshape(-1, q.shape[-1])
    elif lowp:          # scope 'all': the per-head H (Proj folded in when not saving) as an MMA operand
        ht = ht.to(q.dtype)
    elif gemm:   # ΔH (B, H, T_m, D, D) and Z_i (B, H, T_m, D), fp32, replace Z; the h_j are freed on return
        dh, zt = linear_terms.excluded_sums(zt.view(*q.shape[:2], -1), hb, zb, maps[0], out_dtype=torch.float32,
                                            operands=functools.partial(mask_operands, mod, excluded=True,
                                                                       relaunch_key=plan.launch_key("mask operands")))
    B, H, lq, d = q.shape
    add = None
    if split:
        add = torch.empty((B * H, lq, d), dtype=torch.float32, device=q.device)
        tile = min(_LIN_TILE, spec.block_q)
        counts = [dh, maps[2].contiguous(), maps[6].contiguous()] if marginal else []
        ints = [H, lq, maps[0].shape[-2]] + ([maps[0].shape[-1]] if marginal else [])
        triton_launch.of(mod, "sla_linear_kernel")(
            plan.launch_key("linear"), (math.ceil(lq / tile), B * H),
            (q, ht, zt, *counts, w, bias, o_lin, den, add, *q.stride(), *ints, float(eps)),
            TILE_M=tile, **consts, num_warps=cfg["pre_warps"])
    consts.update(SPLIT=split, LOWP=lowp)
    if marginal:
        consts["MARGINAL_GEMM"] = gemm
        return [ht, zt, dh, w, bias, o_lin, den, add], consts
    return [ht, zt, w, bias, o_lin, den, add], consts


@dataclasses.dataclass(frozen=True)
class _ForwardPlan(plans.Plan):
    """What a forward call's layouts, flags and config decide (slagen.backends.plans): the checked spec and
    config and the generated module, built once per process for each key (see :func:`_forward_plan`)."""
    spec: KernelSpec
    cfg: dict
    mod: Any


_FORWARD_PLANS: plans.Plans[_ForwardPlan] = plans.Plans()


def _forward_plan(q, k, v, maps, proj_weight, proj_bias, save, block_q, block_k, feature_map, scope,
                  config) -> _ForwardPlan:
    """The plan of a forward call: keyed by the layouts of q, k, v, of the map tensors the forward reads and of
    Proj's, the flags and the config (plans.TUNED: the tuned one, per generation of its memo)."""
    layout = plans.layout
    return _FORWARD_PLANS.get(
        lambda: (layout(q), layout(k), layout(v), len(maps), *(layout(maps[i]) for i in (0, 1, 2, 5, 6)),
                 layout(proj_weight), layout(proj_bias), bool(save), block_q, block_k, feature_map, scope,
                 plans.config_key(config)),
        lambda key: _build_forward_plan(key, q, k, v, maps, proj_weight, proj_bias, block_q, block_k, feature_map,
                                        scope, config))


def _build_forward_plan(key, q, k, v, maps, proj_weight, proj_bias, block_q, block_k, feature_map, scope,
                        config) -> _ForwardPlan:
    check_forward_inputs(q, k, v, maps, proj_weight, proj_bias)
    spec = kernel_spec(q, block_q=block_q, block_k=block_k, feature_map=feature_map, scope=scope,
                       has_negligible=maps[5].shape[-1] > 0)
    if config is plans.TUNED:
        from slagen.backends import triton as triton_backend
        config = triton_backend.tuned_config(sys.modules[__name__], spec, q, k.shape[-2],
                                             maps[1].shape[-1] / max(maps[0].shape[-1], 1))
    cfg = {**default_config(spec, (config or {}).get("marginal"), (config or {}).get("epilogue")), **(config or {})}
    check_config(cfg, spec)
    return _ForwardPlan(key=key, spec=spec, cfg=cfg, mod=codegen.load(spec, "triton"))


def forward(q, k, v, maps, proj_weight, proj_bias, save, *, block_q, block_k, scale, feature_map, scope, eps,
            config: Optional[dict] = None, maps_ready=None):
    """SLA forward on the Triton kernels; returns (o, lse, o_lin, den) as slagen.backends describes.

    q (B, H, Lq, D), k and v (B, H, Lk, D) with any strides; maps the 9 BlockMap tensors; proj_weight (D, D)
    and proj_bias (D,) or None; scale the softmax scale; config overrides of :func:`default_config`
    (slagen.backends.plans.TUNED: the tuned config of this GPU and shape, if any); maps_ready: an event the
    maps' producer recorded on another stream (waited for after the linear pre-pass, which does not read them,
    is launched).
    o has q's dtype and stride order; lse float32 (B, H, Lq) natural log; o_lin (B, H, Lq, D) in q's dtype
    and den float32 (B, H, Lq) when ``save`` and a linear branch, else empty.
    """
    plan = _forward_plan(q, k, v, maps, proj_weight, proj_bias, save, block_q, block_k, feature_map, scope, config)
    spec, cfg = plan.spec, plan.cfg
    negl_width = maps[5].shape[-1]
    B, H, lq, d = q.shape
    linear = spec.feature_map is not None
    marginal = linear and spec.scope == "marginal"
    negl_loop = marginal and spec.has_negligible
    save = bool(save) and linear
    o = torch.empty_like(q)
    lse = torch.empty((B, H, lq), dtype=torch.float32, device=q.device)
    o_lin = q.new_empty((B, H, lq, d)) if save else q.new_empty((0,))
    den = q.new_empty((B, H, lq), dtype=torch.float32) if save else q.new_empty((0,), dtype=torch.float32)
    if B * H == 0:
        return o, lse, o_lin, den

    args, consts = [q, k, v, o, lse], dict(TILE_M=cfg["tile_m"], TILE_N=cfg["tile_n"])
    if linear:
        lin_args, lin_consts = _linear_args(plan, q, k, v, maps, proj_weight, proj_bias, save, o_lin, den, eps,
                                            maps_ready)
        args += lin_args
        consts.update(lin_consts)
    else:
        wait_for_maps(maps_ready, q.device)
    crit_lut = maps[1].contiguous()
    args += [crit_lut, maps[2].contiguous()]
    if negl_loop:
        args += [maps[5].contiguous(), maps[6].contiguous()]
    args += [*q.stride(), *k.stride(), *v.stride(), *o.stride(), H, lq, k.shape[-2], maps[0].shape[-2],
             crit_lut.shape[-1]]
    args += [negl_width] if negl_loop else []
    args += [maps[0].shape[-1]] if marginal else []
    args += [float(scale) * math.log2(math.e)] + ([float(eps)] if linear else [])
    triton_launch.of(plan.mod, "sla_forward_kernel")(
        plan.launch_key("forward"), (math.ceil(lq / cfg["tile_m"]), B * H), tuple(args), **consts,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, lse, o_lin, den
