"""Glue of the Triton SLA backward (templates/triton/backward.py.j2): validation, buffers, grids, launches.

The backward runs five kernels of one generated module (see the template's docstring):

1. ``_query_state`` (grid (ceil(T_m/chunk), B*H)): D^s and D^l per query row (fp32, (B*H, Lq)) and the
   linear-branch query state dH_i = (φ(Q_i)/den_i)^T dO^l_i (D, D), dZ_i = -(φ(Q_i)/den_i)^T D^l_i (D,).
2. ``_key_state`` (grid (ceil(T_n/chunk), B*H)): h_j W^T = φ(K_j)^T V_j W^T, z_j = Σ_rows φ(K_j).
   Scope 'marginal' stores both states per block (bf16, fp32 for fp32 inputs); scope 'all' only needs the
   per-head totals, written as per-chunk fp32 partials and summed here. Not run when the caller passes the
   forward's H_i, Z_i (``lin_sums``, scope 'marginal' with the GEMM states).
3. ``_proj_grads`` (only with a projection): per-chunk fp32 partials of dW = Σ dO^T O^l and db = Σ dO.
4. ``_dq_kernel`` (grid (T_m * block_q/BLOCK_M, B*H)) and 5. ``_dkdv_kernel`` (grid (T_n * block_k/BLOCK_N,
   B*H)): the FlashAttention-2 backward over the row / column lookup tables, each starting from its linear
   term: scope 'marginal' reads the states summed over the marginal blocks by one batched mask GEMM per kernel
   in the glue (config prep.marginal_states='gemm', the default) or subtracts the excluded blocks' states,
   gathered through the same tables, from fp32 per-head totals ('gather').

:func:`backward` runs all five; :func:`linear_part` runs the same kernels with the sparse loops of 4 and 5
switched off (their SPARSE constexpr), for a backend that computes the sparse branch itself (TileLang).

Everything is deterministic (no atomics: partials are reduced with torch sums in fixed order).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch

from slagen import codegen
from slagen.backends import linear_terms, plans
from slagen.backends.triton import fwd
from slagen.autotune.space import copy_config
from slagen.dispatch import device_arch
from slagen.spec import KernelSpec, parse_feature_map, parse_scope

HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Per-arch launch defaults by head_dim: (dq BLOCK_M, dq BLOCK_N, dkdv BLOCK_N, dkdv BLOCK_M, num_warps,
# num_stages). Tiles are clamped to the selection blocks. Shared memory per CTA: sm80 ~163 KB, sm86/sm89
# ~99 KB, sm90 ~227 KB. Starting points for the autotuner, not measured optima.
_TILES = {
    "sm90": {16: (128, 64, 128, 64, 4, 3), 32: (128, 64, 128, 64, 4, 3),
             64: (128, 64, 128, 64, 8, 3), 128: (128, 64, 64, 64, 8, 2)},
    "sm80": {16: (128, 64, 128, 64, 4, 3), 32: (128, 64, 128, 64, 4, 3),
             64: (128, 64, 128, 64, 8, 2), 128: (64, 64, 32, 64, 8, 2)},
    "sm86": {16: (128, 64, 128, 64, 4, 2), 32: (128, 64, 128, 64, 4, 2),
             64: (64, 64, 64, 64, 4, 2), 128: (64, 64, 32, 64, 8, 2)},
}
_TILES["sm89"] = _TILES["sm86"]
# Measured exceptions for the dk/dv kernel's warps (H200, B=1 H=12 L=32760, 128x64 blocks, softmax marginal,
# `slagen tune --config`: the whole backward 5.30 ms with 4 warps vs 5.95 ms with 8; docs/perf-notes.md).
_DKDV_WARPS = {("sm90", 128): 4}
_PREP_CHUNK = 8      # selection blocks per program of the state kernels (default) and of the proj kernel (always)
# Measured exceptions for the state kernels (H200, headline shape, 128x64, tools/sweep_linear_part.py, session 9):
# 4 warps, 2 stages and 2 blocks per program: _query_state 0.376 -> 0.238 ms, _key_state 0.376 -> 0.184.
# (Where the TileLang forward kept H_i, Z_i, the TileLang backward overrides this: its _SUMS_PREP.)
_PREP_LAUNCH = {("sm90", 128): dict(num_warps=4, num_stages=2, chunk=2)}
# _lin_rows' launch (rows per step, at most block_q), by (arch, head_dim); H200, headline shape, session 27: 8 warps
# and 2 stages 0.209 ms, 4 warps 0.149, 4 warps and 3 stages 0.144 (128 rows: 0.200-0.211).
_LIN_LAUNCH = {("sm90", 128): dict(rows=64, num_warps=4, num_stages=3)}
_LIN_DEFAULT = dict(rows=64, num_warps=4, num_stages=2)
MARGINAL_STATES = ("gemm", "gather")
# prep.temp_budget's default: all heads at once. Head groups cut the peak (H200, headline shape, 128x64,
# budget 1.25 = 3 of 12 heads per group: Triton f+b 988 -> 689 MiB, TileLang 1271 -> 703) but cost time
# (Triton 6.31 -> 9.02 ms, TileLang 5.78 -> 16.73; session 7, tools/backward_memory.py): opt-in until that is fixed
TEMP_BUDGET = 0.0
TEMP_BUDGET_ENV = "SLAGEN_BACKWARD_TEMP_BUDGET"   # overrides every config's prep.temp_budget (a memory policy)
LOG2E = 1.4426950408889634


def default_config(spec: KernelSpec) -> dict:
    """Launch configuration for ``spec`` on its arch: {'dq': {...}, 'dkdv': {...}, 'prep': {...}}.

    dq: block_m query rows per program (divides block_q), block_n key rows per inner step (divides block_k);
    dkdv: block_n key rows per program, block_m query rows per inner step; each with num_warps, num_stages.
    prep (the state and proj kernels): rows per inner step (divides both blocks), chunk (selection blocks
    per program), num_warps, num_stages, and marginal_states (scope 'marginal' only): 'gemm' (default) forms
    every query block's H_i and key block's G_j (sums over the marginal blocks) with one batched mask GEMM each
    (temporaries of B·H·T_m·D² and B·H·T_n·D² in the states' dtype, one at a time), 'gather' subtracts the
    listed states from per-head totals inside the dq / dkdv kernels (no temporaries; every program reads its
    count × D² states: ~2.4 GB each at the headline shape); temp_budget (float ≥ 0, default TEMP_BUDGET): the
    backward runs over groups of heads whose per-block states and mask-GEMM sums take at most temp_budget × the
    bytes of q (at least one head per group; 0: all heads at once) — the memory policy that
    keeps the peak of forward+backward near dense attention's (:func:`_head_groups`).
    """
    _check_head_dim(spec)
    dq_m, dq_n, kv_n, kv_m, warps, stages = _TILES[spec.arch][spec.head_dim]
    kv_warps = _DKDV_WARPS.get((spec.arch, spec.head_dim), warps)
    prep_rows = 64 if spec.head_dim < 128 else 32 if spec.arch == "sm90" else 16
    if spec.dtype == "fp32":          # fp32 operands take twice the shared memory and registers
        dq_m, dq_n, kv_n, kv_m, prep_rows = (max(t // 2, 16) for t in (dq_m, dq_n, kv_n, kv_m, prep_rows))
        stages = 1
    bq, bk = spec.block_q, spec.block_k
    prep_rows = min(prep_rows, bq, bk)
    dq_m = min(dq_m, bq)
    # dq: at most 16 query rows per warp; a 64-row dq tile on sm90 at D = 128 runs 4 warps and 3 stages (H200,
    # 64x64 blocks, headline shape, SLA marginal backward: 5.89 ms vs 6.67 ms with 8 warps and 2 stages)
    dq_warps = min(warps, max(dq_m // 16, 1))
    dq_stages = 3 if (spec.arch, spec.head_dim, dq_m) == ("sm90", 128, 64) and spec.dtype != "fp32" else stages
    return {
        "dq": dict(block_m=dq_m, block_n=min(dq_n, bk), num_warps=dq_warps, num_stages=dq_stages),
        "dkdv": dict(block_n=min(kv_n, bk), block_m=min(kv_m, bq), num_warps=kv_warps, num_stages=stages),
        "prep": {**dict(rows=prep_rows, chunk=_PREP_CHUNK, num_warps=8 if spec.head_dim == 128 else 4,
                        num_stages=1, marginal_states="gemm", temp_budget=TEMP_BUDGET), **_prep_launch(spec)},
    }


def _prep_launch(spec: KernelSpec) -> dict:
    """The measured exceptions (_PREP_LAUNCH) that apply to ``spec``: 16-bit inputs; the chunk only for scope
    'marginal' (scope 'all' keeps one fp32 D×D partial per chunk: 8 blocks per program bound them)."""
    launch = dict(_PREP_LAUNCH.get((spec.arch, spec.head_dim), {})) if spec.dtype != "fp32" else {}
    if spec.scope != "marginal":
        launch.pop("chunk", None)
    return launch


def _check_head_dim(spec: KernelSpec) -> None:
    if spec.head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={spec.head_dim} is not supported by the Triton backward; allowed: {HEAD_DIMS}")


def _check_tile(name: str, value, block: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1) or block % value:
        raise ValueError(f"config {name}={value!r} must be a power of two >= 16 that divides {block}")


def check_config(config: dict, spec: KernelSpec) -> dict:
    """Validate a launch configuration (same keys as :func:`default_config`); returns it."""
    try:
        dq, kv, prep = config["dq"], config["dkdv"], config["prep"]
        tiles = (("dq.block_m", dq["block_m"], spec.block_q), ("dq.block_n", dq["block_n"], spec.block_k),
                 ("dkdv.block_m", kv["block_m"], spec.block_q), ("dkdv.block_n", kv["block_n"], spec.block_k),
                 ("prep.rows", prep["rows"], min(spec.block_q, spec.block_k)))
        launch = [(f"{kernel}.{key}", part[key]) for kernel, part in (("dq", dq), ("dkdv", kv), ("prep", prep))
                  for key in ("num_warps", "num_stages")] + [("prep.chunk", prep["chunk"])]
    except (KeyError, TypeError) as err:
        raise ValueError(f"config must have the keys of default_config(spec) "
                         f"({sorted(default_config(spec))} with their sub-keys); missing {err}") from None
    for name, value, block in tiles:
        _check_tile(name, value, block)
    if prep.get("marginal_states", "gemm") not in MARGINAL_STATES:
        raise ValueError(f"config prep.marginal_states={prep['marginal_states']!r} is not supported; allowed: "
                         f"{', '.join(MARGINAL_STATES)}")
    for name, value in launch:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config {name}={value!r} must be a positive int")
    budget = prep.get("temp_budget", TEMP_BUDGET)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
        raise ValueError(f"config prep.temp_budget={budget!r} must be a number >= 0 (a multiple of q's bytes; "
                         f"0: all heads at once)")
    return config


def kernel_spec(q: torch.Tensor, *, block_q: int, block_k: int, feature_map: Optional[str], scope: str,
                has_negligible: bool) -> KernelSpec:
    """The backward KernelSpec of a call on q's device and dtype (CPU maps to sm80)."""
    if q.dtype not in _DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; the Triton backward supports bfloat16, float16, float32")
    return KernelSpec.of(arch=device_arch(q.device) or "sm80", head_dim=q.shape[-1], block_q=block_q,
                         block_k=block_k, feature_map=feature_map, scope=scope, has_negligible=has_negligible,
                         dtype=_DTYPES[q.dtype], role="backward")


def _check_inputs(do, q, k, v, o, lse, o_lin, den, maps, linear: bool, block_q: int, block_k: int) -> None:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if len(maps) != 9:
        raise ValueError(f"maps must be the 9 BlockMap tensors (slagen.blockmap.LUT_FIELDS), got {len(maps)}")
    grid = (B, H, -(-Lq // block_q), -(-Lk // block_k))
    if tuple(maps[0].shape) != grid:
        raise ValueError(f"maps were built for mask shape {tuple(maps[0].shape)}; q {tuple(q.shape)}, k "
                         f"{tuple(k.shape)} and blocks {block_q}x{block_k} need {grid}")
    want = {"do": (do, q.shape), "o": (o, q.shape), "k": (k, (B, H, Lk, D)), "v": (v, (B, H, Lk, D)),
            "lse": (lse, (B, H, Lq))}
    if linear:
        want.update({"o_lin": (o_lin, q.shape), "den": (den, (B, H, Lq))})
    for name, (t, shape) in want.items():
        if tuple(t.shape) != tuple(shape):
            extra = (" (save=True in the forward keeps it for the backward; a forward that keeps H_i, Z_i saves "
                     "neither, and its lin_sums then go to the backward)" if name in ("o_lin", "den") else "")
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}{extra}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v), ("do", do), ("o", o)) + ((("o_lin", o_lin),) if linear else ()):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride on the head dimension, got strides {tuple(t.stride())}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    for name, t in (("lse", lse),) + ((("den", den),) if linear else ()):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")


