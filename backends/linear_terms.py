"""Torch-level terms of the linear branch shared by the Triton and TileLang forwards (SLA.md §3, §6).

Both backends run a linear pre-pass kernel that sums φ(K)ᵀV over the keys; this module holds what they do
around it in torch, once:

  prepass_chunks   how many programs per head the pre-pass runs (about two per SM)
  chunk_totals     per-head totals H = Σ_all h_j (D×D) and Z = Σ_all z_j (D) from the per-chunk partials
  marginal_sums    the same sums over the marginal blocks directly (H_i, Z_i), for the low-precision epilogues
                   (TileLang's, Triton's 'lowp'): no per-head total needed
  excluded_sums    scope 'marginal', GEMM formulation: for every query block i at once,
                     ΔH_i = Σ_{j excluded} h_j   and   Z_i = Z − Σ_{j excluded} z_j
                   where "excluded" is the class mask's critical and negligible blocks (mask != 0) and
                   h_j = φ(K_j)ᵀV_j, z_j = Σ_rows φ(K_j) are the per-key-block terms the pre-pass wrote.
                   The main kernel's epilogue then uses H_i = H − ΔH_i, so its key loop visits only the
                   critical blocks and negligible blocks cost nothing.

Both sums are one dense batched GEMM of the 0/1 mask (T_m × T_n) against the stacked h_j (T_n × D²):
2·T_m·T_n·D² FLOPs per head, independent of the density, reading the h_j once; the GEMM's 0/1 operand and
the z sums come from the int8 mask through the function the caller passes (the Triton backend's
fwd.mask_operands). Accumulation is fp32 (cuBLAS accumulates bf16/fp16 products in fp32); the result has
``out_dtype`` (fp32 for Triton, the input dtype for TileLang, whose kernel reads ΔH as a tensor-core operand).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch


def prepass_chunks(n_units: int, bh: int, device: torch.device, per_sm: int = 2) -> Tuple[int, int]:
    """(chunks per head, units per chunk) for a pre-pass over ``n_units`` key units (tiles or blocks) of each
    of ``bh`` heads: about ``per_sm`` programs per SM (a CPU counts as 2 SMs: the interpreter tests split a
    head into several chunks), no empty chunk, at least one unit per chunk."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    want = max(1, min(n_units, math.ceil(per_sm * sms / max(bh, 1))))
    per = math.ceil(n_units / want)
    return math.ceil(n_units / per), per


