"""The ``tilelang`` backend: SLA forward kernels for Hopper (sm90, compiled for sm_90a) through TileLang.

Forward (templates/tilelang/forward.py.j2, rendered per KernelSpec and imported through slagen.codegen):
  1. linear branch only — ``sla_prepass``, grid (chunks, H, B): per-chunk partials of the per-head totals
     H = Σ φ(K)ᵀV (D×D) and Z = Σ φ(K), fp32, summed over chunks here (deterministic, no atomics). Scope
     'marginal' instead writes each key tile's h_j = φ(K_j)ᵀV_j (input dtype) and z_j (no total); then one
     batched GEMM of the 0/1 marginal mask with h gives H_i = Σ_{j marginal} h_j for every query block
     (fp32 accumulation, rounded once to the input dtype; Z_i likewise, fp32) — a dense (T_m×T_n)·(T_n×D²)
     product that is cheaper on Hopper than subtracting φ(K_j)ᵀV_j inside the sparse loop, and makes
     negligible blocks free.
  2. ``sla_forward``, grid (ceil(Lq / tile_m), H, B): one TMA + warp-specialised ``T.Pipelined`` loop over
     the row's critical key blocks (online softmax, exp2, fp32), then the linear epilogue
     O^l = φ(Q_i)H_i / (φ(Q_i)Z_i + eps) — scope 'all': H_i = H with Proj folded in when o_lin need not be
     saved; scope 'marginal': the H_i above — and one store of O = O^s + Proj(O^l). Config ``persistent``
     runs it instead as ``sla_forward_persistent``: one CTA per SM (grid: the SM count, carried by the length
     of a GRID argument) walking its tiles with a hand-written TMA producer / consumer split.
Every length and every stride of q, k, v and o is a run-time value (one compile per spec × tunables ×
{save, Proj weight, bias}); inputs may be any (B, H, L, D) views with unit stride on D whose other strides
are multiples of 16 bytes (bhld, blhd viewed as bhld, slices of a fused qkv tensor), as TMA requires —
anything else raises a ValueError (no hidden copies).

Block map: the pooling of Q and K runs on TileLang (templates/tilelang/block_map.py.j2, ``sla_pool``: TMA loads,
each tile's column sums as Xᵀ·1 on the tensor cores), the scores, selection and column lists on the Triton
backend's kernels (slagen.backends.triton.selection, given the pooled means). An eager SLA call with scope
'marginal' runs its linear pre-pass first (:func:`early_terms`): the pre-pass pools K (and Q, when Lq = Lk)
from the tiles it reads anyway, with the same macros and tile as ``sla_pool`` — so the same bits — and the
block map then launches no pooling kernel of its own (H200, headline shape: the separate pooling read Q and K,
201 MB, in 0.0685 ms). Inputs TMA cannot read (or fp32) are pooled by the Triton kernel instead: the TileLang
forward does not take them either.
``backward`` picks by its config's ``"backward"`` knob (the config of the role-'backward' spec):
  'tilelang' (the default where its tiles fit the blocks: block_k a multiple of 64) — the Triton backward's
     state kernels with their sparse loops switched off (``slagen.backends.triton.backward_linear_part``:
     D^s, the linear-branch terms of dQ, dK, dV written into the gradients themselves, and dW, db), then the
     sparse branch on two TileLang kernels (templates/tilelang/backward.py.j2): ``sla_dq`` over the row LUT
     and ``sla_dkdv`` over the column LUT, each one TMA + warp-specialised pipelined loop that adds its sum to
     the linear term in place (H200, headline shape:
     backward 4.82 ms vs 5.33 ms for 'triton', docs/perf-notes.md). Where the forward kept H_i, Z_i (scope
     'marginal', bf16), the per-query-block state (den, D^l, D^s, dH_i, dZ_i) comes from a third TileLang kernel,
     ``sla_query_state``, in place of the Triton ``_lin_rows`` + ``_query_state`` (config ``"query_state"``:
     'tilelang', the default there, or 'triton');
  'triton' — the whole Triton backward (``slagen.backends.triton.backward``), the default for other blocks.
Compiled kernels
go to TileLang's cache inside slagen's cache dir (``<cache dir>/tilelang``; TILELANG_CACHE_DIR is pointed
there while slagen compiles). TileLang is imported at the first availability check or compile, not at
import time. Tunables: :func:`default_config` / :func:`check_config` (the autotuner's interface);
``forward(..., config=...)`` overrides them per call; :func:`build` compiles without a GPU. A forward call's
checks, spec, config and compiled kernels are resolved once per input layout (:func:`_forward_plan`,
slagen.backends.plans).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional, Tuple

import torch

from slagen import codegen
from slagen.backends import (call_spec, check_forward_inputs, cuda_rewrites, keeps_linear_sums, linear_terms, plans,
                             side_stream, wait_for_maps)
from slagen.autotune.space import copy_config
from slagen.paths import cache_dir
from slagen.spec import BLOCK_SIZES, KernelSpec

HEAD_DIMS = (64, 128)
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
TARGET = {"kind": "cuda", "arch": "sm_90a"}

# Tunables per head dim. tile_m / tile_n: query rows per CTA / keys per loop step (dividing block_q /
# block_k); num_warps: consumer warps (4 or 8; warp specialisation adds a producer warpgroup); num_stages:
# TMA pipeline depth; pre_*: the linear pre-pass; warp_specialized: False sets TL_DISABLE_WARP_SPECIALIZED and
# TL_DISABLE_TMA_LOWER (a slow fallback, ~4x, for the Hopper warp-specialisation bugs TileLang has had; it
# needs num_stages = pre_stages = 1). d=128 defaults measured on an H200 (B=1, H=12, L=32760, 128x64 blocks):
# num_stages 2/3/4 time the same; pre_tile 128 beats 64 for scope 'all' (0.115 vs 0.16 ms). pre_async (scope
# 'marginal'): two H tiles in the pre-pass, each tile's TMA store left in flight while the next tile is formed
# (the store two tiles back is waited for before its buffer is reused) instead of a wait after every store;
# H200, headline shape, session 13: pre-pass 0.1294 -> 0.1178 ms, SLA marginal forward given the map 1.010 ->
# 0.984 (interleaved rounds); d 64 not timed (its GPU tests pass). pre_overlap (scope 'marginal', default at d 128
# since session 22): each pre-pass tile's small column-sum GEMMs — K's and Q's pooling for the block map, z_t —
# are issued without a wait and the one wait of the tile's φ(K_t)ᵀV_t GEMM covers them (one wgmma round trip per
# tile instead of four; the same instructions, so the same bits). H200, headline shape, 9 rounds in turn: the
# pooling pre-pass 0.1480 -> 0.1459 ms (min–max 0.1471–0.1484 vs 0.1452–0.1462); the forward given the map
# (plain pre-pass: two round trips to one) within noise. d 64 (its tiles half as wide, the chain shorter): the
# pooling pre-pass 0.0795 -> 0.0807 ms, slower, so off there (its GPU tests pass).
# ctas_per_sm: 2 asks for two resident CTAs per SM (registers capped at 128 per thread, no producer /
# consumer register reallocation; both CTAs' shared memory must fit the SM): meant for 64-row tiles, whose one
# consumer warpgroup runs alone on an SM otherwise (240 registers per thread). H200, 64x64 blocks, headline
# shape: SLA marginal forward 1.431 vs 1.785 ms (`slagen tune`, session 5). It applies to every forward
# variant except the training forward with Proj (save and has_w), which runs one CTA per SM: two resident CTAs
# of that variant never finish on the H200 (session 5 probe: L=4096 H=12 and L=32760 H=2/12 hang; the same
# kernel without Proj, or without saving, runs; cause not found).
# prefetch_h: issue the linear branch's H_i loads (into registers, 32 per thread, live through the loop) before
# the key loop rather than after it (their latency then under the loop instead of under the sparse epilogue and
# φ(Q_i)). Until session 23 it copied H_i into shared memory before the loop, which TileLang lowered to scalar
# loads by all 384 threads (+0.45 ms, session 7). H200, headline shape, given the map, 9 rounds (session 23):
# SLA marginal 0.931 / 0.941 vs 0.934 / 0.941 ms without: no gain (as session 19's early_h); tunable only.
# tma_store: write O (and O^l) through shared memory with one TMA store instead of per-thread 2-byte global
# stores (the generated epilogue issues 64 scalar stores per thread, 4× the L2 sectors, while the SM's one CTA
# has nothing else to run). Measured (H200, headline shape, SLA marginal forward, `slagen tune`, session 7):
# 128x64 tma_store 1.244 vs 1.355 ms (default since), prefetch_h (its shared-memory form) 1.800; 64x64
# ctas_per_sm 2 1.399, tma_store 1.668, both defaults 1.756 — so 64-row tiles defaulted to two CTAs per SM
# without the TMA store, every thread capped at 128 registers, no overlap. Since session 32 (_TWO_CTAS) the two CTAs
# hand the producer's registers to the consumer (24 / 232: forward_kernel's reg_handover), which lets the
# overlapped loop and the TMA store fit without spilling (ptxas: 128 at launch, no spills, wgmma not serialised),
# and take the head dim's overlap and tma_store. H200, headline shape, 64x64 blocks, given the map
# (tools/forward_configs.py, 5 rounds; the old kernel in a second process): sparse-only 0.846 → 0.666 ms, SLA
# marginal 1.306 → 1.071 (without the TMA store 0.776 / 1.148, without overlap 0.879 / 1.205); outputs
# bit-identical to the old loop's.
# overlap (default at d 128 with 128-row tiles since session 9; H200, headline shape, 128x64, session 8: 1.157
# vs 1.202 ms SLA forward; its 39 GPU cases passed at session 9's code; default at d 64 too since session 33:
# H200, L 32760, H 12, given the map, tools/forward_configs.py --head-dim 64, 5 rounds — 128x64 sparse-only
# 0.522 → 0.468 ms, SLA marginal 0.669 → 0.590; 64x64 (two CTAs) 0.492 → 0.444 and 0.655 → 0.592; its 53 d 64
# forward GPU cases passed):
# FlashAttention-3's intra-warpgroup overlap in
# the sparse loop — step t issues S_{t+1} = QK_{t+1}ᵀ into a second accumulator as an asynchronous wgmma batch,
# runs step t's softmax while it is in flight, then P_t·V_t with the one wait per step (the default waits for
# each batch right after issuing it, so the tensor cores idle during the softmax). Step 0's K gets a tile of
# its own (+ tile_n·D·2 bytes of shared memory); the last step's S is computed and never used (one extra QKᵀ
# per CTA). Both step widths (tile_n dividing block_k, and 2·block_k); needs warp specialisation. Since session
# 12 the overlapped loop (and the plain one where tile_n = block_k) walks each row's LUT last-first, so that only
# step 0 can hold the partial last key block: with tile_n = block_k no later step is masked (H200, headline
# shape: −6 % on the forward; 64x64: −2.5 %; since session 40 the two-block steps of tile_n = 2·block_k walk
# last-first too, an odd count's lone block in step 0, so only step 0 is masked: sparse-only given the map 0.695 ms
# vs 0.674 with one block per step, SLA marginal 0.988 vs 0.953 — still slower, so tile_n stays block_k). Since
# session 19 its S_{t+1} = QK_{t+1}ᵀ takes Q from registers (one step per key block): H200, headline shape, given
# the map, 9 rounds in turn, sparse-only 0.690 / 0.710 →
# 0.678 / 0.680 ms, SLA marginal 0.983 / 0.970 → 0.958 / 0.961. Since session 21 each step's row max comes before
# S_{t+1}'s issue, so the wait for K_{t+1}'s tile (a branch) hides under its chain: sparse-only 0.680 / 0.685 →
# 0.674 / 0.671, SLA marginal 0.994 / 0.978 → 0.959 / 0.958 (9 rounds in turn). Measured slower there (session
# 21): P·V deferred one step or split into two batches, V's wait next to K's, 3 or 4 K / V stages. Since session
# 23 each step takes its scaled scores out of acc_s (into the second accumulator, where its exp2s run) before
# S_{t+1} is issued into acc_s itself: no copy of S_{t+1} between the accumulators at the step's end (32 moves per
# thread and step; the loop 548 → 516 instructions per warp and pass, ptxas: 168 registers, no spills, wgmma not
# serialised). SLA marginal given the map, 9 rounds in turn, two H200 calls: 0.976 / 0.958 → 0.946 / 0.952 and
# 0.963 / 0.951 → 0.934 / 0.941 ms; sparse-only 0.673 / 0.687 → 0.676 / 0.677 (noise).
# pingpong (instead of overlap; 128-row tiles, two consumer warpgroups, tile_n dividing block_k): FlashAttention-
# 3's schedule — the warpgroups take turns issuing S_t = QK_tᵀ and the previous step's P·V (two named barriers),
# so one's softmax runs under the other's GEMMs, and under its own P·V (a per-step store of the row sums keeps
# ptxas from hoisting the K / V release, and with it the P·V wait, above the exp2s). H200, headline shape,
# 128x64, sparse-only forward given the map (tools/forward_configs.py, session 11): overlap 0.702 / 0.704 ms,
# plain loop 0.757; pingpong without the store (softmax after the P·V wait) 0.806, with 3 stages 0.764; with it
# 0.868 — slower in every form measured; tunable only.
# persistent: the forward as one CTA per SM with a hand-written producer / consumer (templates/tilelang/
# forward.py.j2 persistent_forward_kernel): the producer's TMA loads run into the next tile while the consumers
# finish the current one (its epilogue, for SLA the linear branch), and no wave tail. 128-row tiles, key blocks
# of 64, scope 'marginal' or sparse-only, its own loop (overlap and pingpong off); its K / V stages are
# num_stages (ask for 3 at d 128: with 2 a step's loads land late). H200, headline shape, given the map,
# session 16: as a probe (no masks, no LSE; removed since) 0.697 vs 0.702 ms sparse-only and 0.968 vs 0.997
# SLA marginal; as this kernel (tools/forward_configs.py, rounds in turn, persistent vs per-tile overlap) 0.716
# vs 0.704 and 1.026 vs 0.995 (5 rounds), 0.705 vs 0.689 and 0.989 vs 1.000 (9 rounds): not faster, so tunable.
# tail_split (the most parts a tail tile is split into; 1: off): the grid's last tiles — tiles mod the SM
# count, where they are at most half the SMs — each run as up to tail_split CTAs over a share of the row's
# critical blocks, merged by the last part to finish (forward_kernel's docstring; one atomic count per tile),
# in a second launch after the whole tiles' (tail_plan). Meant for the wave tail: 3072 tiles on 132 SMs leave
# 36 for a 24th wave. H200, headline shape, session 25 (tail_plan: 3036 whole tiles, then 36 tiles in 3 parts):
# the two launches' kernels 0.6633 ms vs 0.6599 for one launch; SLA marginal forward 0.994 / 1.007 ms graph /
# eager vs 0.998 / 0.992, sparse-only 0.687 / 0.672 vs 0.685 / 0.671 (9 rounds in turn): no gain — the 23 full
# waves do not end together either (tiles finish at spread times, so the last wave's 36 tiles start early and
# cost less than a tile's time). Tunable only; its GPU tests pass.
# lazy_rescale (default at d 128 since session 40): each row's softmax reference max moves only when a step's scores
# pass it by more than 2^8 (log2 units), and O's rescale (64 FMUL per thread and step) runs only in a warp where some
# row's reference moved (a warp vote; elsewhere the factor is exactly 1). O and l share the reference, so O / l and
# the LSE are the exact max's (FlashAttention-4's conditional rescale). H200, headline shape, given the map,
# tools/forward_configs.py, lazy vs default in five A/Bs of 7-11 rounds (session 40): sparse-only 1.008-1.030x,
# SLA marginal 1.000-1.019x (mean ~1.5 % / ~1 %); H 40, L 75600: sparse-only 1.036 / 1.031x, marginal 1.006 / 0.973x;
# 64x64 (two CTAs) sparse-only 0.984 / 1.014x, marginal 1.035 / 1.022x. Predicted -5..-9 % from the instruction
# count (the skipped FMULs, ~9 % of the steady-state step); the step is latency-bound, not issue-bound. d 64 not
# timed (off there).
# tree_max (default for sparse-only at d 128 since session 41): each step's own row max as a pairwise tree of
# depth 4 instead of TileLang's serial 16-deep FMNMX chain per row (backends/cuda_rewrites: a
# rewrite of the generated CUDA; max is exact in any order, so the same bits). H200, given the map,
# tools/forward_configs.py, tree vs chain (session 41; 9-15 rounds, pairs of identical configs beside): H 12
# L 32760 sparse-only 1.021 / 1.006 / 1.009x, SLA marginal 0.997 / 1.011 / 1.002x; H 40 L 75600 sparse-only
# 1.007 / 1.007x, marginal 0.997 / 0.995x. On where it measured faster (no linear branch); not in the tuner's
# OPTIONS (it would double the forward's space for <= 1 %). Predicted -5..-8 % from ncu (the two chains were 11 % of
# the consumer loop's samples): their latency was mostly hidden behind the other warpgroup's GEMMs.
_DEFAULTS: Dict[int, dict] = {
    64: dict(tile_m=128, tile_n=64, num_warps=8, num_stages=3, pre_tile=128, pre_warps=8, pre_stages=2,
             pre_async=True, pre_overlap=False, warp_specialized=True, ctas_per_sm=1, prefetch_h=False,
             tma_store=True, overlap=True, pingpong=False, persistent=False, tail_split=1, lazy_rescale=False,
             tree_max=False),
    128: dict(tile_m=128, tile_n=64, num_warps=8, num_stages=2, pre_tile=128, pre_warps=8, pre_stages=2,
              pre_async=True, pre_overlap=True, warp_specialized=True, ctas_per_sm=1, prefetch_h=False,
              tma_store=True, overlap=True, pingpong=False, persistent=False, tail_split=1, lazy_rescale=True,
              tree_max=True),
}
_TWO_CTAS = dict(num_warps=4, ctas_per_sm=2)   # 64-row tiles, where two CTAs fit an SM (registers handed over)
# Backward tunables per head dim (role 'backward'): "backward" picks the implementation (see the module
# docstring; 'tilelang' becomes 'triton' for blocks its tiles do not fit); dq: tile_m query rows per CTA
# (divides block_q), tile_n keys per loop step (divides block_k); dkdv: tile_n keys per CTA (divides block_k;
# 64 rows per consumer warpgroup), tile_m query rows per step (divides block_q). Starting points (register
# use checked with ptxas: dq 168 per thread, dkdv 240 in its consumer (one CTA per SM, below), no spills at
# d=128), not measured optima.
# Each kernel's epilogue: tma_store writes the gradients through the CTA's own shared tiles with TMA stores
# (default), lin_init puts the linear-branch term in the fp32 accumulator before the loop (per-thread loads
# that otherwise follow the loop). H200, headline shape, 128x64, SLA marginal backward (`slagen tune`, session
# 8): default before 4.834 ms, tma_store 4.523, tma_store + lin_init 4.513 (noise), lin_init alone 4.842.
# lin_fused adds the linear-branch terms in the epilogue from the per-block sums instead of the Triton linear
# part's dq / dk-dv kernels; on wherever it applies (_lin_fused_blocker; the caller's lin_init or gathered states
# turn a default lin_fused off). H200, headline shape, 128x64 (session 10, `slagen tune`): backward 3.896 ms
# without, 3.725 dkdv alone, 3.870 dq alone, 3.686 both.
# row_regs (dq): Q and dO as the register operands of S = QKᵀ and dP = dOVᵀ, copied from shared memory once, so
# the step's GEMMs read only K and V there (per step and 128 rows they read 160 KB of shared memory for 1536
# tensor-core cycles of work before, 96 KB after; the forward's Q in registers: −3 % on its sparse kernel,
# session 19). ptxas: no spills, wgmma pipelined (with two key blocks per step it spills: refused). H200, headline
# shape, 128x64, backward alone (tools/profile_backward.py, 7 rounds in turn, session 20): the dq kernel 0.918 →
# 0.886 ms for SLA marginal, 0.749 → 0.741 sparse-only, gradients bit-identical: on by default at d 128. At d 64
# it computes a wrong dQ wherever a row walks more than one step (H200, session 20: rel. err 0.34–0.82 at L 4096
# and 32760, right at L 77 with one block): ptxas gives the registers of the step-0 copies of Q and dO to the dP
# accumulator and the dS operand inside the loop (the PTX keeps them live; backends/sass.py finds it offline, a
# CPU test checks every default kernel for it): refused there.
# h_prefetch (dq, with lin_fused): the consumer threads load H_i into registers before the key loop (their loads
# land under it) and store it to shared memory after it, instead of loading it there after the loop, where each
# CTA (one per SM) waited for it. H200, headline shape, 128x64, backward alone (tools/profile_backward.py, 2 × 3
# rounds, session 28): the dq kernel 0.866 -> 0.833 ms, gradients bit-identical: on by default where lin_fused
# is. Not with 4 warps at head_dim 128 (64 more registers per thread: ptxas spills 536 bytes).
# dK/dV runs one CTA per SM (its consumer at 240 registers). Sessions 31-34 kept two (a `ctas_per_sm` tunable: 128
# registers per thread at launch, the producer handing all but 24 to the consumer's 232), which ran the headline
# backward 0.38 ms faster (H200, session 35: slagen.attention f+b GPU 3.475 vs 3.854 ms) but hung the GPU at
# random: L 4096 forward+backward calls, graphed or eager, stalled (a kernel that never finishes) in 11 of 12 runs,
# most within 1500 calls; one CTA per SM ran 41000 calls without a stall. A producer that waits for the consumer's
# setmaxnreg before it exits stalled too. The tunable is gone; a config naming it is refused.
# pair (dkdv): dkdv_pair_kernel, one CTA of two consumer warpgroups taking alternate 64-row query steps with dK, dV
# of their own (one's GEMMs under the other's softmax, as two CTAs gave), then splitting the epilogue: each hands the
# other the half of its sums it does not finish, consumer 0 finishes dK and consumer 1 dV (session 37; until then
# consumer 0 summed both and ran the whole epilogue); the default wherever it can run (_pair_blocker: bf16, block_k
# 64, 2 stages at d 128). H200, session 36,
# L 32760, 128x64, slagen.attention f+b GPU ms (CUDA graphs, two runs each in turn): one consumer 3.783 / 3.800,
# pair 3.567 / 3.582; L 4096 forward+backward soaks of 20000 calls (128x64 and 64x64) ran without a stall.
# "linear": overrides of the Triton backward config ({"prep" | "dq" | "dkdv": {...}}, onto its tuned or default
# config) for the Triton kernels of the linear part (slagen.backends.triton.backward_linear_part); their dq
# kernel, without the sparse loop, is fastest with 64-row programs (H200, headline shape, 128x64, session 9,
# tools/sweep_linear_part.py: 0.161 ms vs 0.234 at the Triton backward's 128).
_LINEAR_DEFAULTS = {128: {"dq": {"block_m": 64, "num_warps": 8}}}
# The linear part's state-kernel launch where the forward keeps H_i, Z_i (keeps_linear_sums: scope 'marginal' with
# a linear branch) and config "query_state" is 'triton' (the TileLang query-state kernel replaces both by default
# where it applies): _query_state then reads D^l from _lin_rows, and no key-state kernel runs. H200, headline shape,
# 128x64, session 27 (tools/sweep_linear_part.py): 64 rows, 1 stage, 1 block per program: _query_state 0.221 ->
# 0.177 ms. The Triton backward's own path (O^l read, key states formed) is slower with it (_query_state 0.244 ->
# 0.276, _key_state 0.184 -> 0.238), so it is applied here, under the "linear" overrides, not in its defaults.
_SUMS_PREP = {128: dict(rows=64, num_warps=4, num_stages=1, chunk=1)}
_BWD_DEFAULTS: Dict[int, dict] = {
    d: {"backward": "tilelang", "warp_specialized": True, "query_state": "tilelang",
        "dq": dict(tile_m=128, tile_n=64, num_warps=8, num_stages=2, lin_init=False, tma_store=True, lin_fused=True,
                   row_regs=d == 128, h_prefetch=True),
        "dkdv": dict(tile_n=64, tile_m=64, num_warps=4, num_stages=2, lin_init=False, tma_store=True,
                     lin_fused=True, pair=False),
        "linear": _LINEAR_DEFAULTS.get(d, {})}
    for d in (64, 128)
}
BACKWARDS = ("triton", "tilelang")
QUERY_STATES = ("tilelang", "triton")
SHARED_MEMORY = 227 * 1024
SHARED_MEMORY_PER_SM = 228 * 1024   # what resident CTAs share (each also reserves 1 KiB: in shared_bytes)
TAIL_SPLIT_MAX = 8
TAIL_OVERHEAD = 0.15    # tail_plan: the split launch's extra cost in tiles' time (a launch gap, the merge)

_LOCK = threading.RLock()
_KERNELS: Dict[tuple, object] = {}
_KEY_LOCKS: Dict[tuple, threading.Lock] = {}
_CACHE_SAVED: Optional[str] = None
_DUMMIES: Dict[tuple, Dict[str, torch.Tensor]] = {}
_RESOLVED_CONFIGS: plans.Plans[dict] = plans.Plans()   # _config_for's tuned-or-default configs
_LINEAR_CONFIGS: plans.Plans[dict] = plans.Plans()     # linear_config's results without a base
_IMPORT_ERROR: Optional[str] = None
_IMPORT_CHECKED = False


# ----------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------

def tilelang_import_error() -> Optional[str]:
    """Why ``import tilelang`` fails here, or None (checked once per process)."""
    global _IMPORT_ERROR, _IMPORT_CHECKED
    if not _IMPORT_CHECKED:
        try:
            import tilelang  # noqa: F401
        except Exception as err:  # ImportError, or a broken install (tvm-ffi mismatch, missing libs)
            _IMPORT_ERROR = (f"tilelang is not importable ({type(err).__name__}: {err}); install "
                             f"tilelang==0.1.15 and apache-tvm-ffi<0.1.13")
        _IMPORT_CHECKED = True
    return _IMPORT_ERROR


def _triton():
    from slagen.backends import triton as triton_backend
    return triton_backend


def unavailable_reason(device: torch.device, spec: KernelSpec) -> Optional[str]:
    """Why the TileLang backend cannot serve ``spec`` on ``device``, or None when it can.

    The forward runs TileLang kernels (CUDA device of capability 9.0, head_dim 64 or 128, bf16/fp16); the
    block map pools on TileLang where it can (:func:`block_map`) and scores and selects on the Triton
    backend's kernels, and the backward runs the Triton state kernels (and, where its config picks it, the
    whole Triton backward), so they need what it needs.
    """
    if device.type != "cuda":
        return (f"the TileLang backend runs on Hopper GPUs only (CUDA capability 9.0, e.g. H100/H200); "
                f"got device type {device.type!r}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return (f"the TileLang backend needs a Hopper GPU (CUDA capability 9.0, sm_90a); this GPU is "
                f"sm{major}{minor}: use backend='triton'")
    if spec.arch != "sm90":
        return f"the TileLang backend compiles for sm90 only; the spec asks for arch={spec.arch!r}"
    if spec.role in ("block_map", "backward"):
        reason = _triton().unavailable_reason(device, spec)
        return None if reason is None else f"TileLang delegates role {spec.role!r} to Triton, which cannot: {reason}"
    missing = tilelang_import_error()
    if missing:
        return missing
    if spec.head_dim not in HEAD_DIMS:
        return (f"head_dim={spec.head_dim} is not supported by the TileLang kernels; allowed: "
                f"{', '.join(map(str, HEAD_DIMS))} (use backend='triton' for others)")
    if spec.dtype not in ("bf16", "fp16"):
        return f"dtype={spec.dtype!r} is not supported by the TileLang kernels; allowed: bf16, fp16"
    # Training through this backend uses the delegated block map and backward.
    reason = _triton().unavailable_reason(device, spec.replace(role="backward"))
    if reason is not None:
        return f"the TileLang backend runs its block map and backward state kernels on Triton, which cannot: {reason}"
    return None


def block_map(q, k, n_crit: int, n_negl: int, block_q: int, block_k: int, columns: bool = True,
              pooled=None):
    """The 9 BlockMap tensors (slagen.backends): q and k pooled by ``sla_pool`` (or ``pooled``: the
    :class:`EarlyPooled` of :func:`early_terms`, or a (q̄, k̄, K's chunk sums) tuple), then the Triton
    backend's scores, selection and column kernels; with an EarlyPooled these also write its marginal-block
    operands for the forward. Inputs the TileLang kernels cannot read (fp32, strides TMA cannot take:
    :func:`_check_tma`) are pooled by the Triton kernel too."""
    early = pooled if isinstance(pooled, EarlyPooled) else None
    if early is not None:
        pooled = early.means
    elif pooled is None:
        plan = _pool_plan(q, k, block_q, block_k)
        if plan.tilelang:
            pooled = pool(plan, q, k)
    maps = _triton().block_map(q, k, n_crit, n_negl, block_q, block_k, columns, pooled=pooled,
                               marginal=early and early.marginal)
    if early is not None:
        early.written = True
    return maps


# ----------------------------------------------------------------------------------------------------
# Pooling (the block map's first step) and the pre-pass that pools while it reads K
# ----------------------------------------------------------------------------------------------------

POOL_WARPS = 4      # one consumer warpgroup (and the producer's): ZN = 8, wgmma N = 8
POOL_STAGES = 3
# Resident CTAs per SM (launch bounds' minimum blocks, no setmaxnreg: 38 registers per thread): the grid has about
# two CTAs per SM (pool_chunks), so both are resident at once instead of running as two waves, each ramping its
# pipeline up and draining it (the compiler's default, 240 registers per thread, left one per SM; session 38).
POOL_CTAS_PER_SM = 2


def pool_tiles(head_dim: int, block_q: int, block_k: int) -> Tuple[int, int]:
    """(Q's, K's) pooling tile in rows. K's is the default tile of the marginal pre-pass (the key block, at
    most its ``pre_tile``), so that pre-pass can pool K as it reads it; Q's is the same unless a query block
    is shorter (then the pre-pass cannot pool Q)."""
    tk = min(_DEFAULTS[head_dim]["pre_tile"], block_k)
    return min(tk, block_q), tk


def pool_chunks(n_tiles: int, bh: int, device: torch.device, align: int) -> Tuple[int, int]:
    """(chunks per head, tiles per chunk) of a pooling pass over ``n_tiles`` tiles of each of ``bh`` heads:
    about two CTAs per SM (slagen.backends.linear_terms.prepass_chunks), chunks a multiple of ``align``
    tiles so that no block straddles two."""
    n, per = linear_terms.prepass_chunks(-(-n_tiles // align), bh, device)
    return n, per * align


def _key_align(block_q: int, block_k: int, tq: int, tk: int) -> int:
    """Tiles per chunk of K's pooling a multiple of this: whole key blocks, and whole query blocks where the
    pre-pass pools Q in the same chunks (tq = tk), so K's chunk sums (hence the key mean) are the same bits
    whether the pre-pass pooled Q or not."""
    return max(block_k, block_q if tq == tk else 1) // tk


def pool_kernel(spec: KernelSpec, tile: int):
    """The compiled ``sla_pool`` (templates/tilelang/block_map.py.j2) of a role-'block_map' ``spec`` and
    ``tile`` rows per tile; it depends on the head dim and dtype only (one kernel for every length, block size
    and layout)."""
    args = dict(tile=tile, threads=32 * POOL_WARPS, num_stages=POOL_STAGES, ctas_per_sm=POOL_CTAS_PER_SM)
    key = ("pool", spec.head_dim, spec.dtype, tuple(sorted(args.items())))
    mod = _module(spec)
    return _compile(key, lambda: mod.pool_kernel(**args), True)


def _pool_spec(q: torch.Tensor, block_q: int, block_k: int) -> KernelSpec:
    return call_spec(q, DTYPES, "TileLang", arch="sm90", block_q=block_q, block_k=block_k, feature_map=None,
                     has_negligible=False, role="block_map")


@dataclasses.dataclass(frozen=True)
class _PoolPlan(plans.Plan):
    """How a block map of these q / k layouts and blocks pools: on TileLang (``tilelang``; else the Triton
    kernel) with tiles tq / tk, K's chunks, the compiled kernels."""
    tilelang: bool
    block_q: int = 0
    block_k: int = 0
    tq: int = 0
    tk: int = 0
    k_chunks: Tuple[int, int] = (0, 0)
    q_chunks: Tuple[int, int] = (0, 0)
    kernel_q: object = None
    kernel_k: object = None


_POOL_PLANS: plans.Plans[_PoolPlan] = plans.Plans()


def _pool_plan(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> _PoolPlan:
    return _POOL_PLANS.get(lambda: (plans.layout(q), plans.layout(k), block_q, block_k),
                           lambda key: _build_pool_plan(key, q, k, block_q, block_k))


def _tilelang_reads(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> bool:
    """Whether ``sla_pool`` can pool q and k (CUDA, bf16 / fp16, a TileLang head dim, layouts TMA reads,
    TileLang importable); the Triton pool takes the rest, and its checks name what is wrong with them."""
    if not (q.dim() == k.dim() == 4 and q.is_cuda and q.dtype in DTYPES and k.dtype == q.dtype
            and k.device == q.device and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1]
            and q.shape[-1] in HEAD_DIMS and min(q.shape[2], k.shape[2]) >= 1
            and block_q in BLOCK_SIZES and block_k in BLOCK_SIZES and tilelang_import_error() is None):
        return False
    try:
        _check_tma("q", q)
        _check_tma("k", k)
    except ValueError:
        return False
    return True


def _build_pool_plan(key, q, k, block_q, block_k) -> _PoolPlan:
    if not _tilelang_reads(q, k, block_q, block_k):
        return _PoolPlan(key=key, tilelang=False)
    B, H, lq, d = q.shape
    tq, tk = pool_tiles(d, block_q, block_k)
    spec = _pool_spec(q, block_q, block_k)
    return _PoolPlan(key=key, tilelang=True, block_q=block_q, block_k=block_k, tq=tq, tk=tk,
                     k_chunks=pool_chunks(-(-k.shape[2] // tk), B * H, q.device, _key_align(block_q, block_k, tq, tk)),
                     q_chunks=pool_chunks(-(-lq // tq), B * H, q.device, block_q // tq),
                     kernel_q=pool_kernel(spec, tq), kernel_k=pool_kernel(spec, tk))


def _pool_buffers(x: torch.Tensor, block: int, chunks: Tuple[int, int]):
    """(block means (B, H, ceil(L / block), D), chunk sums (B, H, n_chunks, D)) of x (B, H, L, D): fp32, empty."""
    B, H, n, d = x.shape
    return (torch.empty((B, H, -(-n // block), d), dtype=torch.float32, device=x.device),
            torch.empty((B, H, chunks[0], d), dtype=torch.float32, device=x.device))


def _pool_into(kernel, x: torch.Tensor, means: torch.Tensor, parts: torch.Tensor, block: int, tile: int,
               chunks: Tuple[int, int]) -> None:
    """``sla_pool`` of x into the buffers of :func:`_pool_buffers`, on the current stream."""
    with torch.cuda.device(x.device):
        kernel(x, means, parts, chunks[1], block // tile)


def _pool_one(kernel, x: torch.Tensor, block: int, tile: int, chunks: Tuple[int, int]):
    """(block means (B, H, ceil(L / block), D), chunk sums (B, H, n_chunks, D)), fp32, of x (B, H, L, D)."""
    means, parts = _pool_buffers(x, block, chunks)
    _pool_into(kernel, x, means, parts, block, tile, chunks)
    return means, parts


def pool(plan: _PoolPlan, q: torch.Tensor, k: torch.Tensor):
    """(q̄ (B, H, T_m, D), k̄ (B, H, T_n, D), K's chunk sums (B, H, n, D)), fp32: ``sla_pool`` over q and k.

    Q's launch runs on a side stream beside K's: each is about one wave of two CTAs per SM, so side by side they
    share the SMs (four CTAs fit one) instead of the second waiting for the first's last CTAs. The side stream
    waits for the current one first, and the current one for it before it returns; every buffer is allocated on
    the current stream, so the allocator cannot hand one out while the side stream still writes it. (CUDA-graph
    capture follows the fork and the join.)"""
    q_mean, q_part = _pool_buffers(q, plan.block_q, plan.q_chunks)
    k_mean, k_part = _pool_buffers(k, plan.block_k, plan.k_chunks)
    current = torch.cuda.current_stream(q.device)
    side = side_stream(q.device, "pool")
    side.wait_stream(current)
    with torch.cuda.stream(side):
        _pool_into(plan.kernel_q, q, q_mean, q_part, plan.block_q, plan.tq, plan.q_chunks)
    _pool_into(plan.kernel_k, k, k_mean, k_part, plan.block_k, plan.tk, plan.k_chunks)
    current.wait_stream(side)
    return q_mean, k_mean, k_part


# ----------------------------------------------------------------------------------------------------
# Tunables
# ----------------------------------------------------------------------------------------------------

def default_config(spec: KernelSpec) -> dict:
    """Default tunables of ``spec`` (see ``_DEFAULTS``, and ``_BWD_DEFAULTS`` for role 'backward'), clipped
    to the selection blocks."""
    if spec.head_dim not in _DEFAULTS:
        raise ValueError(f"head_dim={spec.head_dim} is not supported by the TileLang kernels; allowed: "
                         f"{', '.join(map(str, HEAD_DIMS))}")
    if spec.role == "backward":
        return _default_backward_config(spec)
    cfg = dict(_DEFAULTS[spec.head_dim])
    cfg["tile_m"] = min(cfg["tile_m"], spec.block_q)
    cfg["tile_n"] = min(cfg["tile_n"], spec.block_k)
    if spec.scope == "marginal":   # per-block h_j: the pre-pass tile divides block_k
        cfg["pre_tile"] = min(cfg["pre_tile"], spec.block_k)
    cfg["tree_max"] = cfg["tree_max"] and spec.feature_map is None   # (measured faster only there: see tree_max)
    if cfg["tile_m"] < 128:          # 64-row tiles: one consumer warpgroup (8 warps fail layout inference)
        two = {**cfg, **_TWO_CTAS}
        cfg = two if 2 * shared_bytes(two, spec) <= SHARED_MEMORY_PER_SM else {**cfg, "num_warps": 4}
    return cfg


def persistent_applies(spec: KernelSpec) -> Optional[str]:
    """None where the persistent forward serves ``spec``, else why not."""
    if spec.feature_map is not None and spec.scope != "marginal":
        return "scope 'all' (its per-head H is fp32, not a TMA tile)"
    if spec.block_k != 64 or spec.block_q % 128:
        return f"blocks {spec.block_q}x{spec.block_k} (it needs block_k = 64 and block_q a multiple of 128)"
    return None


def persistent_stages(cfg: dict, has_w: bool) -> int:
    """K / V stages of the persistent kernel: the config's, at most 2 when Proj's weight takes its room."""
    return min(cfg["num_stages"], 2) if has_w else cfg["num_stages"]


def shared_bytes(cfg: dict, spec: KernelSpec, has_w: bool = False) -> int:
    """Upper bound of the forward kernel's shared memory (TileLang may alias epilogue buffers)."""
    esize, d, m = 2, spec.head_dim, cfg["tile_m"]
    linear = spec.feature_map is not None
    if cfg.get("persistent"):   # Q (two), K / V stages, O's staging, H_i, den, W
        stages = persistent_stages(cfg, has_w and linear)
        return (esize * (2 * m * d + 2 * stages * cfg["tile_n"] * d + m * d) + 1024 +
                ((esize * d * d + 4 * m) if linear else 0) + (esize * d * d if has_w and linear else 0))
    w = esize * d * d if linear and has_w else 0     # Proj's weight (a call with one), loaded before the loop
    k0 = esize * cfg["tile_n"] * d if cfg.get("overlap") or cfg.get("pingpong") else 0   # step 0's K / last V tile
    loop = esize * m * d + esize * 2 * cfg["tile_n"] * d * cfg["num_stages"] + w + k0
    epilogue = (esize * m * d + esize * d * d + w + 4 * m) if linear else 0   # φ(Q), H_i, W, den
    return max(loop, epilogue) + 1024


def _check_keys(cfg: dict, allowed: set, where: str = "config") -> None:
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = allowed - set(cfg)
    if missing:
        raise ValueError(f"{where} lacks keys {sorted(missing)}")


def _chooser(cfg: dict, where: str = "config"):
    """``choice(name, options, divides=None)``: raise unless cfg[name] is one of options (dividing ``divides``)."""
    def choice(name, options, divides=None):
        val = cfg[name]
        if isinstance(val, bool) or val not in options or (divides and divides % val):
            extra = f" dividing {divides}" if divides else ""
            raise ValueError(f"{where}[{name!r}]={val!r} is not supported; allowed: "
                             f"{', '.join(map(str, options))}{extra}")
    return choice


def _check_keys_per_step(value, spec: KernelSpec, where: str) -> None:
    """Keys per loop step (``where``): 32, 64 or 128 dividing block_k, or 2·block_k (two selected key blocks
    per step, the forward's and dq's ``tile_n``)."""
    _chooser({"tile_n": value}, where)("tile_n", (32, 64, 128))
    if spec.block_k % value and value != 2 * spec.block_k:
        raise ValueError(f"{where}['tile_n']={value} must divide block_k={spec.block_k} or be 2·block_k "
                         f"(two selected key blocks per step)")


def check_config(cfg: dict, spec: KernelSpec) -> None:
    """Raise ValueError naming the first invalid tunable of ``cfg`` for ``spec`` (either role)."""
    if spec.role == "backward":
        _check_backward_config(cfg, spec)
        return
    _check_keys(cfg, set(_DEFAULTS[128]))
    choice = _chooser(cfg)
    choice("tile_m", (64, 128), spec.block_q)
    _check_keys_per_step(cfg["tile_n"], spec, "config")
    choice("num_warps", (4, 8))
    choice("num_stages", (1, 2, 3, 4))
    choice("pre_tile", (32, 64, 128), spec.block_k if spec.scope == "marginal" else None)
    choice("pre_warps", (4, 8))
    choice("pre_stages", (1, 2, 3))
    if not isinstance(cfg["warp_specialized"], bool):
        raise ValueError(f"config['warp_specialized']={cfg['warp_specialized']!r} must be True or False")
    if not cfg["warp_specialized"] and (cfg["num_stages"], cfg["pre_stages"]) != (1, 1):
        raise ValueError("config warp_specialized=False needs num_stages=1 and pre_stages=1 (TileLang 0.1.15's "
                         "software pipeliner emits a run-time wait count for a run-time trip count, which fails "
                         "codegen)")
    if cfg["tile_m"] == 64 and cfg["num_warps"] == 8:
        raise ValueError("config tile_m=64 with num_warps=8 is not supported (TileLang layout inference "
                         "rejects it); use num_warps=4")
    choice("ctas_per_sm", (1, 2))
    choice("tail_split", tuple(range(1, TAIL_SPLIT_MAX + 1)))
    if cfg["tail_split"] > 1 and not _splits_tail(cfg, spec):
        raise ValueError("config tail_split > 1 needs one key block per loop step, walked last-first: the "
                         "overlapped loop (tile_n dividing block_k) or the plain one with tile_n = block_k; not "
                         "pingpong, persistent or two key blocks per step (use tail_split=1)")
    for name in ("pre_async", "pre_overlap", "prefetch_h", "tma_store", "overlap", "pingpong", "persistent",
                 "lazy_rescale", "tree_max"):
        if not isinstance(cfg[name], bool):
            raise ValueError(f"config[{name!r}]={cfg[name]!r} must be True or False")
    if cfg["pre_async"] and not cfg["warp_specialized"]:
        raise ValueError("config pre_async=True needs warp_specialized=True (warp_specialized=False is the fallback "
                         "without TMA lowering; pre_async issues its own TMA stores)")
    if cfg["pre_overlap"] and not cfg["warp_specialized"]:
        raise ValueError("config pre_overlap=True needs warp_specialized=True (measured and tested with the "
                         "warp-specialised pre-pass only)")
    if cfg["overlap"] and not cfg["warp_specialized"]:
        raise ValueError("config overlap=True needs warp_specialized=True (the overlapped loop relies on the "
                         "producer warpgroup's barriers to keep a K / V tile until the wgmma reading it is done)")
    if cfg["pingpong"] and (cfg["overlap"] or not cfg["warp_specialized"] or cfg["num_warps"] != 8 or
                            cfg["tile_m"] != 128 or spec.block_k % cfg["tile_n"]):
        raise ValueError("config pingpong=True needs overlap=False (they are alternative key loops), "
                         "warp_specialized=True, num_warps=8 and tile_m=128 (two consumer warpgroups take turns) "
                         "and a tile_n dividing block_k")
    if cfg["persistent"]:
        why = persistent_applies(spec)
        if why:
            raise ValueError(f"config persistent=True does not serve {why}")
        loop = dict(tile_m=128, tile_n=64, num_warps=8, ctas_per_sm=1, prefetch_h=False, tma_store=True,
                    overlap=False, pingpong=False, warp_specialized=True)
        wrong = {name: cfg[name] for name, want in loop.items() if cfg[name] != want}
        if wrong or cfg["num_stages"] < 2:
            raise ValueError(f"config persistent=True needs {loop} and num_stages >= 2 (its own loop: "
                             f"two consumer warpgroups of 64 rows, TMA loads and stores); got "
                             f"{wrong or {'num_stages': cfg['num_stages']} }")
        for has_w in (False, True):
            need = shared_bytes(cfg, spec, has_w)
            if need > SHARED_MEMORY:
                raise ValueError(f"config persistent=True with num_stages={cfg['num_stages']} needs about "
                                 f"{need // 1024} KiB of shared memory{' with a Proj weight' if has_w else ''}; "
                                 f"sm90 has {SHARED_MEMORY // 1024} KiB per block (use fewer stages)")
        return
    if cfg["ctas_per_sm"] == 2 and cfg["num_warps"] != 4:
        raise ValueError("config ctas_per_sm=2 needs num_warps=4 (one consumer warpgroup: two CTAs of 256 threads "
                         "at 128 registers each fill the SM's register file)")
    need = shared_bytes(cfg, spec, has_w=True)     # the largest variant: a call with Proj's weight
    if need > SHARED_MEMORY:
        raise ValueError(f"config needs about {need // 1024} KiB of shared memory; sm90 has "
                         f"{SHARED_MEMORY // 1024} KiB per block")
    need = shared_bytes(cfg, spec)                 # without it (a call with W runs one CTA per SM where
    if need * cfg["ctas_per_sm"] > SHARED_MEMORY_PER_SM:   # two do not fit: forward_ctas_per_sm)
        raise ValueError(f"config ctas_per_sm={cfg['ctas_per_sm']}: each CTA needs about {need // 1024} KiB of "
                         f"shared memory, {cfg['ctas_per_sm']} of them more than an sm90 SM's "
                         f"{SHARED_MEMORY_PER_SM // 1024} KiB; use ctas_per_sm=1 (or fewer stages)")


def _splits_tail(cfg: dict, spec: KernelSpec) -> bool:
    """Whether the forward loop of ``cfg`` can run as a split tail (tail_split > 1): one key block per step,
    walked last-first, in the per-tile kernel."""
    return not (cfg["persistent"] or cfg["pingpong"] or cfg["tile_n"] == 2 * spec.block_k or
                (cfg["tile_n"] != spec.block_k and not cfg["overlap"]))


def _default_backward_config(spec: KernelSpec) -> dict:
    base = _BWD_DEFAULTS[spec.head_dim]
    dq, kv = dict(base["dq"]), dict(base["dkdv"])
    dq["tile_m"], dq["tile_n"] = min(dq["tile_m"], spec.block_q), min(dq["tile_n"], spec.block_k)
    kv["tile_m"], kv["tile_n"] = min(kv["tile_m"], spec.block_q), min(kv["tile_n"], spec.block_k)
    if dq["tile_m"] < 128:
        dq["num_warps"] = 4
    cfg = {**base, "dq": dq, "dkdv": kv, "linear": {part: dict(v) for part, v in base["linear"].items()}}
    linear = linear_config(spec, cfg["linear"])
    for part in (dq, kv):   # the linear terms in the kernels' epilogues wherever they apply
        part["lin_fused"] = _lin_fused_blocker(part, spec, linear) is None
    kv["pair"] = _pair_blocker(kv, spec, cfg["warp_specialized"]) is None
    dq["h_prefetch"] = _h_prefetch_blocker(dq, spec) is None
    cfg["query_state"] = "triton" if _query_state_blocker(spec) else "tilelang"
    try:
        _check_backward_config(cfg, spec)
    except ValueError:      # the TileLang tiles do not fit these blocks: the Triton backward serves them
        cfg["backward"] = "triton"
    return cfg


def backward_shared_bytes(part: dict, spec: KernelSpec, kernel: str) -> int:
    """Shared memory of a backward kernel (``kernel`` 'dq' or 'dkdv', ``part`` its tunables): the CTA's own
    two tiles (Q, dO or K, V) plus num_stages pairs of the streamed tiles, bf16/fp16."""
    own, streamed = (part["tile_m"], part["tile_n"]) if kernel == "dq" else (part["tile_n"], part["tile_m"])
    return 2 * spec.head_dim * 2 * (own + streamed * part["num_stages"]) + 1024


def _check_backward_config(cfg: dict, spec: KernelSpec) -> None:
    """Validate a role-'backward' config; the kernel tunables only matter (and are checked) for 'tilelang'."""
    _check_keys(cfg, set(_BWD_DEFAULTS[128]))
    if cfg["backward"] not in BACKWARDS:
        raise ValueError(f"config['backward']={cfg['backward']!r} is not supported; allowed: {', '.join(BACKWARDS)}")
    if not isinstance(cfg["warp_specialized"], bool):
        raise ValueError(f"config['warp_specialized']={cfg['warp_specialized']!r} must be True or False")
    if cfg["query_state"] not in QUERY_STATES:
        raise ValueError(f"config['query_state']={cfg['query_state']!r} is not supported; allowed: "
                         f"{', '.join(QUERY_STATES)}")
    why = cfg["query_state"] == "tilelang" and _query_state_blocker(spec)
    if why:
        raise ValueError(f"config['query_state']='tilelang' needs {why}; use 'triton'")
    if cfg["backward"] == "triton":
        return
    linear = linear_config(spec, cfg["linear"])
    for kernel, rows, other in (("dq", "tile_m", "tile_n"), ("dkdv", "tile_n", "tile_m")):
        part, where = cfg[kernel], f"config[{kernel!r}]"
        if not isinstance(part, dict):
            raise ValueError(f"{where} must be a dict of tunables, got {part!r}")
        if kernel == "dkdv" and "ctas_per_sm" in part:
            raise ValueError(f"{where}: 'ctas_per_sm' is no longer a tunable: two dK/dV CTAs per SM hung the GPU at "
                             f"random (H200, session 35; docs/perf-notes.md); dK/dV runs one CTA per SM")
        _check_keys(part, set(_BWD_DEFAULTS[128][kernel]), where)
        choice = _chooser(part, where)
        # The CTA's own rows are the wgmma M dimension: 64 per consumer warpgroup.
        choice(rows, (64, 128), spec.block_q if kernel == "dq" else spec.block_k)
        if kernel == "dq":
            _check_keys_per_step(part[other], spec, where)
        else:
            choice(other, (32, 64, 128), spec.block_q)
        choice("num_warps", (4, 8))
        choice("num_stages", (1, 2, 3, 4))
        for name in ("lin_init", "tma_store", "lin_fused") + (("row_regs", "h_prefetch") if kernel == "dq" else ()):
            if not isinstance(part[name], bool):
                raise ValueError(f"{where}[{name!r}]={part[name]!r} must be True or False")
        why = kernel == "dq" and part["h_prefetch"] and _h_prefetch_blocker(part, spec)
        if why:
            raise ValueError(f"{where}: h_prefetch=True needs {why}")
        if kernel == "dq" and part["row_regs"] and spec.head_dim != 128:
            raise ValueError(f"{where}: row_regs=True is supported at head_dim 128 only (at {spec.head_dim} ptxas "
                             f"reuses the registers of its step-0 copies of Q and dO inside the key loop: a wrong "
                             f"dQ; backends/sass.py)")
        if kernel == "dq" and part["row_regs"] and part["tile_n"] == 2 * spec.block_k:
            raise ValueError(f"{where}: row_regs=True with two key blocks per step (tile_n={part['tile_n']}) is not "
                             f"supported: Q and dO in registers beside 128-key score tiles spill (ptxas: 192 bytes, "
                             f"its wgmma serialised)")
        if kernel == "dkdv" and not isinstance(part["pair"], bool):
            raise ValueError(f"{where}['pair']={part['pair']!r} must be True or False")
        why = kernel == "dkdv" and part["pair"] and _pair_blocker(part, spec, cfg["warp_specialized"])
        if why:
            raise ValueError(f"{where}: pair=True needs {why}; pair=False runs one consumer warpgroup")
        if part[rows] == 64 and part["num_warps"] == 8:
            raise ValueError(f"{where}: {rows}=64 with num_warps=8 is not supported (TileLang layout inference "
                             f"rejects it); use num_warps=4")
        if not cfg["warp_specialized"] and part["num_stages"] != 1:
            raise ValueError(f"config warp_specialized=False needs {kernel} num_stages=1 (TileLang 0.1.15's "
                             f"software pipeliner fails codegen for a run-time trip count)")
        need = backward_shared_bytes(part, spec, kernel)
        if need > SHARED_MEMORY:
            raise ValueError(f"{where} needs about {need // 1024} KiB of shared memory; sm90 has "
                             f"{SHARED_MEMORY // 1024} KiB per block")
    for kernel in ("dq", "dkdv"):
        if cfg[kernel]["lin_fused"]:
            _check_lin_fused(kernel, cfg[kernel], spec, linear)


def _lin_fused_blocker(part: dict, spec: KernelSpec, linear: dict) -> Optional[str]:
    """Why lin_fused cannot serve a kernel config ``part`` ('dq' or 'dkdv') of ``spec``, or None: the kernel adds
    its linear-branch terms from the per-block sums the glue's mask GEMMs form (H_i or G_j: scope 'marginal', GEMM
    states), read as tensor-core operands in the input dtype (bf16: the states are bf16)."""
    return ("a linear branch" if spec.feature_map is None else "scope 'marginal'" if spec.scope != "marginal"
            else "bf16 inputs (the linear states are bf16)" if spec.dtype != "bf16"
            else "lin_init=False" if part["lin_init"]
            else "the GEMM states (config['linear']['prep']['marginal_states']='gemm')"
            if linear["prep"].get("marginal_states", "gemm") != "gemm" else None)


def _pair_blocker(part: dict, spec: KernelSpec, warp_specialized: bool) -> Optional[str]:
    """Why the dkdv config ``part`` cannot run as dkdv_pair_kernel (two consumer warpgroups taking alternate 64-row
    query steps; the default wherever it can run), or None."""
    return ("bf16 inputs (consumer 1 hands its fp32 sums over as bf16 pairs)" if spec.dtype != "bf16"
            else "block_k = 64" if spec.block_k != 64
            else "tile_n = 64 and tile_m = 64" if (part["tile_n"], part["tile_m"]) != (64, 64)
            else "lin_init=False" if part["lin_init"]
            else "warp_specialized=True (it is hand-specialised, with TMA)" if not warp_specialized
            else "num_stages >= 2 (consumer 1 hands its sums over in two of its stages)" if part["num_stages"] < 2
            else f"fewer stages (K, V, G_j and two consumers' {part['num_stages']} Q / dO stages need "
                 f"{pair_shared_bytes(part, spec) // 1024} KiB of shared memory)"
            if pair_shared_bytes(part, spec) > SHARED_MEMORY else None)


def pair_shared_bytes(part: dict, spec: KernelSpec) -> int:
    """Shared memory of dkdv_pair_kernel: K, V, each consumer's num_stages Q and dO tiles (64 rows), G_j with
    lin_fused (D × D), the LSE / DS rows and barriers, bf16."""
    d = spec.head_dim
    return 2 * d * (2 * 64 + 2 * 2 * 64 * part["num_stages"]) + (2 * d * d if part["lin_fused"] else 0) + 3072


def _h_prefetch_blocker(part: dict, spec: KernelSpec) -> Optional[str]:
    """Why the dq config ``part`` cannot take h_prefetch (H_i held in the consumers' registers through the key
    loop: D·D / (32·num_warps) values per thread), or None."""
    if not part["lin_fused"]:
        return "lin_fused=True (it loads the H_i that lin_fused reads)"
    if spec.head_dim * spec.head_dim // (32 * part["num_warps"]) > 64:
        return (f"num_warps=8 at head_dim {spec.head_dim} (with {part['num_warps']} warps H_i is "
                f"{spec.head_dim * spec.head_dim // (32 * part['num_warps'])} values per thread: ptxas spills)")
    return None


def _query_state_blocker(spec: KernelSpec) -> Optional[str]:
    """Why the TileLang query-state kernel cannot serve ``spec``, or None. It replaces the Triton _lin_rows +
    _query_state where the forward kept H_i, Z_i (a linear branch, scope 'marginal'), reading H_i as a bf16
    tensor-core operand beside Q and dO (bf16 inputs: the states are bf16)."""
    return ("a linear branch" if spec.feature_map is None else "scope 'marginal'" if spec.scope != "marginal"
            else "bf16 inputs (the linear states are bf16)" if spec.dtype != "bf16" else None)


def query_state_stages(spec: KernelSpec, has_w: bool) -> int:
    """The query-state kernel's pipeline depth: 2 (the next query block's Q, dO, H_i land while one computes)
    where two stages fit the shared memory beside Proj's W and dO·W tiles, else 1."""
    d, m = spec.head_dim, spec.block_q
    stage = 2 * (2 * m * d + d * d)
    fixed = 2 * m * 16 + (2 * (d * d + m * d) if has_w else 0) + 1024
    return 2 if 2 * stage + fixed <= SHARED_MEMORY else 1


def query_state_chunk(tm: int, heads: int, sms: int) -> int:
    """Query blocks per CTA of the query-state kernel: enough that the CTAs of all ``heads`` (B·H) heads of
    ``tm`` query blocks each fit one wave of ``sms`` SMs (one CTA each), so each CTA's pipeline runs long."""
    return max(-(-tm * heads // max(sms, 1)), 1)


def _check_lin_fused(kernel: str, part: dict, spec: KernelSpec, linear: dict) -> None:
    why = _lin_fused_blocker(part, spec, linear)
    if why:
        raise ValueError(f"config[{kernel!r}]['lin_fused']=True needs {why}")


def linear_config(spec: KernelSpec, overrides, base: Optional[dict] = None) -> dict:
    """The Triton backward config of the linear part: ``base`` (the Triton backward's tuned config of the call,
    which slagen.backends.triton.backward_linear_part passes; None: its default config of ``spec``, with
    _SUMS_PREP where the forward keeps the linear sums, rows at most the blocks) with ``overrides`` (the TileLang
    backward config's "linear": {"prep" | "dq" | "dkdv": {key: value}}) applied, validated by the Triton
    backward's check_config. Without ``base`` the result is memoised per (spec, overrides): read-only."""
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ValueError(f"config['linear']={overrides!r} must be a dict of dicts (Triton backward tunables)")
    if base is not None:
        return _linear_config(spec, overrides, base)
    # (an unhashable tunable forms no key: built each time, so check_config names what is wrong with it)
    return _LINEAR_CONFIGS.get(
        lambda: (spec, tuple(sorted((part, tuple(sorted(v.items()))) for part, v in overrides.items()))),
        lambda key: _linear_config(spec, overrides, None))


def _linear_config(spec: KernelSpec, overrides: dict, base: Optional[dict]) -> dict:
    """:func:`linear_config` without the memo."""
    from slagen.backends.triton import bwd
    unknown = set(overrides) - {"prep", "dq", "dkdv"}
    if unknown:
        raise ValueError(f"config['linear'] has unknown keys {sorted(unknown)}; allowed: ['dkdv', 'dq', 'prep']")
    if base is not None:
        cfg = copy_config(base)
    else:
        cfg = bwd.default_config(spec)
        if keeps_linear_sums("tilelang", True, spec.feature_map or "none", spec.scope):
            prep = _SUMS_PREP.get(spec.head_dim, {})
            cfg["prep"].update(prep, rows=min(prep.get("rows", cfg["prep"]["rows"]), spec.block_q, spec.block_k))
    for part, values in overrides.items():
        cfg[part].update(values)
    return bwd.check_config(cfg, spec)


def _call_config(spec: KernelSpec, q: torch.Tensor, k: torch.Tensor, maps, config: Optional[dict]) -> dict:
    """The resolved config of a call: ``config``, else the tuned one of this GPU and shape, else defaults."""
    return _config_for(spec, q, k, maps[1].shape[-1] / max(maps[0].shape[-1], 1), config)


def _config_for(spec: KernelSpec, q: torch.Tensor, k: torch.Tensor, density: float, config: Optional[dict]) -> dict:
    """:func:`_call_config` for a map of ``density`` (n_crit / T_n) not formed yet. The tuned-or-default config
    (``config`` None) is resolved once per spec, device, key length, density and generation of
    slagen.autotune.select's memo (a ``slagen tune`` in the process is seen by the next call): read-only."""
    if config is not None:
        return _resolve_config(spec, config)
    from slagen.autotune import select
    return _RESOLVED_CONFIGS.get(
        lambda: (spec, q.device, k.shape[-2], density, select.generation()),
        lambda key: _resolve_config(spec, select.config_for(spec, "tilelang", q.device, k.shape[-2], density,
                                                            check=check_config)))


def _resolve_config(spec: KernelSpec, config: Optional[dict]) -> dict:
    """The defaults of ``spec`` updated with ``config`` (per kernel for the backward's 'dq' / 'dkdv'
    parts), validated."""
    cfg = default_config(spec)
    for name, value in (config or {}).items():
        cfg[name] = {**cfg[name], **value} if isinstance(cfg.get(name), dict) and isinstance(value, dict) else value
    for name in ("overlap", "pre_async", "pre_overlap"):   # defaults, not the caller's choice: need warp specialisation
        if cfg.get(name) and name not in (config or {}) and not cfg["warp_specialized"]:
            cfg[name] = False
    if spec.role != "backward" and "tail_split" not in (config or {}) and not _splits_tail(cfg, spec):
        cfg["tail_split"] = 1               # a default, giving way to the caller's loop
    dq, asked = cfg.get("dq"), (config or {}).get("dq")
    if isinstance(dq, dict) and dq.get("row_regs") and dq.get("tile_n") == 2 * spec.block_k and not (
            isinstance(asked, dict) and "row_regs" in asked):
        dq["row_regs"] = False              # a default, giving way to the caller's two key blocks per step
    if config and spec.role == "backward" and cfg["backward"] == "tilelang":
        linear = None
        for kernel in ("dq", "dkdv"):   # a default lin_fused gives way to the caller's lin_init or gathered states
            part, asked = cfg[kernel], (config or {}).get(kernel, {})
            if isinstance(part, dict) and part.get("lin_fused") and isinstance(asked, dict) and \
                    "lin_fused" not in asked:      # (check_config reports a malformed part or "linear")
                linear = linear or linear_config(spec, cfg["linear"])
                part["lin_fused"] = _lin_fused_blocker(part, spec, linear) is None
        kv, asked = cfg["dkdv"], (config or {}).get("dkdv", {})
        if isinstance(kv, dict) and kv.get("pair") is True and isinstance(asked, dict) and "pair" not in asked \
                and all(isinstance(kv[k], int) for k in ("tile_n", "tile_m", "num_stages")):
            # a default, giving way to the caller's dkdv or warp_specialized (check_config reports a malformed one)
            kv["pair"] = _pair_blocker(kv, spec, cfg["warp_specialized"]) is None
        dq, asked = cfg["dq"], (config or {}).get("dq", {})
        if isinstance(dq, dict) and dq.get("h_prefetch") and isinstance(asked, dict) and "h_prefetch" not in asked \
                and isinstance(dq["num_warps"], int):   # a default, giving way to the caller's dq (check_config
            dq["h_prefetch"] = _h_prefetch_blocker(dq, spec) is None   # reports a malformed num_warps)
    check_config(cfg, spec)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------------

_CACHE_USERS = 0


@contextlib.contextmanager
def _tilelang_cache():
    """Point TileLang's kernel cache at ``<slagen cache dir>/tilelang`` while slagen compiles (restored
    when the last concurrent compile ends; TileLang reads the variable at each access)."""
    global _CACHE_USERS, _CACHE_SAVED
    path = str(cache_dir() / "tilelang")
    with _LOCK:
        if _CACHE_USERS == 0:
            _CACHE_SAVED = os.environ.get("TILELANG_CACHE_DIR")
        _CACHE_USERS += 1
        os.environ["TILELANG_CACHE_DIR"] = path
    try:
        yield path
    finally:
        with _LOCK:
            _CACHE_USERS -= 1
            if _CACHE_USERS == 0:
                if _CACHE_SAVED is None:
                    os.environ.pop("TILELANG_CACHE_DIR", None)
                else:
                    os.environ["TILELANG_CACHE_DIR"] = _CACHE_SAVED


def pass_configs(warp_specialized: bool = True, hand_specialized: bool = False) -> dict:
    """TileLang pass configs: fast math; ``warp_specialized`` False turns TileLang's warp specialisation and
    TMA lowering off (the fallback); ``hand_specialized`` (the persistent forward, which splits producer and
    consumer itself) turns the automatic warp specialisation off and keeps TMA."""
    import tilelang
    cfg = {tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True}
    if hand_specialized or not warp_specialized:
        cfg[tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED] = True
    if not warp_specialized:    # (warp specialisation off alone fails codegen in 0.1.15 for these kernels)
        cfg[tilelang.PassConfigKey.TL_DISABLE_TMA_LOWER] = True
    return cfg


def _compile(key: tuple, make, warp_specialized: bool, hand_specialized: bool = False):
    """Compile (once per process and key) the prim_func ``make()`` for sm_90a; TileLang's disk cache
    makes a new process's compile a load. Different keys may compile in parallel threads."""
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    with _LOCK:
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:
        kernel = _KERNELS.get(key)
        if kernel is None:
            missing = tilelang_import_error()
            if missing:
                raise RuntimeError(missing)
            import tilelang
            cuda_rewrites.register()
            with _tilelang_cache():
                kernel = tilelang.compile(make(), target=TARGET,
                                          pass_configs=pass_configs(warp_specialized, hand_specialized))
            _KERNELS[key] = kernel
        return kernel


def _module(spec: KernelSpec):
    """The rendered template module of ``spec`` (rendering serialised: codegen's temp file is per process)."""
    with _LOCK:
        return codegen.load(spec, "tilelang")


def forward_ctas_per_sm(spec: KernelSpec, cfg: dict, save: bool, has_w: bool) -> int:
    """The resident CTAs per SM the forward kernel of a call asks for: the config's ``ctas_per_sm``, but one for a
    call that applies Proj's weight in the kernel (``has_w``) where two CTAs with W's tile do not fit an SM's shared
    memory, and always for the training forward with Proj (two of those CTAs hung on an H200, session 5)."""
    if cfg["ctas_per_sm"] > 1 and has_w and (
            save or cfg["ctas_per_sm"] * shared_bytes(cfg, spec, has_w=True) > SHARED_MEMORY_PER_SM):
        return 1
    return cfg["ctas_per_sm"]


def forward_kernel(spec: KernelSpec, cfg: dict, *, save: bool = False, has_w: bool = False,
                   has_bias: bool = False, tail: bool = False):
    """The compiled forward kernel of ``spec`` for tunables ``cfg`` and the epilogue flags; ``tail``: the kernel
    of the split tail launch (config tail_split > 1; see :func:`tail_plan`)."""
    if tail and (cfg["persistent"] or cfg["tail_split"] < 2):
        raise ValueError("tail=True needs a per-tile config with tail_split > 1")
    linear = spec.feature_map is not None
    save, has_w, has_bias = (bool(save) and linear, bool(has_w) and linear, bool(has_bias) and linear)
    mod = _module(spec)
    if cfg["persistent"]:
        args = dict(num_stages=persistent_stages(cfg, has_w), save=save, has_w=has_w, has_bias=has_bias,
                    lazy_rescale=cfg["lazy_rescale"], tree_max=cfg["tree_max"])
        key = ("forward-persistent", spec, tuple(sorted(args.items())))
        return _compile(key, lambda: mod.persistent_forward_kernel(**args), True, hand_specialized=True)
    ctas_per_sm = forward_ctas_per_sm(spec, cfg, save, has_w)
    args = dict(tile_m=cfg["tile_m"], tile_n=cfg["tile_n"], threads=32 * cfg["num_warps"],
                num_stages=cfg["num_stages"], ctas_per_sm=ctas_per_sm, prefetch_h=cfg["prefetch_h"] and linear,
                tma_store=cfg["tma_store"], save=save, has_w=has_w, has_bias=has_bias, overlap=cfg["overlap"],
                pingpong=cfg["pingpong"], tail_split=tail,
                reg_handover=ctas_per_sm > 1 and bool(cfg["warp_specialized"]), lazy_rescale=cfg["lazy_rescale"],
                tree_max=cfg["tree_max"])
    key = ("forward", spec, tuple(sorted(args.items())), cfg["warp_specialized"])
    return _compile(key, lambda: mod.forward_kernel(**args), cfg["warp_specialized"])


def prepass_kernel(spec: KernelSpec, cfg: dict, pool: str = ""):
    """The compiled linear pre-pass of ``spec`` (linear branch only); ``pool`` 'k' / 'qk' (scope 'marginal'):
    the variant that also pools K / K and Q for the block map (see :func:`early_terms`)."""
    if spec.feature_map is None:
        raise ValueError("a sparse-only spec (feature_map=None) has no linear pre-pass")
    if pool and spec.scope != "marginal":
        raise ValueError(f"only the pre-pass of scope 'marginal' pools (pool={pool!r}, scope={spec.scope!r})")
    args = dict(tile=cfg["pre_tile"], threads=32 * cfg["pre_warps"], num_stages=cfg["pre_stages"],
                async_h=cfg["pre_async"] and spec.scope == "marginal")
    if pool:
        args["pool"] = pool
    if cfg["pre_overlap"] and spec.scope == "marginal":
        args["overlap"] = True
    key = ("prepass", spec, tuple(sorted(args.items())), cfg["warp_specialized"])
    mod = _module(spec)
    return _compile(key, lambda: mod.prepass_kernel(**args), cfg["warp_specialized"])


def backward_kernel(spec: KernelSpec, cfg: dict, kernel: str, *, has_w: bool = False, has_b: bool = False):
    """The compiled backward kernel ``kernel`` of the role-'backward' ``spec``: 'dq' or 'dkdv' (the sparse branch)
    for the backward tunables ``cfg`` (its ``cfg[kernel]`` part and ``warp_specialized``), or 'query_state' (the
    linear branch's per-query-block state where the forward kept H_i, Z_i; ``has_w`` / ``has_b``: with Proj's
    weight / bias; always warp-specialised: its Q, dO, H_i are TMA loads of a pipelined loop over query blocks)."""
    if kernel == "query_state":
        why = _query_state_blocker(spec)
        if why:
            raise ValueError(f"the query-state kernel needs {why}")
        args = dict(num_stages=query_state_stages(spec, has_w), has_w=bool(has_w), has_b=bool(has_b))
        mod = _module(spec)
        return _compile((kernel, spec, tuple(sorted(args.items()))), lambda: mod.query_state_kernel(**args), True)
    part = cfg[kernel]
    mod = _module(spec)
    if kernel == "dkdv" and part["pair"]:
        args = dict(num_stages=part["num_stages"], tma_store=part["tma_store"], lin_fused=part["lin_fused"])
        return _compile(("dkdv-pair", spec, tuple(sorted(args.items()))), lambda: mod.dkdv_pair_kernel(**args), True,
                        hand_specialized=True)
    args = dict(tile_m=part["tile_m"], tile_n=part["tile_n"], threads=32 * part["num_warps"],
                num_stages=part["num_stages"], lin_init=part["lin_init"], tma_store=part["tma_store"])
    args["lin_fused"] = part["lin_fused"]
    if kernel == "dq":
        args["row_regs"] = part["row_regs"]
        args["h_prefetch"] = part["h_prefetch"]
    key = (kernel, spec, tuple(sorted(args.items())), cfg["warp_specialized"])
    make = mod.dq_kernel if kernel == "dq" else mod.dkdv_kernel
    return _compile(key, lambda: make(**args), cfg["warp_specialized"])


def _kernel_has_w(spec: KernelSpec, save: bool, has_w: bool) -> bool:
    """Whether the forward kernel applies Proj's W itself: not for scope 'all' without saving, where W folds
    into the per-head H before the kernel runs."""
    return has_w and not (spec.scope == "all" and not save)


def compile_for_call(spec: KernelSpec, config: Optional[dict], *, save: bool, has_w: bool, has_bias: bool) -> list:
    """Compile (without running) the kernels a forward call with these flags launches: its forward variant
    and, with a linear branch, the pre-pass. The autotuner compiles its candidates with this on threads."""
    cfg = _resolve_config(spec, config)
    out = [forward_kernel(spec, cfg, save=save, has_w=_kernel_has_w(spec, bool(save), has_w), has_bias=has_bias)]
    if spec.feature_map is not None:
        out.append(prepass_kernel(spec, cfg))
        out += [prepass_kernel(spec, cfg, pool) for pool in _pooling_prepasses(spec, cfg)[:1]]
    return out


def _pooling_prepasses(spec: KernelSpec, cfg: dict) -> Tuple[str, ...]:
    """The pooling variants of the pre-pass an eager call of ``spec`` with ``cfg`` may launch
    (:func:`early_terms`): 'qk' (Lq = Lk) and 'k', 'k' alone, or none."""
    tq, tk = pool_tiles(spec.head_dim, spec.block_q, spec.block_k)
    if spec.feature_map is None or spec.scope != "marginal" or not cfg["warp_specialized"] or cfg["pre_tile"] != tk:
        return ()
    return ("qk", "k") if tq == tk else ("k",)


def build(spec: KernelSpec, config: Optional[dict] = None, *, variants: str = "all",
          jobs: Optional[int] = None) -> list:
    """Compile ``spec``'s kernels without running them (no GPU needed); returns the JITKernels.

    Role 'forward' — variants: 'all' — every epilogue variant {save} × {Proj weight} × {bias} (and each one's
    split-tail kernel, config tail_split > 1) plus the pre-pass and its pooling variants; 'default' — the
    inference variant without Proj plus the pre-pass and its self-attention pooling variant. Role 'backward':
    the dq and dk/dv kernels when the config picks the TileLang backward (none when it picks Triton's, which
    compiles at first use). Role 'block_map': the pooling kernels (the scores and selection are Triton's). The
    kernels compile on ``jobs`` threads (default: the CPU count, at most 8): lowering and nvcc overlap (1.7× on
    2 cores).
    """
    if spec.role == "block_map":
        makers = [functools.partial(pool_kernel, spec, tile)
                  for tile in sorted(set(pool_tiles(spec.head_dim, spec.block_q, spec.block_k)))]
    elif spec.role == "backward":
        cfg = _resolve_config(spec, config)
        makers = [functools.partial(backward_kernel, spec, cfg, kernel) for kernel in ("dq", "dkdv")
                  if cfg["backward"] == "tilelang"]
        if cfg["backward"] == "tilelang" and cfg["query_state"] == "tilelang":
            flags = [(w, b) for w in (False, True) for b in (False, True)] if variants == "all" else [(False, False)]
            makers += [functools.partial(backward_kernel, spec, cfg, "query_state", has_w=w, has_b=b)
                       for w, b in flags]
    else:
        cfg = _resolve_config(spec, config)
        linear = spec.feature_map is not None
        flags = [(False, False, False)]
        if linear and variants == "all":
            flags = [(s, w, b) for s in (False, True) for w in (False, True) for b in (False, True)]
        tails = (False, True) if cfg["tail_split"] > 1 and not cfg["persistent"] else (False,)
        makers = [functools.partial(forward_kernel, spec, cfg, save=s, has_w=w, has_bias=b, tail=t)
                  for s, w, b in flags for t in tails]
        if linear:
            makers.append(functools.partial(prepass_kernel, spec, cfg))
            pools = _pooling_prepasses(spec, cfg)
            makers += [functools.partial(prepass_kernel, spec, cfg, pool)
                       for pool in (pools if variants == "all" else pools[:1])]
    with ThreadPoolExecutor(max_workers=codegen.compile_threads(jobs)) as pool:
        return list(pool.map(lambda make: make(), makers))


# ----------------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------------

def kernel_spec(q: torch.Tensor, *, block_q: int, block_k: int, feature_map: str, scope: str,
                has_negligible: bool) -> KernelSpec:
    """The forward KernelSpec of a call (always sm90: the kernels are compiled for sm_90a)."""
    return call_spec(q, DTYPES, "TileLang", arch="sm90", block_q=block_q, block_k=block_k, feature_map=feature_map,
                     scope=scope, has_negligible=has_negligible, role="forward")


def _check_tma(name: str, x: torch.Tensor) -> None:
    """TMA needs unit stride on D, 16-byte aligned base and 16-byte multiple strides."""
    esize = x.element_size()
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride on the head dimension, got strides {tuple(x.stride())}")
    bad = [s for s, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1 and (s * esize) % 16]
    if bad or x.data_ptr() % 16:
        raise ValueError(f"{name} (strides {tuple(x.stride())}, {esize}-byte elements) cannot be read by the "
                         f"TileLang kernels: TMA needs a 16-byte aligned base and strides that are multiples of "
                         f"16 bytes; pass a .contiguous() tensor or use backend='triton'")
    if sum((n - 1) * s for n, s in zip(x.shape, x.stride()) if n > 0) >= 2 ** 31:
        raise ValueError(f"{name} spans 2**31 elements or more, beyond the TileLang kernels' 32-bit strides")


def _check_inputs(q, k, v, maps, proj_weight, proj_bias) -> None:
    check_forward_inputs(q, k, v, maps, proj_weight, proj_bias)
    if q.device.type != "cuda" or k.device != q.device or v.device != q.device:
        raise ValueError(f"the TileLang kernels need q, k, v on one CUDA device; got {q.device}, {k.device}, "
                         f"{v.device}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[-1]} is not supported by the TileLang kernels; allowed: "
                         f"{', '.join(map(str, HEAD_DIMS))}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tma(name, x)


def _persistent_grid(device: torch.device, tiles: int) -> torch.Tensor:
    """The persistent forward's GRID argument: an int32 vector (never read) whose length is its grid, the
    device's SM count or ``tiles`` if fewer."""
    sms = _sm_count(device)
    return _grid_lengths(device, sms)[:min(tiles, sms)]


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def tail_plan(tq: int, heads: int, sms: int, most: int) -> Tuple[int, int]:
    """(cols, parts): the per-tile forward's split tail. The last ``cols`` query tiles of each of the ``heads``
    (B·H) heads go to a second launch in which each runs as ``parts`` CTAs over a share of its critical blocks,
    so that the first launch's (tq - cols)·heads tiles fill whole waves of ``sms`` CTAs and the split tiles a
    short one. Chosen by a wave count: a launch of n CTAs of t tiles' work takes ceil(n / sms)·t; the split
    launch pays TAIL_OVERHEAD (a launch, the merge) on top, and is taken only where that is less than the
    unsplit ceil(tq·heads / sms). (0, 1): no split (``most`` < 2, or nothing gained)."""
    best, plan = -(-tq * heads // sms), (0, 1)
    for cols in range(1, tq + 1):
        tiles = cols * heads
        parts = min(most, sms // tiles)
        if parts < 2:
            break
        cost = -(-(tq - cols) * heads // sms) + 1 / parts + TAIL_OVERHEAD
        if cost < best - 1e-9:
            best, plan = cost, (cols, parts)
    return plan


def _grid_lengths(device: torch.device, n: int) -> torch.Tensor:
    """An int32 vector (never read) of at least ``n`` elements, whose prefixes set the forward's grids."""
    key = ("grid lengths", device)
    if key not in _DUMMIES or _DUMMIES[key]["grid"].numel() < n:
        _DUMMIES[key] = {"grid": torch.empty(max(n, 4096), dtype=torch.int32, device=device)}
    return _DUMMIES[key]["grid"]


def _tail_stand_ins(device: torch.device, tile_m: int, d: int) -> Tuple[torch.Tensor, ...]:
    """PO, PML, FLAG for the launch of whole tiles, which does not read them."""
    key = ("tail stand-ins", device, tile_m, d)
    if key not in _DUMMIES:
        _DUMMIES[key] = {"all": (torch.empty((1, tile_m, d), dtype=torch.float32, device=device),
                                 torch.empty((1, 2, tile_m), dtype=torch.float32, device=device),
                                 torch.zeros((1,), dtype=torch.int32, device=device))}
    return _DUMMIES[key]["all"]


def _dummies(device: torch.device, dtype: torch.dtype, d: int) -> Dict[str, torch.Tensor]:
    """Small stand-ins for the kernel inputs a variant does not read (their dynamic extents are free): the
    forward's Proj weight / bias, O^l and den outputs; the backward kernels' linear-branch sums and per-row
    vectors (without lin_fused); the query-state kernel's negligible counts (a spec without that class)."""
    key = (device, dtype, d)
    if key not in _DUMMIES:
        _DUMMIES[key] = dict(w=torch.zeros((1, 1), dtype=dtype, device=device),
                             bias=torch.zeros((1,), dtype=torch.float32, device=device),
                             o_lin=torch.zeros((1, 1, 1, d), dtype=dtype, device=device),
                             den=torch.zeros((1, 1, 1), dtype=torch.float32, device=device),
                             h=torch.zeros((1, 1, 1, d), dtype=dtype, device=device),
                             g=torch.zeros((1, 1, 1, d, d), dtype=dtype, device=device),
                             gz=torch.zeros((1, 1, 1, d), dtype=torch.float32, device=device),
                             count=torch.zeros((1, 1, 1), dtype=torch.int32, device=device))
    return _DUMMIES[key]


def _pool_stand_in(device: torch.device, B: int, H: int, d: int) -> torch.Tensor:
    """The stand-in (B, H, 1, D) fp32 for the pre-pass's pooled outputs it does not write (or Q's mean)."""
    key = ("pooled", device, B, H, d)
    if key not in _DUMMIES:
        _DUMMIES[key] = {"pooled": torch.zeros((B, H, 1, d), dtype=torch.float32, device=device)}
    return _DUMMIES[key]["pooled"]


def linear_terms_of(spec: KernelSpec, cfg: dict, k: torch.Tensor, v: torch.Tensor, kernel=None):
    """The pre-pass's key-side terms. Scope 'all': (H (B,H,D,D), Z (B,H,D)), fp32 sums over all keys.
    Scope 'marginal': (h_t (B,H,n,D,D) in k's dtype, z_t (B,H,n,D) fp32) per key tile of ``pre_tile`` keys,
    n = linear_terms.padded_rows(n_tiles) with the rows past n_tiles zero (no per-head total: the glue sums
    the marginal blocks' terms directly, by GEMMs whose K extent n is a multiple of 8). ``kernel``: the
    compiled pre-pass (a forward plan's), else looked up."""
    B, H, lk, d = k.shape
    n_tiles = math.ceil(lk / cfg["pre_tile"])
    chunks = linear_terms.prepass_chunks(n_tiles, B * H, k.device)
    kernel = kernel or prepass_kernel(spec, cfg)
    if spec.scope == "marginal":
        stand_in = _pool_stand_in(k.device, B, H, d)
        return _marginal_terms(kernel, k, v, cfg["pre_tile"], chunks, k, stand_in, stand_in, stand_in)
    hp = torch.empty((B, H, chunks[0], d, d), dtype=torch.float32, device=k.device)
    zp = torch.empty((B, H, chunks[0], d), dtype=torch.float32, device=k.device)
    kernel(k, v, hp, zp)
    return linear_terms.chunk_totals(hp, zp)


def _marginal_terms(kernel, k, v, tile: int, chunks: Tuple[int, int], q, k_mean, k_part, q_mean):
    """(h_t, z_t) of scope 'marginal' (see :func:`linear_terms_of`) from the pre-pass ``kernel`` over ``chunks``
    (count, tiles per chunk); q, k_mean, k_part, q_mean: its pooling arguments (read and written only by a
    pooling variant; stand-ins otherwise)."""
    B, H, lk, d = k.shape
    n_tiles = -(-lk // tile)
    n_rows = linear_terms.padded_rows(n_tiles)
    ht = torch.empty((B, H, n_rows, d, d), dtype=k.dtype, device=k.device)
    zt = torch.empty((B, H, n_rows, d), dtype=torch.float32, device=k.device)
    if n_rows > n_tiles:        # the kernel writes tiles 0..n_tiles-1 (its loop runs over Lk)
        ht[:, :, n_tiles:].zero_()
        zt[:, :, n_tiles:].zero_()
    with torch.cuda.device(k.device):
        kernel(k, v, ht, zt, chunks[0], chunks[1], q, k_mean, k_part, q_mean)
    return ht, zt


@dataclasses.dataclass
class EarlyPooled:
    """What the early pre-pass hands its block map (the ``pooled`` of :func:`block_map`): ``means`` (q̄, k̄,
    K's chunk sums) and ``marginal``, the buffers in which the map's selection writes the linear branch's
    marginal-block operands (the mask GEMM's 0/1 operand and Z_i, slagen.backends.triton.selection
    .MarginalOperands) in place of the forward's operand kernel and z GEMM; ``written`` once a map has."""
    means: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    marginal: object
    written: bool = False


@dataclasses.dataclass(frozen=True)
class EarlyTerms:
    """A scope-'marginal' pre-pass run before the block map (:func:`early_terms`): ``terms`` (h_t, z_t) for
    the forward, ``pooled`` (:class:`EarlyPooled`) for the block map, and the config it ran with (the
    forward checks it resolves the same)."""
    cfg: dict
    terms: Tuple[torch.Tensor, torch.Tensor]
    pooled: EarlyPooled


@dataclasses.dataclass(frozen=True)
class _EarlyPlan(plans.Plan):
    """What :func:`early_terms` decides for a call's layouts and flags: ``cfg`` None where it does not apply."""
    cfg: Optional[dict]
    pooling: Optional[_PoolPlan] = None
    kernel: object = None
    pool_q: bool = False


_EARLY_PLANS: plans.Plans[_EarlyPlan] = plans.Plans()


def early_terms(q, k, v, *, block_q: int, block_k: int, feature_map: Optional[str], scope: str,
                has_negligible: bool, density: float) -> Optional[EarlyTerms]:
    """The linear pre-pass of an eager SLA call, run before its block map so that it pools K for it — and Q
    when Lq = Lk — from the tiles it reads anyway (``sla_pool``'s macros and tile: the map is the same bits as
    :func:`block_map` gives without it). The caller passes ``pooled`` to :func:`block_map` and the result to
    :func:`forward` (``early``). ``density``: n_crit / T_n of the map to come (the tuned config's key).
    Without the negligible class the map's selection also forms the forward's marginal-block operands (the
    mask GEMM's 0/1 operand and Z_i: :class:`EarlyPooled`), so the forward launches no operand kernel and no
    z GEMM.

    None where it does not apply — a call without a linear branch, scope 'all', inputs ``sla_pool`` does not
    read, a config without warp specialisation or whose ``pre_tile`` is not K's pooling tile; arguments the
    forward rejects — and the call then pools in the block map and runs its pre-pass in the forward."""
    plan = _EARLY_PLANS.get(
        lambda: (plans.layout(q), plans.layout(k), plans.layout(v), block_q, block_k, feature_map, scope,
                 bool(has_negligible), density, plans.config_key(plans.TUNED)),
        lambda key: _build_early_plan(key, q, k, v, block_q, block_k, feature_map, scope, has_negligible, density))
    if plan.cfg is None:
        return None
    pooling = plan.pooling
    B, H, lk, d = k.shape
    k_mean = torch.empty((B, H, -(-lk // block_k), d), dtype=torch.float32, device=k.device)
    k_part = torch.empty((B, H, pooling.k_chunks[0], d), dtype=torch.float32, device=k.device)
    if plan.pool_q:
        q_mean = torch.empty((B, H, -(-q.shape[2] // block_q), d), dtype=torch.float32, device=q.device)
        terms = _marginal_terms(plan.kernel, k, v, pooling.tk, pooling.k_chunks, q, k_mean, k_part, q_mean)
    else:
        terms = _marginal_terms(plan.kernel, k, v, pooling.tk, pooling.k_chunks, k, k_mean, k_part,
                                _pool_stand_in(k.device, B, H, d))
        q_mean, _ = _pool_one(pooling.kernel_q, q, block_q, pooling.tq, pooling.q_chunks)
    marginal = None if has_negligible else _marginal_buffers(q, k, block_q, block_k, plan.cfg, terms[1])
    return EarlyTerms(plan.cfg, terms, EarlyPooled((q_mean, k_mean, k_part), marginal))


def _marginal_buffers(q, k, block_q: int, block_k: int, cfg: dict, z_terms: torch.Tensor):
    """The MarginalOperands (slagen.backends.triton.selection) that an early pre-pass's block map fills, or
    that selection.marginal_operands fills for a given map: the mask GEMM's 0/1 operand in h_t's dtype (k's)
    over padded_rows(T_n) columns, as slagen.backends.linear_terms.marginal_sums asks for it, and Z_i fp32,
    from the pre-pass's z_t. Only for maps without the negligible class (the callers' choice): the selection
    gathers the z_j of each row's excluded blocks, n_crit of them here, and n_crit + n_negl could be most of
    the row, where the z GEMM's cost does not grow."""
    from slagen.backends.triton import selection
    B, H, lk, d = k.shape
    t_m, t_n = -(-q.shape[2] // block_q), -(-lk // block_k)
    return selection.MarginalOperands(z_terms=z_terms, per_block=block_k // cfg["pre_tile"],
                                      sel=k.new_empty((B, H, t_m, linear_terms.padded_rows(t_n))),
                                      z_sums=k.new_empty((B, H, t_m, d), dtype=torch.float32))


def _build_early_plan(key, q, k, v, block_q, block_k, feature_map, scope, has_negligible, density) -> _EarlyPlan:
    if feature_map in (None, "none") or scope != "marginal":
        return _EarlyPlan(key=key, cfg=None)
    pooling = _pool_plan(q, k, block_q, block_k)
    if not pooling.tilelang or v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
        return _EarlyPlan(key=key, cfg=None)
    try:
        _check_tma("v", v)
        spec = kernel_spec(q, block_q=block_q, block_k=block_k, feature_map=feature_map, scope=scope,
                           has_negligible=has_negligible)
        cfg = _config_for(spec, q, k, density, None)
    except ValueError:      # the forward raises it, with its other checks
        return _EarlyPlan(key=key, cfg=None)
    if not cfg["warp_specialized"] or cfg["pre_tile"] != pooling.tk:
        return _EarlyPlan(key=key, cfg=None)
    pool_q = q.shape[2] == k.shape[2] and pooling.tq == pooling.tk
    return _EarlyPlan(key=key, cfg=cfg, pooling=pooling, pool_q=pool_q,
                      kernel=prepass_kernel(spec, cfg, pool="qk" if pool_q else "k"))


def marginal_sums(spec: KernelSpec, cfg: dict, ht: torch.Tensor, zt: torch.Tensor, mask: torch.Tensor,
                  relaunch_key=None, given=None):
    """(H_i (B,H,T_m,D,D) in h's dtype, Z_i (B,H,T_m,D) fp32): Σ h_j and Σ z_j over each query block's
    marginal key blocks (mask == 0): the GEMM's 0/1 operand and Z_i from the Triton backend's
    sla_mask_operands_kernel, then one GEMM (slagen.backends.linear_terms.marginal_sums; the pre-pass
    tiles of ``pre_tile`` keys are summed into selection blocks first). ``relaunch_key``: the mask-operand
    launch's Relauncher key (a forward plan's), or None. ``given``: the operands formed already (an
    :class:`EarlyPooled`'s ``marginal``, or slagen.backends.triton.selection.marginal_operands' for a given
    map): no operand kernel, no z GEMM."""
    if given is None:
        from slagen.backends.triton import fwd as triton_fwd
        operands = functools.partial(triton_fwd.mask_operands, codegen.load(spec, "triton"),
                                     relaunch_key=relaunch_key)
    else:
        def operands(mask, z_blocks, k_cols, dtype):
            if given.sel.shape[-1] != k_cols or given.sel.dtype != dtype:
                raise RuntimeError(f"the block map's mask operand is {given.sel.dtype} {tuple(given.sel.shape)}; "
                                   f"the mask GEMM needs {dtype} with {k_cols} columns")
            return given.sel, given.z_sums
    return linear_terms.marginal_sums(ht, zt, mask, per_block=spec.block_k // cfg["pre_tile"], operands=operands)


@dataclasses.dataclass(frozen=True)
class _ForwardPlan(plans.Plan):
    """What a forward call's shapes, strides, dtypes, devices, alignment, flags and config decide, checked and
    resolved once per process for each (see :func:`_forward_plan`): the spec, the config, the epilogue flags and
    the compiled kernels."""
    spec: KernelSpec
    cfg: dict
    save: bool
    has_w: bool
    kernel: object
    prepass: Optional[object]    # the linear pre-pass (a linear branch only)
    tail_kernel: Optional[object] = None    # the kernel of the split tail launch (config tail_split > 1)


_FORWARD_PLANS: plans.Plans[_ForwardPlan] = plans.Plans()


def _forward_plan(q, k, v, maps, proj_weight, proj_bias, save: bool, block_q: int, block_k: int, feature_map: str,
                  scope: str, config: Optional[dict]) -> _ForwardPlan:
    """The plan of a forward call (slagen.backends.plans), built (inputs checked, spec and config resolved,
    kernels compiled) once per process for each key: the layouts of q, k, v, of the map tensors the forward
    reads and of Proj's, the flags, the config (None: the tuned one, per generation of slagen.autotune.select's
    memo)."""
    layout = plans.layout
    return _FORWARD_PLANS.get(
        lambda: (layout(q), layout(k), layout(v), len(maps), layout(maps[0]), layout(maps[1]), layout(maps[2]),
                 tuple(maps[5].shape), layout(proj_weight), layout(proj_bias), bool(save), block_q, block_k,
                 feature_map, scope, plans.config_key(plans.TUNED if config is None else config)),
        lambda key: _build_forward_plan(key, q, k, v, maps, proj_weight, proj_bias, save, block_q, block_k,
                                        feature_map, scope, config))


def _build_forward_plan(key, q, k, v, maps, proj_weight, proj_bias, save, block_q, block_k, feature_map, scope,
                        config) -> _ForwardPlan:
    _check_inputs(q, k, v, maps, proj_weight, proj_bias)
    spec = kernel_spec(q, block_q=block_q, block_k=block_k, feature_map=feature_map, scope=scope,
                       has_negligible=maps[5].shape[-1] > 0)
    cfg = _call_config(spec, q, k, maps, config)
    save = bool(save) and spec.feature_map is not None
    has_w = _kernel_has_w(spec, save, proj_weight is not None)
    flags = dict(save=save, has_w=has_w, has_bias=proj_bias is not None)
    return _ForwardPlan(key=key, spec=spec, cfg=cfg, save=save, has_w=has_w,
                        kernel=forward_kernel(spec, cfg, **flags),
                        prepass=prepass_kernel(spec, cfg) if spec.feature_map is not None else None,
                        tail_kernel=forward_kernel(spec, cfg, tail=True, **flags) if cfg["tail_split"] > 1 else None)


def forward(q, k, v, maps, proj_weight, proj_bias, save, *, block_q, block_k, scale, feature_map, scope, eps,
            config: Optional[dict] = None, maps_ready=None, states: bool = False,
            early: Optional[EarlyTerms] = None):
    """SLA forward on the TileLang kernels; returns (o, lse, o_lin, den), and with ``states`` also (H_i, Z_i),
    as slagen.backends describes (kept for the backward when ``save``, scope 'marginal' and a linear branch;
    o_lin and den are then empty: the backward forms them from H_i, Z_i).

    q (B, H, Lq, D), k and v (B, H, Lk, D): views with unit stride on D and 16-byte multiple strides;
    maps the 9 BlockMap tensors; proj_weight (D, D) and proj_bias (D,) or None; config overrides of
    :func:`default_config`; maps_ready: an event the maps' producer recorded on another stream (waited for
    after the linear pre-pass, which does not read them, is launched); early: the call's pre-pass already
    run (:func:`early_terms`, which pooled for its block map), for the default or tuned config (config None).
    """
    # Keeping H_i, Z_i, the forward saves no O^l or den: the backward forms them from the sums (96 MiB less at the
    # headline shape's f+b peak), and the kernel is the inference variant.
    keep = states and keeps_linear_sums("tilelang", save, feature_map, scope)
    plan = _forward_plan(q, k, v, maps, proj_weight, proj_bias, save and not keep, block_q, block_k, feature_map,
                         scope, config)
    spec, cfg, save, has_w = plan.spec, plan.cfg, plan.save, plan.has_w
    B, H, lq, d = q.shape
    linear = spec.feature_map is not None
    o = torch.empty_like(q)
    lse = torch.empty((B, H, lq), dtype=torch.float32, device=q.device)
    o_lin = q.new_empty((B, H, lq, d)) if save else q.new_empty((0,))
    den = q.new_empty((B, H, lq), dtype=torch.float32) if save else q.new_empty((0,), dtype=torch.float32)
    sums = None                       # (H_i, Z_i) kept for the backward (states, save, scope 'marginal')
    if o.numel() == 0:
        return _with_sums((o, lse, o_lin, den), sums, states)
    if early is not None:
        if config is not None or early.cfg != cfg:
            raise ValueError("early= holds a pre-pass of another config than this forward's (early_terms runs "
                             "the default or tuned config: pass config=None)")
        terms = early.terms
    else:
        terms = linear_terms_of(spec, cfg, k, v, plan.prepass) if linear else None   # (it reads no block map)
    wait_for_maps(maps_ready, q.device)
    crit_count = maps[2].to(torch.int32).contiguous()
    args = [q, k, v, o, lse, _lut(maps[1]), crit_count]
    if linear:
        if spec.scope == "marginal":
            given = early.pooled.marginal if early is not None and early.pooled.written else None
            if given is None and not spec.has_negligible:   # a given map: the operands its selection would write,
                # with the same helpers (the call that builds the map and the call given it: the same bits)
                from slagen.backends.triton import selection
                given = _marginal_buffers(q, k, block_q, block_k, cfg, terms[1])
                selection.marginal_operands(q, k, maps, block_q, block_k, given)
            marginal = marginal_sums(spec, cfg, *terms, maps[0], plan.launch_key("mask operands"), given)
            args += marginal
            if keep:
                sums = marginal
        else:
            h_tot, z_tot = terms
            if proj_weight is not None and not has_w:
                # Proj folds into the per-head constant: φ(Q)(H Wᵀ)/den = (φ(Q)H/den) Wᵀ (SLA.md §6).
                h_tot = torch.matmul(h_tot, proj_weight.to(torch.float32).t())
            args += [h_tot.contiguous(), z_tot.contiguous()]
        dummy = _dummies(q.device, q.dtype, d)
        args.append(proj_weight.to(q.dtype).contiguous() if has_w else dummy["w"])
        args.append(proj_bias.to(torch.float32).contiguous() if proj_bias is not None else dummy["bias"])
        args += [o_lin if save else dummy["o_lin"], den if save else dummy["den"], float(eps)]
    args.append(float(scale))
    tq = math.ceil(lq / cfg["tile_m"])
    if cfg["persistent"]:   # the grid's length: one CTA per SM, at most one per tile
        with torch.cuda.device(q.device):
            plan.kernel(*args, _persistent_grid(q.device, tq * H * B))
        return _with_sums((o, lse, o_lin, den), sums, states)
    cols, parts = tail_plan(tq, H * B, _sm_count(q.device), cfg["tail_split"])
    grid = _grid_lengths(q.device, max(tq, cols * parts))
    stand_in = _tail_stand_ins(q.device, cfg["tile_m"], d)
    with torch.cuda.device(q.device):
        if tq > cols:       # the whole tiles (query tiles 0 .. tq - cols - 1 of every head)
            plan.kernel(*args, grid[:tq - cols], *stand_in, 0, 1, 1)
        if cols:            # the last cols query tiles of every head, parts CTAs each
            slots = cols * H * B
            po = torch.empty((slots * parts, cfg["tile_m"], d), dtype=torch.float32, device=q.device)
            pml = torch.empty((slots * parts, 2, cfg["tile_m"]), dtype=torch.float32, device=q.device)
            flag = torch.zeros((slots,), dtype=torch.int32, device=q.device)
            plan.tail_kernel(*args, grid[:cols * parts], po, pml, flag, tq - cols, cols, parts)
    return _with_sums((o, lse, o_lin, den), sums, states)


def _with_sums(out: tuple, sums: Optional[tuple], states: bool) -> tuple:
    """The forward's outputs, with ``states`` also the kept (H_i, Z_i) or two empty tensors."""
    if not states:
        return out
    q = out[0]
    return out + (sums if sums is not None else (q.new_empty((0,)), q.new_empty((0,), dtype=torch.float32)))


def _lut(lut: torch.Tensor) -> torch.Tensor:
    """A block lookup table (B, H, T, W) as the kernels read it: int32, contiguous, at least one column (every
    kernel walks at least one step and reads entry 0 even where the count is 0; the step is masked)."""
    lut = lut.to(torch.int32).contiguous()
    return lut if lut.shape[-1] else lut.new_zeros((*lut.shape[:-1], 1))


def _lin_inputs(spec: KernelSpec, q: torch.Tensor, terms, shapes, stand_ins) -> list:
    """A backward kernel's linear-branch inputs: ``terms`` (lin_fused: the glue's sums and per-row vectors)
    viewed as ``shapes``, else the named stand-ins of q's device and dtype; none for a sparse-only spec."""
    if spec.feature_map is None:
        return []
    if terms is None:
        dummy = _dummies(q.device, q.dtype, q.shape[-1])
        return [dummy[name] for name in stand_ins]
    return [t.view(shape) for t, shape in zip(terms, shapes)]


def _per_query_block(lse: torch.Tensor, ds: torch.Tensor, block_q: int):
    """LSE and D^s (fp32 (B, H, Lq)) as the dkdv kernel reads them: (B, H, T_m + 1, block_q), padded past Lq
    with LSE = +inf and D^s = 0 (those rows then get P = dS = 0); block T_m is all padding (the step a key
    block no query block chose walks reads it)."""
    B, H, lq = lse.shape
    tm = -(-lq // block_q)
    return [torch.nn.functional.pad(src.view(B, H, lq), (0, (tm + 1) * block_q - lq), value=pad).view(
        B, H, tm + 1, block_q) for src, pad in ((lse, float("inf")), (ds, 0.0))]


def backward_spec(q: torch.Tensor, maps, *, block_q: int, block_k: int, feature_map: str, scope: str) -> KernelSpec:
    """The role-'backward' KernelSpec of a call (sm90), which keys the backward's config."""
    return call_spec(q, DTYPES, "TileLang", arch="sm90", block_q=block_q, block_k=block_k, feature_map=feature_map,
                     scope=scope, has_negligible=maps[5].shape[-1] > 0, role="backward")


def backward(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, *, block_q, block_k, scale,
             feature_map, scope, eps, config: Optional[dict] = None, lin_sums=None):
    """SLA backward (SLA.md §5); returns (dq, dk, dv, dw, db) as slagen.backends describes.

    config["backward"] (default: the tuned or default config of :func:`backward_spec`) picks the path:
    'triton' runs the Triton backward; 'tilelang' runs the Triton state kernels for D^s and the linear-branch
    terms (with kept sums and config["query_state"] 'tilelang': the TileLang query-state kernel instead of
    _lin_rows + _query_state), then the sparse branch on the TileLang dq / dkdv kernels. It reads the lse /
    o_lin / den that either backend's forward saves (natural-log LSE, O^l before Proj, fp32 den). The TileLang path needs q,
    k, v readable by TMA (see :func:`_check_tma`); a dO that is not is copied. ``lin_sums``: the forward's
    (H_i, Z_i) (``states=True``), or None (the backward then forms them again); given them, o_lin and den may
    be empty (that forward saves neither) and are formed from them.
    """
    cfg_args = dict(block_q=block_q, block_k=block_k, scale=scale, feature_map=feature_map, scope=scope, eps=eps)
    spec = backward_spec(q, maps, block_q=block_q, block_k=block_k, feature_map=feature_map, scope=scope)
    cfg = _call_config(spec, q, k, maps, config)
    if cfg["backward"] == "triton" or q.numel() == 0 or k.numel() == 0:
        return _triton().backward(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, lin_sums=lin_sums,
                                  **cfg_args)
    _check_inputs(q, k, v, maps, proj_weight, proj_bias)
    try:
        _check_tma("do", do)
    except ValueError:      # dO comes from autograd (possibly an expanded or sliced view): copy it
        do = do.contiguous()
    row_lut = [_lut(maps[1]), maps[2].to(torch.int32)]
    col_lut = [_lut(maps[3]), maps[4].to(torch.int32)]

    def per_heads(heads, *tensors):     # a head group's slices as the kernels read them (LUTs, LSE: contiguous)
        return [t[:, heads].contiguous() for t in tensors]

    def sparse_dq(heads, ds, dq, terms=None):
        # dq holds the linear term and the kernel adds the sparse branch in place, or (lin_fused) terms = (H_i Wᵀ,
        # Z_i, D^l, den) and the kernel adds the linear term itself
        b, hg, lq, d = dq.shape
        states = _lin_inputs(spec, q, terms and tuple(t.contiguous() for t in terms),
                             [(b, hg, -1, d), (b, hg, -1, d), (b, hg, lq), (b, hg, lq)], ("h", "gz", "den", "den"))
        with torch.cuda.device(q.device):
            backward_kernel(spec, cfg, "dq")(q[:, heads], k[:, heads], v[:, heads], do[:, heads],
                                             *per_heads(heads, lse), ds, *per_heads(heads, *row_lut), dq, *states,
                                             float(scale), *([float(eps)] if spec.feature_map is not None else []))

    def sparse_dkdv(heads, ds, dk, dv, terms=None):   # terms: (G_j, g_j) with lin_fused (the kernel adds them)
        (lse_g,) = per_heads(heads, lse)
        b, hg, _, d = dk.shape
        states = _lin_inputs(spec, q, terms, [(b, hg, -1, d, d), (b, hg, -1, d)], ("g", "gz"))
        with torch.cuda.device(q.device):
            backward_kernel(spec, cfg, "dkdv")(q[:, heads], k[:, heads], v[:, heads], do[:, heads],
                                               *_per_query_block(lse_g, ds, block_q), *per_heads(heads, *col_lut),
                                               dk, dv, *states, float(scale))

    def query_state(q, do, o, h_i, z_i, count, ncount, den, ds, dl, g, gz, w, bias):
        # the linear branch's query-block state in one TileLang kernel (see bwd.linear_part for the arguments)
        b, hg, tm, d = z_i.shape
        dummy = _dummies(q.device, q.dtype, d)
        with torch.cuda.device(q.device):
            backward_kernel(spec, cfg, "query_state", has_w=w is not None, has_b=bias is not None)(
                q, do, o, h_i.contiguous().view(b, hg, tm * d, d), z_i.contiguous(), count.to(torch.int32).contiguous(),
                ncount.to(torch.int32).contiguous() if ncount is not None else dummy["count"], ds, dl, den,
                g.view(b, hg, -1, d), gz.view(b, hg, -1, d), w.to(torch.bfloat16) if w is not None else dummy["w"],
                bias.float() if bias is not None else dummy["bias"], float(eps), maps[0].shape[-1],
                query_state_chunk(tm, b * hg, _sm_count(q.device)))

    return _triton().backward_linear_part(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias,
                                          sparse_dq=sparse_dq, sparse_dkdv=sparse_dkdv,
                                          query_state=query_state if cfg["query_state"] == "tilelang" else None,
                                          linear=functools.partial(linear_config, spec, cfg["linear"]),
                                          lin_sums=lin_sums, fused_dq=cfg["dq"]["lin_fused"],
                                          fused_dkdv=cfg["dkdv"]["lin_fused"], **cfg_args)