def _check_lin_sums(lin_sums, q, maps) -> None:
    """``lin_sums`` (see :func:`backward`): (H_i (B, H, T_m, D, D) in q's dtype, Z_i (B, H, T_m, D) fp32)."""
    B, H, _, D = q.shape
    tm = maps[0].shape[-2]
    if not (isinstance(lin_sums, (tuple, list)) and len(lin_sums) == 2):
        raise ValueError("lin_sums must be the pair (H_i, Z_i) a forward with states=True returns, or None")
    for name, t, shape, dtype in (("lin_sums[0] (H_i)", lin_sums[0], (B, H, tm, D, D), q.dtype),
                                  ("lin_sums[1] (Z_i)", lin_sums[1], (B, H, tm, D), torch.float32)):
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != q.device:
            raise ValueError(f"{name} must be a {dtype} tensor of shape {shape} on {q.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _grid_chunks(n_blocks: int, chunk: int) -> int:
    return max(-(-n_blocks // chunk), 1)


@dataclasses.dataclass
class _Call:
    """The tensors and sizes one backward call passes to its kernels (absent ones replaced by stand-ins
    that the generated code never reads, so that every kernel has one signature).

    ``sparse`` False: the dq / dkdv kernels skip their sparse loops and write the linear-branch terms alone
    into fp32 (B, H, L, D) buffers.

    ``ol_from_sums``: the forward kept H_i, Z_i (``lin_sums``) and saved no O^l or den: ``_lin_rows`` forms den
    (into ``den``, an empty (B, H, Lq) fp32 buffer) and D^l from them, the Proj-grad kernel O^l; ``o_lin`` is a
    stand-in.

    Derived in __post_init__: Lq, Lk, D, H, BH (= B*H), Tm, Tn, linear, marginal, state_dtype, total_dtype.
    """

    spec: KernelSpec
    cfg: dict
    mod: ModuleType
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    o: torch.Tensor
    lse: torch.Tensor
    o_lin: torch.Tensor
    den: torch.Tensor
    maps: Sequence[torch.Tensor]
    w: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    scale: float
    sparse: bool = True
    lin_sums: Optional[tuple] = None
    eps: float = 0.0
    ol_from_sums: bool = False
    fused_dq: bool = False
    fused_dkdv: bool = False
    sums_owner: Optional[list] = None       # the caller's [H_i, Z_i] (lin_sums given as a list): release_sums
    query_state: Optional[Callable] = None  # linear_part's query_state: the caller's kernel for _query_state

    def __post_init__(self):
        B, H, self.Lq, self.D = self.q.shape
        self.H, self.BH, self.Lk = H, B * H, self.k.shape[2]
        self.Tm, self.Tn = self.maps[0].shape[-2:]
        self.linear = self.spec.feature_map is not None
        self.marginal = self.linear and self.spec.scope == "marginal"
        # Per-block states (scope 'marginal') and the totals of scope 'all' are stored like the kernels'
        # linear-branch operands: fp32 for fp32 inputs, else bf16 (fp32's range). The totals of scope
        # 'marginal' stay fp32, as the kernels subtract the excluded blocks from them; partials are fp32.
        lin = torch.float32 if self.q.dtype == torch.float32 else torch.bfloat16
        self.state_dtype = lin if self.marginal else torch.float32
        self.total_dtype = torch.float32 if self.marginal else lin
        if not self.linear:
            self.o_lin, self.den = self.o, self.lse
        if not self.spec.has_negligible:              # the negligible tables are never read
            self.maps = list(self.maps[:5]) + list(self.maps[1:5])

    def kept_sums(self):
        """(H_i (B*H*T_m, D, D), Z_i (B*H*T_m, D)) the forward kept, as the kernels index them, where they form
        O^l from them (``ol_from_sums``); else stand-ins never read."""
        if not self.ol_from_sums:
            return self.lse, self.lse
        h, z = self.lin_sums
        return h.reshape(-1, self.D, self.D), z.reshape(-1, self.D)

    def release_sums(self) -> None:
        """Drop this call's references to the kept H_i, Z_i and empty the caller's list (``sums_owner``): once
        dq has run no kernel reads them, and freed they are not alive at the dk / dv stage's peak."""
        self.lin_sums = None
        if self.sums_owner is not None:
            self.sums_owner.clear()

    def weight_args(self):
        """(w pointer, its 2 strides) with a stand-in when there is no projection weight."""
        return (self.w, *self.w.stride()) if self.w is not None else (self.lse, 0, 0)

    def bias_args(self):
        return (self.bias, self.bias.stride(0)) if self.bias is not None else (self.lse, 0)

    def gemm_states(self) -> bool:
        return self.marginal and self.cfg["prep"].get("marginal_states", "gemm") == "gemm"

    def given_sums(self) -> bool:
        """Whether dq's H_i, Z_i come from the forward (``lin_sums``): no key-state kernel, no H_i GEMM."""
        return self.lin_sums is not None and self.gemm_states()

    def loop_consts(self) -> dict:
        """The dq / dkdv kernels' SPARSE and (scope 'marginal' only) GEMM_STATES constexprs."""
        return dict(SPARSE=self.sparse, **(dict(GEMM_STATES=self.gemm_states()) if self.marginal else {}))

    def heads(self, heads: slice) -> "_Call":
        """This call restricted to ``heads`` (views along dim 1 of every per-head tensor; Proj is shared)."""
        if (heads.start, heads.stop) == (0, self.H):
            return self
        def cut(t):
            return t[:, heads]
        return dataclasses.replace(self, q=cut(self.q), k=cut(self.k), v=cut(self.v), do=cut(self.do),
                                   o=cut(self.o), lse=cut(self.lse), o_lin=cut(self.o_lin), den=cut(self.den),
                                   maps=[cut(m) for m in self.maps],
                                   lin_sums=self.lin_sums and tuple(cut(t) for t in self.lin_sums))

    def prep_launch(self):
        return dict(num_warps=self.cfg["prep"]["num_warps"], num_stages=self.cfg["prep"]["num_stages"])


def _state_buffers(c: _Call, blocks: int, chunks: int):
    """(mat (B*H*rows, D, D) in the state dtype, vec (B*H*rows, D) fp32, rows): per head, one state per block
    (scope 'marginal'; with the GEMM states padded_rows(blocks) rows, the tail zero: the K extent of the mask
    GEMMs, a multiple of 8) or one per chunk of blocks."""
    rows = (linear_terms.padded_rows(blocks) if c.gemm_states() else blocks) if c.marginal else chunks
    n_states = c.BH * rows if c.linear else 1
    mat = torch.empty((n_states, c.D, c.D), dtype=c.state_dtype, device=c.q.device)
    vec = torch.empty((n_states, c.D), dtype=torch.float32, device=c.q.device)
    if c.linear and c.marginal and rows > blocks:
        mat.view(c.BH, rows, c.D, c.D)[:, blocks:].zero_()
        vec.view(c.BH, rows, c.D)[:, blocks:].zero_()
    return mat, vec, rows


def _query_state(c: _Call):
    """Launch ``_query_state``: (ds, dl) fp32 (B*H, Lq) and the query state (g (n, D, D), gz (n, D))."""
    f32 = dict(dtype=torch.float32, device=c.q.device)
    prep = c.cfg["prep"]
    chunks = _grid_chunks(c.Tm, prep["chunk"])
    ds = torch.empty((c.BH, c.Lq), **f32)
    dl = torch.empty((c.BH, c.Lq), **f32) if c.linear else c.lse
    g, gz, rows = _state_buffers(c, c.Tm, chunks)
    count, ncount = c.maps[2], c.maps[6]
    if c.ol_from_sums and c.query_state is not None:
        h, z = c.lin_sums
        c.query_state(c.q, c.do, c.o, h, z, count, ncount if c.spec.has_negligible else None, c.den,
                      ds.view(c.lse.shape), dl.view(c.lse.shape), g.view(-1, rows, c.D, c.D),
                      gz.view(-1, rows, c.D), c.w, c.bias)
        return ds, dl, g, gz
    if c.ol_from_sums:
        _lin_rows(c, dl)
    w, s_w0, s_w1 = c.weight_args()
    bias, s_bias = c.bias_args()
    c.mod._query_state[(chunks, c.BH)](
        c.q, c.do, c.o, c.o_lin, c.den, w, bias, count, ncount, ds, dl, g, gz,
        *c.q.stride(), *c.do.stride(), *c.o.stride(), *c.o_lin.stride(), *c.den.stride(), s_w0, s_w1, s_bias,
        *count.stride(), *ncount.stride(), c.H, c.Lq, c.Tm, c.Tn, prep["chunk"], rows,
        HAS_W=c.w is not None, HAS_B=c.bias is not None, ROWS=prep["rows"], DL_GIVEN=c.ol_from_sums,
        **c.prep_launch())
    return ds, dl, g, gz


def _lin_rows(c: _Call, dl: torch.Tensor) -> None:
    """Launch ``_lin_rows`` (``c.ol_from_sums``): den into ``c.den`` and D^l into ``dl`` (B*H, Lq) fp32, formed from
    the kept H_i, Z_i. One program per query block reads its H_i once; _LIN_LAUNCH's rows per step (H200, headline
    shape: forming O^l inside _query_state instead, H_i read per 32-row step beside its dH_i accumulator, took
    _query_state from 0.234 to 0.498 ms)."""
    h, z = c.kept_sums()
    w, s_w0, s_w1 = c.weight_args()
    launch = _LIN_LAUNCH.get((c.spec.arch, c.D), _LIN_DEFAULT)
    c.mod._lin_rows[(c.Tm, c.BH)](c.q, c.do, w, h, z, c.den, dl, *c.q.stride(), *c.do.stride(), *c.den.stride(),
                                  s_w0, s_w1, c.H, c.Lq, c.Tm, c.eps, HAS_W=c.w is not None,
                                  ROWS=min(launch["rows"], c.spec.block_q),
                                  num_warps=launch["num_warps"], num_stages=launch["num_stages"])


def _key_state(c: _Call):
    """Launch ``_key_state``: the key state (h (n, D, D), z (n, D)), Proj's W folded into h."""
    prep = c.cfg["prep"]
    chunks = _grid_chunks(c.Tn, prep["chunk"])
    h, z, rows = _state_buffers(c, c.Tn, chunks)
    w, s_w0, s_w1 = c.weight_args()
    c.mod._key_state[(chunks, c.BH)](c.k, c.v, w, h, z, *c.k.stride(), *c.v.stride(), s_w0, s_w1, c.H, c.Lk,
                                     c.Tn, prep["chunk"], rows, HAS_W=c.w is not None, ROWS=prep["rows"],
                                     **c.prep_launch())
    return h, z


def _totals(c: _Call, mat: torch.Tensor, vec: torch.Tensor):
    """Per-head totals (B*H, D, D) / (B*H, D) of per-block states or per-chunk partials (fp32 sums)."""
    return (mat.view(c.BH, -1, c.D, c.D).sum(1, dtype=torch.float32).to(c.total_dtype),
            vec.view(c.BH, -1, c.D).sum(1))


def _proj_grads(c: _Call):
    """(dw (D, D), db (D,)) of Proj over the call's heads, fp32: per-chunk partials (_PREP_CHUNK query blocks
    each, whatever the state kernels' chunk: B·H·T_m/8 fp32 D×D partials) from the kernel summed in a fixed
    order."""
    prep = c.cfg["prep"]
    chunks = _grid_chunks(c.Tm, _PREP_CHUNK)
    dw_part = torch.empty((c.BH * chunks, c.D, c.D), dtype=torch.float32, device=c.q.device)
    db_part = torch.empty((c.BH * chunks, c.D), dtype=torch.float32, device=c.q.device)
    c.mod._proj_grads[(chunks, c.BH)](c.do, c.o_lin, c.q, c.kept_sums()[0], c.den, dw_part, db_part,
                                      *c.do.stride(), *c.o_lin.stride(), *c.q.stride(), *c.den.stride(), c.H,
                                      c.Lq, c.Tm, c.spec.block_q * _PREP_CHUNK, HAS_W=c.w is not None,
                                      ROWS=prep["rows"], OL_FROM_SUMS=c.ol_from_sums, **c.prep_launch())
    return dw_part.sum(0), db_part.sum(0)


def _empty(c: _Call) -> torch.Tensor:
    return c.q.new_empty((0,), dtype=torch.float32)


def _marginal_states(c: _Call, mats, vecs, mask):
    """(M_i (n, D, D) like the states, m_i (n, D) fp32), n = B*H*rows of ``mask``: the per-block states ``mats``
    / ``vecs`` (one per column of mask (B, H, rows, cols), padded_rows(cols) per head with a zero tail:
    :func:`_state_buffers`) summed over each row's marginal (mask == 0) columns by one batched GEMM
    (slagen.backends.linear_terms.marginal_sums), fp32 accumulation, one rounding to the states' dtype (bf16
    for bf16/fp16 inputs: the kernels' linear products take bf16 operands anyway; 100 MB for H_i and 201 MB
    for G_j at the headline shape). The operand kernel relaunches by a key of what its launch depends on: the
    mask's layout and the states' shape and dtype (slagen.backends.triton.launch)."""
    B, H, D = *c.q.shape[:2], c.D
    key = ("backward marginal states", plans.layout(mask), tuple(mats.shape), tuple(vecs.shape), mats.dtype)
    operands = functools.partial(fwd.mask_operands, codegen.load(c.spec.replace(role="forward"), "triton"),
                                 relaunch_key=key)
    m, v = linear_terms.marginal_sums(mats.view(B, H, -1, D, D), vecs.view(B, H, -1, D), mask,
                                      out_dtype=mats.dtype, operands=operands)
    return m.reshape(-1, D, D), v.reshape(-1, D)


def _forward_sums(c: _Call):
    """dq's (H_i Wᵀ (B*H*T_m, D, D), Z_i (B*H*T_m, D) fp32) from the forward's H_i, Z_i (``lin_sums``): the same
    sums :func:`_marginal_states` forms from the key states (whose h_j hold W folded in), W applied here by one
    batched (D×D)·(D×D) product."""
    h, z = c.lin_sums
    if c.w is not None:
        h = torch.matmul(h, c.w.t().to(h.dtype))
    return h.reshape(-1, c.D, c.D).contiguous(), z.reshape(-1, c.D).contiguous()


def _dq(c: _Call, ds, dl, h, z, hsum, zsum, dq) -> None:
    """Launch ``_dq_kernel`` over the row LUT into ``dq`` (like q; with ``c.sparse`` False the linear term
    alone)."""
    t = c.cfg["dq"]
    lut, count, nlut, ncount = c.maps[1], c.maps[2], c.maps[5], c.maps[6]
    c.mod._dq_kernel[(c.Tm * (c.spec.block_q // t["block_m"]), c.BH)](
        c.q, c.k, c.v, c.do, c.lse, ds, dq, dl, c.den, h, z, hsum, zsum, lut, count, nlut, ncount,
        *c.q.stride(), *c.k.stride(), *c.v.stride(), *c.do.stride(), *dq.stride(), *c.lse.stride(),
        *c.den.stride(), *lut.stride(), *count.stride(), *nlut.stride(), *ncount.stride(),
        c.H, c.Lq, c.Lk, c.Tn, c.scale, c.scale * LOG2E,
        BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], num_warps=t["num_warps"], num_stages=t["num_stages"],
        **c.loop_consts())


def _dkdv(c: _Call, ds, g, gz, gsum, gzsum, dk, dv) -> None:
    """Launch ``_dkdv_kernel`` over the column LUT (one program per key-block slice) into ``dk``, ``dv`` (like
    k, v; with ``c.sparse`` False the linear terms alone)."""
    t = c.cfg["dkdv"]
    lut, count, nlut, ncount = c.maps[3], c.maps[4], c.maps[7], c.maps[8]
    c.mod._dkdv_kernel[(c.Tn * (c.spec.block_k // t["block_n"]), c.BH)](
        c.q, c.k, c.v, c.do, c.lse, ds, dk, dv, g, gz, gsum, gzsum, lut, count, nlut, ncount,
        *c.q.stride(), *c.k.stride(), *c.v.stride(), *c.do.stride(), *dk.stride(), *dv.stride(),
        *c.lse.stride(), *lut.stride(), *count.stride(), *nlut.stride(), *ncount.stride(),
        c.H, c.Lq, c.Lk, c.Tm, c.scale, c.scale * LOG2E,
        BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], num_warps=t["num_warps"], num_stages=t["num_stages"],
        **c.loop_consts())


def _prepare(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, *, block_q, block_k, scale,
             feature_map, scope, eps, config, sparse, lin_sums=None) -> _Call:
    """Validate a backward call and bundle it (see :func:`backward` for the arguments)."""
    fmap, scope = parse_feature_map(feature_map), parse_scope(scope)
    if fmap is None and (proj_weight is not None or proj_bias is not None):
        raise ValueError("proj_weight/proj_bias were given but feature_map='none' has no linear branch")
    # A forward that keeps H_i, Z_i saves no O^l or den (both empty): the backward forms them from the sums.
    from_sums = (fmap is not None and scope == "marginal" and lin_sums is not None and o_lin.numel() == 0
                 and den.numel() == 0)
    _check_inputs(do, q, k, v, o, lse, o_lin, den, maps, fmap is not None and not from_sums, block_q, block_k)
    if lin_sums is not None:
        _check_lin_sums(lin_sums, q, maps)
    if from_sums:
        o_lin, den = o, torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    spec = kernel_spec(q, block_q=block_q, block_k=block_k, feature_map=fmap, scope=scope,
                       has_negligible=maps[5].shape[-1] > 0)
    _check_head_dim(spec)
    cfg = check_config(default_config(spec) if config is None else copy_config(config), spec)
    kept = lin_sums is not None and fmap is not None and scope == "marginal"
    return _Call(spec, cfg, codegen.load(spec, "triton"), q, k, v, do, o, lse, o_lin, den, maps, proj_weight,
                 proj_bias, float(scale), sparse, tuple(lin_sums) if kept else None, eps=float(eps),
                 ol_from_sums=from_sums, sums_owner=lin_sums if isinstance(lin_sums, list) else None)


def _temp_bytes_per_head(c: _Call) -> int:
    """Peak bytes of the temporaries one head (over the batch) adds to a backward call: the per-block states
    and the mask-GEMM sums (scope 'marginal' with the GEMM states: H_i formed from h beside g, then dq's
    kernel with g and H_i; G_j formed from g, then dk / dv's kernel with G_j alone, :func:`_run_heads`). The
    gradients are outputs, not temporaries (:func:`linear_part` writes its linear terms into them); chunk
    partials and per-row vectors are left out (small)."""
    states = (0,) * 4
    if c.gemm_states():
        mat = c.D * c.D * c.state_dtype.itemsize
        states = (linear_terms.padded_rows(c.Tm) * mat, linear_terms.padded_rows(c.Tn) * mat,   # g, h
                  c.Tm * mat, c.Tn * mat)                                                      # H_i, G_j
    g, h, dh, dg = states
    return c.q.shape[0] * max(g + h + dh, g + dg)


def temp_budget(cfg: dict) -> float:
    """The head-group budget of a backward call: $SLAGEN_BACKWARD_TEMP_BUDGET when set (a number ≥ 0; the
    caller's memory policy, above any default or tuned config), else the config's prep.temp_budget."""
    env = os.environ.get(TEMP_BUDGET_ENV)
    if env is None or env.strip() == "":
        return cfg["prep"].get("temp_budget", TEMP_BUDGET)
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{TEMP_BUDGET_ENV}={env!r} must be a number >= 0 (a multiple of q's bytes for the "
                         f"backward's per-head-group temporaries; 0: all heads at once)")
    return value


def _head_groups(c: _Call) -> list:
    """The head slices the backward runs one after another: as many heads per group as keep the group's
    temporaries (:func:`_temp_bytes_per_head`) within :func:`temp_budget` × the bytes of q (at least one)."""
    budget = temp_budget(c.cfg) * c.q.numel() * c.q.element_size()
    per_head = _temp_bytes_per_head(c)
    per_group = c.H if budget <= 0 or per_head == 0 else min(max(int(budget // per_head), 1), c.H)
    return [slice(h0, min(h0 + per_group, c.H)) for h0 in range(0, max(c.H, 1), max(per_group, 1))]


class _Grads:
    """dq, dk, dv of one call (like q, k, v), each allocated at its first use, so that none is alive before
    a kernel writes it (:func:`_run_heads` orders the uses against the temporaries)."""

    def __init__(self, c: _Call):
        self._like = {"dq": c.q, "dk": c.k, "dv": c.v}
        self._made = {}

    def __call__(self, name: str, heads: Optional[slice] = None) -> torch.Tensor:
        """Gradient ``name``, or its view over ``heads``."""
        if name not in self._made:
            self._made[name] = torch.empty_like(self._like[name])
        return self._made[name] if heads is None else self._made[name][:, heads]


def _run_heads(c: _Call, heads: slice, grads: _Grads, sparse_dq, sparse_dkdv, after_dq=None):
    """All kernels of the head group ``c`` (the call restricted to ``heads``); the gradients go into the
    views ``grads(name, heads)`` (with ``c.sparse`` False the kernels write the linear terms there, if any,
    and ``sparse_dq(ds, dq)`` / ``sparse_dkdv(ds, dk, dv)`` add the sparse branch in place); ``after_dq(c)``,
    if given, runs once the group's dq is complete. Returns Proj's fp32 (dw, db) over the group's heads, or
    None."""
    ds, dl, g, gz = _query_state(c)
    h = z = hsum = zsum = gsum = gzsum = c.lse
    proj = None
    if c.linear:
        if not c.given_sums():      # the forward's H_i, Z_i replace the key states
            h, z = _key_state(c)
        if not c.gemm_states():     # the GEMM states are summed directly; the others need per-head totals
            hsum, zsum = _totals(c, h, z)
            gsum, gzsum = _totals(c, g, gz)
        if c.w is not None or c.bias is not None:
            proj = _proj_grads(c)
    if not (c.sparse or c.linear):
        sparse_dq(ds, grads("dq", heads))
        if after_dq is not None:
            after_dq(c)
        sparse_dkdv(ds, grads("dk", heads), grads("dv", heads))
        return proj
    # One temporary at a time with the GEMM states: H_i, Z_i for dq (h, z freed once it is formed), then G_j,
    # g_j for dk / dv (g freed once G is formed); each gradient is allocated just before a kernel writes it.
    if c.given_sums():
        q_terms = _forward_sums(c)
    else:
        q_terms = _marginal_states(c, h, z, c.maps[0]) if c.gemm_states() else (h, z)
    del h, z
    if c.fused_dq:      # the caller's dq kernel adds the linear term itself, from H_i (W folded), Z_i, D^l, den
        sparse_dq(ds, grads("dq", heads), (*q_terms, dl, c.den))
    else:
        _dq(c, ds, dl, *q_terms, hsum, zsum, grads("dq", heads))
        if not c.sparse:
            sparse_dq(ds, grads("dq", heads))
    del q_terms
    if after_dq is not None:
        after_dq(c)
    kv_terms = _marginal_states(c, g, gz, c.maps[0].transpose(-1, -2)) if c.gemm_states() else (g, gz)
    del g, gz
    if c.fused_dkdv:    # the caller's dk / dv kernel adds the linear terms itself, from G_j and g_j
        sparse_dkdv(ds, grads("dk", heads), grads("dv", heads), kv_terms)
        return proj
    _dkdv(c, ds, *kv_terms, gsum, gzsum, grads("dk", heads), grads("dv", heads))
    del kv_terms
    if not c.sparse:
        sparse_dkdv(ds, grads("dk", heads), grads("dv", heads))
    return proj


def _run(c: _Call, sparse_dq=None, sparse_dkdv=None):
    """All kernels of one call, head group by head group (:func:`_head_groups`): (dq, dk, dv, dw, db), dq /
    dk / dv like q / k / v. With ``c.sparse`` False, ``sparse_dq(heads, ds, dq)`` and
    ``sparse_dkdv(heads, ds, dk, dv)`` complete each group's gradients (see :func:`linear_part`)."""
    grads = _Grads(c)
    dw = db = None
    groups = _head_groups(c)

    def release(group: _Call) -> None:     # after the last group's dq no kernel reads the kept H_i, Z_i
        group.release_sums()
        c.release_sums()
    for n, heads in enumerate(groups):
        proj = _run_heads(c.heads(heads), heads, grads, sparse_dq and functools.partial(sparse_dq, heads),
                          sparse_dkdv and functools.partial(sparse_dkdv, heads),
                          after_dq=release if n == len(groups) - 1 else None)
        if proj is not None:     # fp32 sums over the groups, in order: deterministic
            dw, db = proj if dw is None else (dw + proj[0], db + proj[1])
    dw = dw.to(c.w.dtype) if c.w is not None else _empty(c)
    db = db.to(c.bias.dtype) if c.bias is not None else _empty(c)
    return grads("dq"), grads("dk"), grads("dv"), dw, db


def backward(do, q, k, v, o, lse, o_lin, den, maps: Sequence[torch.Tensor], proj_weight, proj_bias, *,
             block_q: int, block_k: int, scale: float, feature_map: Optional[str], scope: str, eps: float,
             config: Optional[dict] = None, lin_sums=None):
    """Gradients of SLA (SLA.md §5) with the Triton kernels.

    do, q, o, o_lin: (B, H, Lq, D); k, v: (B, H, Lk, D) (any strides, unit stride on D); lse, den: float32
    (B, H, Lq) (natural-log LSE of the sparse branch; den = φ(Q_i)Z_i + eps); maps: the 9 BlockMap tensors;
    proj_weight (D, D) / proj_bias (D,) or None; feature_map 'softmax' | 'elu' | 'relu' | 'none'/None.
    ``eps`` is inside ``den`` (used again only to form den from ``lin_sums``, see below). ``config``: launch
    configuration (default :func:`default_config`). Returns (dq, dk, dv, dw, db): dq/dk/dv like q/k/v (same dtype and stride
    order), dw/db in the dtypes of proj_weight/proj_bias, or empty float32 tensors when those are None.
    ``lin_sums``: the (H_i, Z_i) a forward kept (slagen.backends: forward with states=True), or None; scope
    'marginal' with the GEMM states then skips the key-state kernel and the H_i GEMM. As a list (the caller's
    last references) it is emptied once the last head group's dq has run, so that H_i is freed before dk / dv.
    Given them, o_lin and den may be empty (the forward that keeps them saves neither): den = φ(Q_i)Z_i + eps
    and D^l are then formed from them (``_lin_rows``), and with Proj O^l = φ(Q_i)H_i / den (the Proj-grad
    kernel).
    """
    c = _prepare(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, block_q=block_q, block_k=block_k,
                 scale=scale, feature_map=feature_map, scope=scope, eps=eps, config=config, sparse=True,
                 lin_sums=lin_sums)
    return _run(c)


def linear_part(do, q, k, v, o, lse, o_lin, den, maps: Sequence[torch.Tensor], proj_weight, proj_bias, *,
                block_q: int, block_k: int, scale: float, feature_map: Optional[str], scope: str, eps: float,
                sparse_dq, sparse_dkdv, config: Optional[dict] = None, lin_sums=None, fused_dq: bool = False,
                fused_dkdv: bool = False, query_state: Optional[Callable] = None):
    """Everything of :func:`backward` except the sparse branch's FlashAttention loops, which a backend that
    runs them itself supplies: returns (dq, dk, dv, dw, db).

    The call runs head group by head group (config prep.temp_budget); for each group ``heads`` (a slice of
    dim 1), ``sparse_dq(heads, ds, dq)`` and then ``sparse_dkdv(heads, ds, dk, dv)`` are called as soon as
    the linear kernels have written dq, respectively dk and dv. ds: D^s = rowsum(dO ⊙ O^s), fp32 (B, H_g, Lq)
    (contiguous) of the group's H_g heads; dq (B, H_g, Lq, D), dk and dv (B, H_g, Lk, D): the group's views
    of the gradients returned (like q, k, v), which hold the linear branch's terms on entry (rounded to the
    gradients' dtype; undefined for a sparse-only call, feature_map 'none') and which the callbacks complete
    in place: dq += scale·Σ dS K, dk += scale·Σ dSᵀQ, dv += Σ PᵀdO over the critical blocks (sparse-only:
    assigned). Writing the terms into the gradients saves the fp32 buffers a separate term would take
    (384 MiB for dk / dv at the headline shape). dw, db as :func:`backward` returns them. Other arguments as
    for :func:`backward` (``lin_sums`` too); the same kernels run, their sparse loops switched off (SPARSE=False).

    ``fused_dq`` (scope 'marginal' with the GEMM states only): the dq linear kernel does not run;
    ``sparse_dq(heads, ds, dq, (H, Z, dl, den))`` gets H_i Wᵀ ((B·H_g·T_m, D, D) in the states' dtype), Z_i
    ((B·H_g·T_m, D) fp32), D^l ((B·H_g, Lq) fp32) and den ((B, H_g, Lq) fp32, the given one or the one formed
    from ``lin_sums``; a view, possibly not contiguous) and writes dq whole (dφ(Q_i) = (dO (H_i Wᵀ)ᵀ − D^l Z_iᵀ)
    / den_i, dQ_i += J_φ(Q_i)ᵀ dφ besides the sparse branch).
    ``fused_dkdv`` (likewise): the dk / dv linear kernel does not run;
    ``sparse_dkdv(heads, ds, dk, dv, (G, g))`` gets G_j = Σ_{i: j marginal for i} dH_i ((B·H_g·T_n', D, D) in
    the states' dtype, T_n' = padded_rows(T_n) per head) and g_j ((B·H_g·T_n', D) fp32) and writes dk, dv whole
    (sparse branch and linear terms: dV_j += φ(K_j) G_j, dK_j += J_φ(K_j)ᵀ(V_j G_jᵀ + 1 g_jᵀ)).
    ``query_state`` (used where the forward kept H_i, Z_i and saved no O^l, den): the caller's kernel in place of
    ``_lin_rows`` + ``_query_state``, called per head group as ``query_state(q, do, o, H_i, Z_i, count, ncount,
    den, ds, dl, g, gz, w, bias)``: the group's q, do, o (B, H_g, Lq, D), H_i (B, H_g, T_m, D, D), Z_i (B, H_g,
    T_m, D) fp32, the critical and negligible counts per query block (B, H_g, T_m) (ncount None without a
    negligible class), Proj's w, bias or None; it writes den (B, H_g, Lq) fp32 (a view), D^s and D^l into ds, dl
    ((B, H_g, Lq) fp32), dH_i into g ((B·H_g, T_m', D, D), the states' dtype) and dZ_i into gz ((B·H_g, T_m', D)
    fp32) for the query blocks below T_m (T_m' = padded_rows(T_m); the zero tail is the glue's).
    """
    c = _prepare(do, q, k, v, o, lse, o_lin, den, maps, proj_weight, proj_bias, block_q=block_q, block_k=block_k,
                 scale=scale, feature_map=feature_map, scope=scope, eps=eps, config=config, sparse=False,
                 lin_sums=lin_sums)
    if (fused_dq or fused_dkdv) and not c.gemm_states():
        raise ValueError("fused_dq / fused_dkdv need scope 'marginal' with a linear branch and "
                         f"prep.marginal_states='gemm' (got feature_map={feature_map!r}, scope={scope!r}, "
                         f"marginal_states={c.cfg['prep'].get('marginal_states', 'gemm')!r})")
    c = dataclasses.replace(c, fused_dq=bool(fused_dq), fused_dkdv=bool(fused_dkdv), query_state=query_state)

    def group_ds(ds):
        return ds.view(lse.shape[0], -1, lse.shape[-1])
    return _run(c, lambda heads, ds, dq, *terms: sparse_dq(heads, group_ds(ds), dq, *terms),
                lambda heads, ds, dk, dv, *terms: sparse_dkdv(heads, group_ds(ds), dk, dv, *terms))