def chunk_totals(hp: torch.Tensor, zp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(H (..., D, D), Z (..., D)) from per-chunk partials hp (..., n_chunks, D, D), zp (..., n_chunks, D)
    (summed here, in a fixed order: deterministic, no atomics in the kernels)."""
    if hp.shape[-3] == 1:
        return hp[..., 0, :, :], zp[..., 0, :]
    return hp.sum(-3), zp.sum(-2)


def _tiles_to_blocks(h: torch.Tensor, z: torch.Tensor, per_block: int, n_blocks: int):
    """Sum groups of ``per_block`` consecutive pre-pass tiles into ``n_blocks`` selection blocks (the last
    groups may be short or empty: zeros); the D×D sums run in fp32 and return in h's dtype."""
    lead, n_tiles, d = h.shape[:-3], h.shape[-3], h.shape[-1]
    pad = n_blocks * per_block - n_tiles
    h = (torch.nn.functional.pad(h, (0, 0, 0, 0, 0, pad)).view(*lead, n_blocks, per_block, d, d)
         .sum(-3, dtype=torch.float32).to(h.dtype))
    z = torch.nn.functional.pad(z, (0, 0, 0, pad)).view(*lead, n_blocks, per_block, d).sum(-2)
    return h, z


HAS_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")   # torch ≥ 2.8: half GEMMs with an fp32 result
ROW_ALIGN = 8


def padded_rows(n: int) -> int:
    """``n`` rounded up to a multiple of 8: the row count of the per-block term buffers (the K extent of the
    mask GEMMs). cuBLAS runs its Hopper GEMMs only for K a multiple of 8; an odd count (L = 75600 with 64-key
    blocks: T_n = 1182) sends the GEMM to an sm80 kernel a third as fast (H200, 40 × (591×1182)·(1182×16384)
    bf16: 3.997 ms at K = 1182, 1.225 ms at K = 1184, zero-padded; session 5)."""
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def _operand_dtype(terms: torch.Tensor, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype the 0/1 operand of :func:`operand_matmul` takes for these terms and this result."""
    half = terms.dtype in (torch.float16, torch.bfloat16)
    return terms.dtype if out_dtype == terms.dtype or (terms.is_cuda and half) else torch.float32


def operand_matmul(a: torch.Tensor, terms: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a (..., T_m, K) of 0/1 in :func:`_operand_dtype` times terms (..., K, N), accumulated in fp32, as
    ``out_dtype`` (K a multiple of 8: :func:`padded_rows`).

    The 0/1 operand is exact in every dtype, so the operands are a in terms' dtype and terms as they are:
    bf16/fp16 terms with an fp32 result use one tensor-core GEMM with fp32 output (cuBLAS, torch.bmm's
    out_dtype), never an fp32 copy of the terms; on CPU (no such kernel there) the product runs in fp32.
    """
    if out_dtype == terms.dtype:
        if a.shape[:-2] == terms.shape[:-2]:   # batched alike: one bmm (torch.matmul's broadcasting costs host time)
            lead, (tm, k), cols = a.shape[:-2], a.shape[-2:], terms.shape[-1]
            return torch.bmm(a.reshape(-1, tm, k), terms.reshape(-1, k, cols)).view(*lead, tm, cols)
        return torch.matmul(a, terms)
    half = terms.dtype in (torch.float16, torch.bfloat16)
    if terms.is_cuda and half and out_dtype == torch.float32 and not HAS_BMM_OUT_DTYPE:
        # torch without aten::bmm.dtype (older than 2.8): the GEMM in the terms' dtype (cuBLAS still
        # accumulates in fp32; only the stored sum is rounded, as the TileLang backend does), then fp32.
        return torch.matmul(a, terms).to(out_dtype)
    if terms.is_cuda and half and out_dtype == torch.float32:
        lead, (tm, k), cols = a.shape[:-2], a.shape[-2:], terms.shape[-1]
        out = torch.bmm(a.reshape(-1, tm, k), terms.reshape(-1, k, cols), out_dtype=out_dtype)
        return out.view(*lead, tm, cols)
    return torch.matmul(a.to(torch.float32), terms.to(torch.float32)).to(out_dtype)


MaskOperands = Callable[[torch.Tensor, torch.Tensor, int, torch.dtype], Tuple[torch.Tensor, torch.Tensor]]


def _blocks_of(h_terms: torch.Tensor, z_terms: torch.Tensor, per_block: int, tn: int):
    """The terms per selection block: pre-pass tiles summed ``per_block`` to a block (padded_rows(T_n) blocks,
    the tail zero), or the terms as they are when a unit is a block."""
    if per_block > 1:
        return _tiles_to_blocks(h_terms, z_terms, per_block, padded_rows(tn))
    return h_terms, z_terms


def _selected_sums(mask: torch.Tensor, excluded: bool, h_terms: torch.Tensor, z_terms: torch.Tensor,
                   out_dtype: torch.dtype, per_block: int, operands: MaskOperands):
    """(Σ_{j sel} h_j (..., T_m, D, D) in out_dtype, Σ_{j sel} z_j (..., T_m, D) fp32), selected: mask == 0, or
    with ``excluded`` mask != 0, for the int8 class mask (..., T_m, T_n), over per-unit terms h_terms
    (..., n, D, D), z_terms (..., n, D), ``per_block`` consecutive units per selection block; units past the
    last key unit are zero (the pre-passes allocate :func:`padded_rows` units and zero the tail; an n that is
    not a multiple of 8 is zero-padded here, a copy, so cuBLAS gets its Hopper GEMMs).

    ``operands(mask, z_blocks, k, dtype) -> (a, Σ z)`` forms the GEMM's 0/1 operand a (..., T_m, k) in dtype
    and the z sums from the int8 mask (the Triton backend's ``fwd.mask_operands``); one GEMM then gives the h
    sums."""
    tm, tn = mask.shape[-2:]
    h_terms, z_terms = _blocks_of(h_terms, z_terms, per_block, tn)
    lead, n, d = h_terms.shape[:-3], h_terms.shape[-3], z_terms.shape[-1]
    assert n >= tn, (n, mask.shape)
    h_terms, z_terms = h_terms.reshape(*lead, n, d * d), z_terms.to(torch.float32)
    k = padded_rows(n)
    if k != n:
        h_terms, z_terms = (torch.nn.functional.pad(t, (0, 0, 0, k - n)) for t in (h_terms, z_terms))
    a, z = operands(mask, z_terms, k, _operand_dtype(h_terms, out_dtype))
    h = operand_matmul(a, h_terms, out_dtype)
    return h.view(*h.shape[:-2], tm, d, d), z


def marginal_sums(h_terms: torch.Tensor, z_terms: torch.Tensor, mask: torch.Tensor, *, operands: MaskOperands,
                  per_block: int = 1, out_dtype: Optional[torch.dtype] = None):
    """(H_i (..., T_m, D, D) in ``out_dtype`` (default h_terms'), Z_i (..., T_m, D) fp32): the per-unit terms
    (``per_block`` consecutive units per selection block, as in :func:`excluded_sums`) summed over each query
    block's marginal key blocks (mask == 0) directly — the form the low-precision epilogues read (an empty
    marginal set gives exact zeros). Accumulation fp32, one rounding at the end. ``operands``: see
    :func:`_selected_sums`."""
    return _selected_sums(mask, False, h_terms, z_terms, out_dtype or h_terms.dtype, per_block, operands)


def excluded_sums(z_total: torch.Tensor, h_terms: torch.Tensor, z_terms: torch.Tensor, mask: torch.Tensor, *,
                  operands: MaskOperands, per_block: int = 1, out_dtype: Optional[torch.dtype] = None):
    """(ΔH (..., T_m, D, D) in ``out_dtype`` (default: h_terms' dtype), Z_i (..., T_m, D) fp32).

    ΔH_i = Σ_{j excluded} h_j and Z_i = Z − Σ_{j excluded} z_j over the key blocks excluded from query block
    i's linear branch (mask != 0: critical or negligible). mask (..., T_m, T_n) is the int8 class mask;
    z_total (..., D) the per-head Z; h_terms (..., n, D, D) and z_terms (..., n, D) the pre-pass's per-unit
    terms, ``per_block`` consecutive units (key tiles) per selection block of the mask (units past
    T_n·per_block, if any, zero: the pre-passes pad their buffers to :func:`padded_rows` units).
    ``operands``: see :func:`_selected_sums` (called with the excluded selection).
    """
    dh, dz = _selected_sums(mask, True, h_terms, z_terms, out_dtype or h_terms.dtype, per_block, operands)
    return dh, z_total[..., None, :] - dz
