"""The TileLang backend (backends/tilelang.py, templates/tilelang/forward.py.j2).

CPU: tunables and their validation, availability reasons, input checks, the glue's GEMM of the excluded
blocks against an explicit sum, every template variant renders to valid Python, and a few specs really
compile to sm_90a with nvcc (TMA loads, wgmma, warp specialisation with setmaxnreg in the CUDA source).
Set SLAGEN_TILELANG_FULL_GRID=1 to compile the whole grid (d 64/128 × bf16/fp16 × feature maps and
sparse-only × scopes × negligible on/off, ~50 compiles) instead of the CI subset.

GPU (marker gpu, Hopper only): the TileLang forward vs the torch reference (fp32, same inputs) at video
lengths with outputs poisoned (NaN) first; rel. err < 2e-2. tools/check_tilelang.py runs these helpers.

Backward (config "backward": "tilelang", templates/tilelang/backward.py.j2): CPU — its config and errors,
every variant renders, the dq / dkdv kernels compile to sm_90a; GPU — dq, dk, dv vs the reference and vs the
Triton backward (rel. err < 3e-2), buffers poisoned first.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import dataclasses
import itertools
import math
import os
import re
import shutil

import pytest
import torch

from slagen import backends, codegen, reference
from slagen.backends import plans, ptxas, sass
from slagen.backends import reference as torch_backend
from slagen.backends import tilelang as tl_backend
from slagen.backends.triton import selection
from slagen.blockmap import LUT_FIELDS, BlockMap
from slagen.spec import KernelSpec
from tests.dense import block_means

TOL = 2e-2
PERSISTENT = dict(persistent=True, overlap=False, num_stages=3)   # the forward's persistent kernel (a tunable)
PINGPONG = {"pingpong": True, "overlap": False}   # the forward's turn-taking key loop (FlashAttention-3's order)
LAZY = {"lazy_rescale": True}   # the forward's lazy row-max reference (a tunable; see backends/tilelang.py)
DT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _tilelang_missing():
    return tl_backend.tilelang_import_error()


def _nvcc_missing():
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc is not installed (TileLang compiles sm_90a kernels with it)"
    return None


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_compiler = pytest.mark.skipif(bool(_tilelang_missing() or _nvcc_missing()),
                                    reason=str(_tilelang_missing() or _nvcc_missing()))
needs_hopper = pytest.mark.skipif(not _is_hopper(), reason="needs a Hopper GPU (CUDA capability 9.0)")
needs_nvdisasm = pytest.mark.skipif(sass.nvdisasm_path() is None,
                                    reason="needs nvdisasm (pip install nvidia-cuda-nvdisasm: the [test] extra)")


def spec_of(d=128, dtype="bf16", fmap="softmax", scope="marginal", negl=False, block=(128, 64)):
    return KernelSpec(arch="sm90", head_dim=d, block_q=block[0], block_k=block[1], feature_map=fmap, scope=scope,
                      has_negligible=negl, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# CPU: tunables, availability, input checks, glue math
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", tl_backend.HEAD_DIMS)
@pytest.mark.parametrize("block", [(64, 64), (128, 64), (128, 128), (64, 32)])
@pytest.mark.parametrize("fmap,scope", [("softmax", "marginal"), ("elu", "all"), (None, "marginal")])
def test_default_config_is_valid(d, block, fmap, scope):
    spec = spec_of(d=d, fmap=fmap, scope=scope, block=block)
    cfg = tl_backend.default_config(spec)
    tl_backend.check_config(cfg, spec)
    assert block[0] % cfg["tile_m"] == 0 and block[1] % cfg["tile_n"] == 0
    if scope == "marginal":
        assert block[1] % cfg["pre_tile"] == 0


def test_tree_max_is_the_default_for_sparse_only_at_d128_and_a_checked_tunable():
    """tree_max measured faster only without the linear branch (session 41); it is a bool like every switch."""
    for d, fmap, want in ((128, None, True), (128, "softmax", False), (64, None, False), (64, "softmax", False)):
        spec = spec_of(d=d, fmap=fmap, scope="marginal", block=(128, 64))
        cfg = tl_backend.default_config(spec)
        assert cfg["tree_max"] is want, (d, fmap)
        for lazy in (True, False):      # with or without the lazy softmax reference
            tl_backend.check_config({**cfg, "tree_max": True, "lazy_rescale": lazy}, spec)
        with pytest.raises(ValueError, match="tree_max"):
            tl_backend.check_config({**cfg, "tree_max": 1}, spec)


def test_defaults_that_need_warp_specialisation_give_way_without_it():
    """warp_specialized=False (the fallback without TMA lowering) turns the default overlap, pre_async and
    pre_overlap off; the caller's explicit choice of any is an error (test_bad_config_is_a_clear_error,
    test_prepass_overlap_compiles_for_sm90a)."""
    for d in (128, 64):
        spec = spec_of(d=d, scope="marginal", block=(128, 64))
        defaults = tl_backend.default_config(spec)
        assert defaults["overlap"] and defaults["pre_async"] and defaults["pre_overlap"] == (d == 128)
        cfg = tl_backend._resolve_config(spec, dict(warp_specialized=False, num_stages=1, pre_stages=1))
        assert not cfg["overlap"] and not cfg["pre_async"] and not cfg["pre_overlap"]


@pytest.mark.parametrize("d", tl_backend.HEAD_DIMS)
@pytest.mark.parametrize("block", [(128, 64), (256, 64), (64, 64), (128, 128)])
@pytest.mark.parametrize("fmap,scope", [("softmax", "marginal"), ("elu", "all"), (None, "marginal")])
def test_persistent_serves_128_row_tiles_over_64_key_blocks(d, block, fmap, scope):
    """The persistent forward (a tunable, off by default) serves 128-row tiles over key blocks of 64, scope
    'marginal' or sparse-only; elsewhere asking for it names why not."""
    spec = spec_of(d=d, fmap=fmap, scope=scope, block=block)
    assert not tl_backend.default_config(spec)["persistent"]
    if block[1] == 64 and block[0] % 128 == 0 and (fmap is None or scope == "marginal"):
        assert tl_backend._resolve_config(spec, PERSISTENT)["persistent"]
    else:
        with pytest.raises(ValueError, match="persistent=True does not serve"):
            tl_backend._resolve_config(spec, PERSISTENT)


@pytest.mark.parametrize("change", [dict(overlap=True), dict(tile_n=128), dict(pingpong=True, overlap=False),
                                    dict(tile_m=64, num_warps=4), dict(prefetch_h=True), dict(num_stages=1)])
def test_persistent_with_a_per_tile_loop_knob_is_a_clear_error(change):
    spec = spec_of(d=128, scope="marginal", block=(128, 64))
    with pytest.raises(ValueError, match="persistent=True needs"):
        tl_backend._resolve_config(spec, {**PERSISTENT, **change})


def test_persistent_shared_memory_and_proj_stages():
    """d 128: 3 K / V stages fit (224 KiB with H_i), 4 do not; with Proj's weight the kernel runs 2."""
    spec = spec_of(d=128, scope="marginal", block=(128, 64))
    cfg = tl_backend._resolve_config(spec, PERSISTENT)
    assert tl_backend.shared_bytes(cfg, spec) <= tl_backend.SHARED_MEMORY
    assert tl_backend.shared_bytes(cfg, spec, has_w=True) <= tl_backend.SHARED_MEMORY
    assert tl_backend.persistent_stages(cfg, True) == 2 and tl_backend.persistent_stages(cfg, False) == 3
    with pytest.raises(ValueError, match="shared memory"):
        tl_backend.check_config({**cfg, "num_stages": 4}, spec)


@pytest.mark.parametrize("change,match", [
    (dict(tile_m=96), "tile_m"), (dict(tile_m=256), "tile_m"), (dict(tile_n=96), "tile_n"),
    (dict(num_warps=6), "num_warps"), (dict(num_stages=0), "num_stages"), (dict(tile_m=64, num_warps=8), "num_warps=4"),
    (dict(warp_specialized=False), "num_stages=1"), (dict(warp_specialized=False, num_stages=1), "pre_stages=1"), (dict(warp_specialized="yes"), "warp_specialized"),
    (dict(pre_tile=128), "pre_tile"), (dict(bogus=1), "unknown keys"), (dict(ctas_per_sm=3), "ctas_per_sm"),
    (dict(ctas_per_sm=2), "num_warps=4"), (dict(overlap=1), "overlap"),
    (dict(overlap=True, pre_async=False, warp_specialized=False, num_stages=1, pre_stages=1),
     "overlap=True needs warp_specialized=True"),
    (dict(pre_async=True, overlap=False, warp_specialized=False, num_stages=1, pre_stages=1),
     "pre_async=True needs warp_specialized=True"),
    (dict(tail_split=0), "tail_split"), (dict(tail_split=9), "tail_split"), (dict(tail_split=True), "tail_split"),
    (dict(tail_split=2, overlap=False, pingpong=True), "tail_split > 1 needs"),
    (dict(tail_split=2, tile_n=128), "tail_split > 1 needs"),
    (dict(tail_split=2, overlap=False, tile_n=32), "tail_split > 1 needs"),
])
def test_bad_config_is_a_clear_error(change, match):
    spec = spec_of(scope="marginal", block=(128, 64))
    cfg = {**tl_backend.default_config(spec), **change}
    with pytest.raises(ValueError, match=match):
        tl_backend.check_config(cfg, spec)
    big = spec_of(block=(128, 128))
    with pytest.raises(ValueError, match="shared memory"):
        tl_backend.check_config({**tl_backend.default_config(big), "tile_n": 128, "num_stages": 4}, big)
    two = spec_of(scope="marginal", block=(64, 64))       # 97 KiB per CTA without Proj's weight: fits twice
    tl_backend.check_config({**tl_backend.default_config(two), "ctas_per_sm": 2}, two)
    with pytest.raises(ValueError, match="ctas_per_sm=2: each CTA needs"):
        tl_backend.check_config({**tl_backend.default_config(two), "ctas_per_sm": 2, "num_stages": 3}, two)


@pytest.mark.parametrize("tq,heads,most,plan", [
    (256, 12, 4, (3, 3)),      # the headline shape: 3036 tiles are 23 full waves, 36 tiles split in 3
    (256, 12, 1, (0, 1)),      # tail_split=1: off
    (256, 2, 4, (0, 1)),       # 512 tiles: a split tail needs 116 tiles, which cannot split in two
    (32, 12, 4, (0, 1)),       # 384 tiles: 2.9 waves whatever the split
    (32, 2, 4, (32, 2)),       # 64 tiles, half the SMs idle: every tile in two
    (1, 2, 4, (1, 4)),         # 2 tiles: four parts each
    (591, 40, 4, (1, 3)),      # L 75600, H 40: the last query tile of each head in three parts
])
def test_tail_plan_fills_the_last_wave(tq, heads, most, plan):
    """tail_plan's split: the whole tiles' launch in full waves where it can be, the split tail in one wave of
    at most 132 CTAs, taken only where it saves time by its count of waves."""
    cols, parts = tl_backend.tail_plan(tq, heads, 132, most)
    assert (cols, parts) == plan
    if cols:
        assert 2 <= parts <= most and cols * heads * parts <= 132 and cols <= tq


def test_forward_launches_whole_tiles_then_the_split_tail(monkeypatch):
    """The per-tile forward launches the whole tiles (grid x = tq - cols) and then the split tail (grid x =
    cols·parts per head, X0 = tq - cols) with a fresh workspace and zeroed counts, or one launch where
    tail_plan splits nothing; no GPU: the kernels are stand-ins that record their arguments."""
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __call__(self, *args):
            grid, po, pml, flag, x0, cols, parts = args[-7:]
            launches.append((self.name, grid.numel(), tuple(po.shape), tuple(pml.shape), flag.tolist(), x0, cols,
                             parts))

    spec = spec_of(d=128, fmap=None)
    cfg = tl_backend._resolve_config(spec, {"tail_split": 4})
    plan = tl_backend._ForwardPlan(key=None, spec=spec, cfg=cfg, save=False, has_w=False, kernel=Recorder("main"),
                                   prepass=None, tail_kernel=Recorder("tail"))
    monkeypatch.setattr(tl_backend, "_forward_plan", lambda *a, **k: plan)
    monkeypatch.setattr(tl_backend, "_sm_count", lambda device: 132)
    monkeypatch.setattr(tl_backend, "_check_inputs", lambda *a: None)
    monkeypatch.setattr(tl_backend.torch.cuda, "device", lambda device: contextlib.nullcontext())
    for lq, heads, want in ((32760, 12, [("main", 253, (1, 128, 128), (1, 2, 128), [0], 0, 1, 1),
                                         ("tail", 9, (108, 128, 128), (108, 2, 128), [0] * 36, 253, 3, 3)]),
                            (32760, 2, [("main", 256, (1, 128, 128), (1, 2, 128), [0], 0, 1, 1)]),
                            (77, 2, [("tail", 4, (8, 128, 128), (8, 2, 128), [0, 0], 0, 1, 4)])):
        launches.clear()
        q = torch.randn(1, heads, lq, 128, dtype=torch.bfloat16)
        tq = -(-lq // 128)
        maps = [torch.zeros(1, heads, tq, 8, dtype=torch.int8), torch.zeros(1, heads, tq, 1, dtype=torch.int32),
                torch.ones(1, heads, tq, dtype=torch.int32)] + [torch.zeros(1, heads, 1, 1)] * 6
        tl_backend.forward(q, q, q, maps, None, None, False, block_q=128, block_k=64, scale=0.1, feature_map=None,
                           scope="marginal", eps=1e-6)
        assert launches == want, (lq, heads, launches)


def test_unavailable_reasons():
    spec = spec_of()
    assert "Hopper" in tl_backend.unavailable_reason(torch.device("cpu"), spec)
    if torch.cuda.is_available() and not _is_hopper():
        assert "capability 9.0" in tl_backend.unavailable_reason(torch.device("cuda"), spec)
    if _is_hopper():
        dev = torch.device("cuda")
        assert "head_dim=32" in tl_backend.unavailable_reason(dev, spec.replace(head_dim=32))
        assert "fp32" in tl_backend.unavailable_reason(dev, spec.replace(dtype="fp32"))
        if not _tilelang_missing():
            assert tl_backend.unavailable_reason(dev, spec) is None


def test_forward_rejects_what_tma_cannot_read():
    maps = [torch.zeros(1)] * 9
    q = torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        tl_backend.forward(q, q, q, maps, None, None, False, block_q=64, block_k=64, scale=0.125,
                           feature_map="none", scope="marginal", eps=1e-5)
    base = torch.zeros(1, 2, 16, 68, dtype=torch.bfloat16)[..., :64]      # rows of 136 bytes
    with pytest.raises(ValueError, match="16 bytes"):
        tl_backend._check_tma("k", base)
    with pytest.raises(ValueError, match="unit stride"):
        tl_backend._check_tma("k", torch.zeros(1, 2, 64, 16, dtype=torch.bfloat16).transpose(-1, -2))
    tl_backend._check_tma("q", torch.zeros(1, 16, 2, 64, dtype=torch.bfloat16).transpose(1, 2))   # blhd view
    qkv = torch.zeros(1, 16, 3, 2, 64, dtype=torch.bfloat16)
    tl_backend._check_tma("q", qkv[:, :, 1].transpose(1, 2))                                       # fused qkv


@pytest.mark.parametrize("pre_tile,block_k", [(64, 64), (32, 64), (64, 128)])
def test_marginal_sums_match_an_explicit_sum(pre_tile, block_k):
    """The TileLang glue's H_i, Z_i (the Triton operands kernel, interpreted here, and one GEMM): T_n = 5
    blocks (the GEMM's K padded to 8), pre-pass tiles grouped into blocks, a row without marginal blocks."""
    g = torch.Generator().manual_seed(0)
    B, H, d, lk, tm = 1, 2, 64, 5 * block_k - 3, 3
    tn = math.ceil(lk / block_k)
    n_tiles = math.ceil(lk / pre_tile)
    ht = torch.randn(B, H, n_tiles, d, d, generator=g)
    zt = torch.randn(B, H, n_tiles, d, generator=g)
    mask = torch.randint(-1, 2, (B, H, tm, tn), generator=g).to(torch.int8)
    mask[0, 1, 0] = 1                              # a row with no marginal block: exact zeros
    spec = spec_of(d=d, dtype="fp32", block=(64, block_k))
    hi, zi = tl_backend.marginal_sums(spec, dict(pre_tile=pre_tile), ht, zt, mask)
    assert hi.dtype == ht.dtype and zi.dtype == torch.float32
    r = block_k // pre_tile
    for i in range(tm):
        marg = [j for j in range(tn) if mask[0, 1, i, j] == 0]
        tiles = [t for j in marg for t in range(j * r, min((j + 1) * r, n_tiles))]
        want_h = ht[0, 1, tiles].sum(0) if tiles else torch.zeros(d, d)
        want_z = zt[0, 1, tiles].sum(0) if tiles else torch.zeros(d)
        torch.testing.assert_close(hi[0, 1, i], want_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zi[0, 1, i], want_z, rtol=1e-5, atol=1e-5)
    assert not hi[0, 1, 0].any() and not zi[0, 1, 0].any()


@pytest.mark.parametrize("pre_tile", [64, 32])
def test_marginal_operands_of_an_early_map_equal_the_operand_kernels(pre_tile):
    """An early pre-pass's block map (an EarlyPooled: its means and marginal-operand buffers, interpreted here)
    marks them written and gives the forward's marginal_sums the same H_i, bitwise, and Z_i to fp32 accuracy
    as the operand kernel and z GEMM on that map (pre-pass tiles grouped into blocks, the negligible class)."""
    g = torch.Generator().manual_seed(1)
    B, H, d, lq, lk, bq, bk = 1, 2, 64, 300, 5 * 64 - 3, 64, 64
    q, k = torch.randn(B, H, lq, d, generator=g), torch.randn(B, H, lk, d, generator=g)
    n_tiles = math.ceil(lk / pre_tile)
    n_rows = -(-n_tiles // 8) * 8
    ht = torch.randn(B, H, n_rows, d, d, generator=g)
    zt = torch.rand(B, H, n_rows, d, generator=g)
    ht[:, :, n_tiles:], zt[:, :, n_tiles:] = 0, 0
    means = tuple(t.float().contiguous() for t in (block_means(q, bq), block_means(k, bk), k.double().sum(2, True)))
    cfg = dict(pre_tile=pre_tile)
    early = tl_backend.EarlyPooled(means, tl_backend._marginal_buffers(q, k, bq, bk, cfg, zt))
    maps = tl_backend.block_map(q, k, 1, 1, bq, bk, pooled=early)
    assert early.written and torch.equal(maps[0], torch_backend.block_map(q, k, 1, 1, bq, bk)[0])
    spec = spec_of(d=d, dtype="fp32", block=(bq, bk), negl=True)
    want = tl_backend.marginal_sums(spec, cfg, ht, zt, maps[0])
    got = tl_backend.marginal_sums(spec, cfg, ht, zt, maps[0], given=early.marginal)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------
# CPU: rendering and compiling for sm_90a
# ----------------------------------------------------------------------------------------------------

GRID = [spec_of(d=d, dtype=dt, fmap=fm, scope=sc, negl=ng)
        for d, dt, fm, sc, ng in itertools.product((64, 128), ("bf16", "fp16"), ("softmax", "elu", "relu", None),
                                                   ("marginal", "all"), (False, True))
        if fm is not None or (sc == "marginal" and not ng)]


@pytest.mark.parametrize("spec", GRID + [spec_of(block=b) for b in ((64, 64), (128, 128), (64, 32))],
                         ids=lambda s: s.canonical)
def test_template_renders_valid_python(spec):
    text = codegen.render(spec, "tilelang")
    tree = ast.parse(text)
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "forward_kernel" in names
    assert ("prepass_kernel" in names) == (spec.feature_map is not None)
    assert f"HEAD_DIM = {spec.head_dim}" in text and f"BLOCK_K = {spec.block_k}" in text


# (spec, epilogue flags): the CI subset covers both head dims and dtypes, every feature map, sparse-only,
# both scopes, negligible on/off and every epilogue flag; 8 compiles.
CI_COMPILES = [
    (spec_of(d=128, fmap=None), {}),
    (spec_of(d=128, fmap="softmax", scope="marginal", negl=True), dict(save=True, has_w=True, has_bias=True)),
    (spec_of(d=128, fmap="softmax", scope="all"), {}),
    (spec_of(d=64, dtype="fp16", fmap="elu", scope="marginal"), dict(has_bias=True)),
    (spec_of(d=64, fmap="relu", scope="all", negl=True), dict(save=True, has_w=True)),
]
FULL = os.environ.get("SLAGEN_TILELANG_FULL_GRID") == "1"
COMPILES = [(s, dict(save=True, has_w=True, has_bias=True)) for s in GRID] if FULL else CI_COMPILES


def _assert_hopper_source(src: str, what: str):
    assert "tl::tma_load" in src, f"{what}: no TMA loads in the generated CUDA"
    assert "wgmma" in src, f"{what}: no wgmma in the generated CUDA"
    assert "warpgroup_reg_alloc" in src, f"{what}: not warp-specialised (no setmaxnreg)"


def _assert_sparse_loop_runs(src: str, what: str):
    """The sparse loop (producer and consumer copies) runs at least once: TileLang's consumer waits for the
    tiles loaded before the loop only at its first step, so a row or key block with no critical block walks
    one masked step (else its epilogue races those TMA loads)."""
    bounds = re.findall(r"for \(int t\w* = 0; t\w* < (.*?); \+\+t\w*\)", src)
    assert len(bounds) >= 2 and all(re.fullmatch(r"max\(.*, 1\)", x) for x in bounds), f"{what}: loop bounds {bounds}"


def _assert_paired_loops_run(src: str, what: str):
    """The paired dK/dV (hand-specialised): the producer walks at least one step (a key block no query block chose
    walks one padding step), and each consumer waits for K and V before its own loop, which may run zero times
    (consumer 1 where the block has one step), so no epilogue races those TMA loads."""
    producer = re.findall(r"for \(int t\w* = 0; t\w* < (.*?); \+\+t\w*\)", src)
    assert len(producer) == 1 and re.fullmatch(r"max\(.*, 1\)", producer[0]), f"{what}: producer loop {producer}"
    waits = [m.start() for m in re.finditer(r"kv_full\[0\]\.wait\(0\)", src)]
    loops = [m.start() for m in re.finditer(r"for \(int j\w* = 0;", src)]
    assert len(waits) == len(loops) == 2 and waits[0] < loops[0] < waits[1] < loops[1], f"{what}: {waits} {loops}"


def _assert_persistent_structure(src: str, what: str):
    """The persistent forward: producer and consumer each walk the CTA's tiles (a stride-G loop), the
    consumers wait for the tile's Q before its key loop (so a row without critical blocks, whose loop runs
    zero times, still waits for the load it releases), and O leaves only through TMA stores."""
    assert len(re.findall(r"for \(int it\w* = 0;", src)) == 2, f"{what}: not one tile loop per role"
    loops = [m.start() for m in re.finditer(r"for \(int t\w* = 0; t\w* < n_crit; \+\+t\w*\)", src)]
    q_wait = src.find("q_full[(it_1 & 1)].wait(")
    assert len(loops) == 2 and loops[0] < q_wait < loops[1], f"{what}: the consumer does not wait for Q first"
    assert "tma_store(O_desc" in src and not re.search(r"\bO\[", src), f"{what}: O is not written by TMA alone"


@needs_compiler
@pytest.mark.parametrize("spec,flags", COMPILES, ids=lambda x: x.canonical if isinstance(x, KernelSpec) else
                         "-".join(k for k, v in sorted(x.items()) if v) or "plain")
def test_forward_compiles_for_sm90a(spec, flags):
    cfg = tl_backend.default_config(spec)
    kernel = tl_backend.forward_kernel(spec, cfg, **flags)
    _assert_hopper_source(kernel.get_kernel_source(), "forward")
    _assert_sparse_loop_runs(kernel.get_kernel_source(), "forward")
    cache = tl_backend.cache_dir() / "tilelang"
    assert cache.is_dir() and any(cache.rglob("*.cu")), "TileLang's cache is not inside slagen's cache dir"


@needs_compiler
def test_forward_tail_kernel_compiles_for_sm90a():
    """The split tail's kernel (config tail_split > 1): one TMA + warp-specialised
    pipelined loop that runs at least once (a part may walk no block); each part stores its state, fences and
    counts itself with one acq_rel atomic; the last part merges and writes O by TMA. The whole-tile kernel has
    none of that."""
    spec = spec_of(d=128, scope="marginal")
    cfg = tl_backend._resolve_config(spec, {"tail_split": 4})
    src = tl_backend.forward_kernel(spec, cfg, tail=True).get_kernel_source()
    _assert_hopper_source(src, "tail forward")
    steps = re.findall(r"int (n_steps\w*) = max\(n_walk, 1\);", src)     # (its loop bounds, in variables)
    assert len(steps) == 2 and all(f"< {n};" in src for n in steps), "a part without blocks must walk one step"
    count = src.find("AtomicAddRet(")
    assert src.count("AtomicAddRet(") == 1 and src.endswith(")", 0, src.find(";", count)), "not one counting atomic"
    assert re.search(r"AtomicAddRet\(.*FLAG.*, 1, 4\)", src), "the count is not acq_rel (memory order 4)"
    assert 0 < src.find("__threadfence();") < count, "the part's stores are not fenced before it counts itself"
    assert count < src.find("tma_store(O_desc"), "O is stored before the parts are merged"
    whole = tl_backend.forward_kernel(spec, cfg).get_kernel_source()
    assert "AtomicAddRet" not in whole and "__threadfence" not in whole and "PO[" not in whole


@needs_compiler
@pytest.mark.parametrize("spec,flags", [(spec_of(d=128, scope="marginal"), dict(save=True, has_w=True, has_bias=True)),
                                        (spec_of(d=64, fmap=None), {})],
                         ids=lambda x: x.canonical if isinstance(x, KernelSpec) else "-".join(sorted(x)) or "plain")
def test_persistent_forward_compiles_for_sm90a(spec, flags):
    src = tl_backend.forward_kernel(spec, tl_backend._resolve_config(spec, PERSISTENT), **flags).get_kernel_source()
    _assert_hopper_source(src, "persistent forward")
    _assert_persistent_structure(src, "persistent forward")


@needs_compiler
@pytest.mark.parametrize("spec,change", [(spec_of(d=128, scope="marginal"), {"prefetch_h": True}),
                                         (spec_of(d=64, scope="all"), {"prefetch_h": True}),
                                         (spec_of(d=128, scope="marginal"), {"tma_store": True}),
                                         (spec_of(d=128, fmap=None), {"tma_store": True}),
                                         (spec_of(d=64, scope="all"), {"prefetch_h": True, "tma_store": True})],
                         ids=lambda x: x.canonical if isinstance(x, KernelSpec) else "-".join(sorted(x)))
def test_forward_epilogue_variants_compile_for_sm90a(spec, change):
    """prefetch_h: H_i (marginal) or the per-head H (all) loaded into registers before the consumer's key loop
    (else after it); tma_store: O (and O^l) staged in shared memory and written by TMA stores, no per-thread
    global stores of them; each still one TMA + warp-specialised pipelined loop."""
    cfg = tl_backend._resolve_config(spec, change)
    linear = spec.feature_map is not None
    src = tl_backend.forward_kernel(spec, cfg, save=linear, has_w=linear, has_bias=linear).get_kernel_source()
    _assert_hopper_source(src, f"forward {change}")
    if linear:
        loop_head = [m.start() for m in re.finditer(r"for \(int t\w* = 0;", src)][1]
        loads = [m.start() for m in re.finditer(r"\(HG \+ ", src)]
        assert loads and all((i < loop_head) == bool(change.get("prefetch_h")) for i in loads), "H's loads misplaced"
        assert "Hi_s" in src[loads[-1]:], "H not moved to shared memory after its loads"
    if change.get("tma_store"):
        assert "tma_store(O_desc" in src and not re.search(r"\bO\[", src), "O is not written by TMA alone"
        assert not linear or ("tma_store(OLIN_desc" in src and not re.search(r"\bOLIN\[", src))


def _consumer_loop(src: str) -> str:
    """The consumer warpgroups' key loop of a generated forward kernel (from its head to the last release of a
    K / V tile, an mbarrier arrive)."""
    heads = [m.start() for m in re.finditer(r"for \(int t\w* = 0;", src)]
    assert len(heads) == 2, "expected one producer and one consumer key loop"
    return src[heads[1]:src.rindex("].arrive();")]


@needs_compiler
@pytest.mark.parametrize("spec,change,flags", [
    (spec_of(d=128, fmap=None), {}, {}),
    (spec_of(d=128, scope="marginal"), {}, dict(save=True, has_w=True, has_bias=True)),
    (spec_of(d=64, scope="all"), {"tile_n": 128}, {}),
    (spec_of(d=128, fmap=None, block=(64, 64)), {}, {})],
    ids=lambda x: x.canonical if isinstance(x, KernelSpec) else "-".join(f"{k}{v}" for k, v in sorted(x.items()))
    or "plain")
def test_forward_overlap_compiles_for_sm90a(spec, change, flags):
    """overlap: in the consumer's key loop the step's row max comes first, then the wait for K_{t+1}'s tile and the
    S_{t+1} = QKᵀ wgmma batch, committed without a wait; the softmax's exp2 runs while it is in flight, and the one
    wait (warpgroup_wait<0>) follows the P·V batch; the K / V tiles are released (mbarrier arrive) only after that
    wait. S_{t+1} overwrites acc_s once step t's scaled scores are out of it (in acc_p), so no copy between the
    accumulators. Without overlap every batch is waited for right after its commit. With one step per key block,
    S_{t+1}'s wgmma takes Q from registers (q_r, loaded from shared memory once, in step 0) and only K from shared
    memory; two key blocks per step keep both in shared memory."""
    cfg = tl_backend._resolve_config(spec, {**change, "overlap": True})
    src = tl_backend.forward_kernel(spec, cfg, **flags).get_kernel_source()
    if cfg["ctas_per_sm"] == 1:
        _assert_hopper_source(src, "forward overlap")
    else:                   # 64-row tiles, two CTAs per SM: no register reallocation
        assert "tl::tma_load" in src and "wgmma" in src and "__launch_bounds__(256, 2)" in src
    loop = _consumer_loop(src)
    first = loop.index("tl::warpgroup_commit_batch();", loop.index("(bfloat16_t*)K_s)"))   # S_{t+1} committed
    assert not loop[first:].split("\n", 2)[1].strip().startswith("tl::warpgroup_wait"), "S_{t+1} waited at once"
    # step t's row max before S_{t+1}'s wait for its K tile (whose chain then hides under the max's), exp2s after
    k_wait = loop.rindex("].wait(", 0, loop.index("(bfloat16_t*)K_s)"))
    assert loop.index("AllReduce<tl::MaxOp") < k_wait < loop.index("exp2f(", k_wait), "row max not ahead of K's wait"
    assert "exp2f(" in loop[first:loop.index("tl::warpgroup_wait<0>();", first)], "no exp2 while S_{t+1} is in flight"
    assert loop.count("tl::warpgroup_commit_batch();") == 3       # step 0's S (first iteration), S_{t+1}, P·V
    assert loop.count("tl::warpgroup_wait<") == 2                 # step 0's S, then one wait per step
    assert loop.rindex("tl::warpgroup_wait<0>();") > loop.rindex("tl::warpgroup_commit_batch();")
    assert "K0_s" in loop and "mbarrier[" in loop
    # S_{t+1} goes into acc_s itself once step t's scaled scores are in acc_p: no copy between the two
    s_next = loop[loop.rindex("tl::warpgroup_arrive();", 0, first):first]
    assert "(acc_s + 0)" in s_next and "acc_p" not in s_next, "S_{t+1} not written into acc_s"
    assert loop.index("acc_p + ") < loop.rindex("tl::warpgroup_arrive();", 0, first), "scores not taken out first"
    assert not re.search(r"acc_s\[[^\]]*\] = acc_p\[|\(acc_s \+ [^)]*\) = \*\([^)]*\)\(acc_p", loop), "acc_p copied"
    # the LUT walked last-first: only step 0 can hold the partial last key block (with two key blocks per step, also
    # an odd count's lone block), so step 0's S is the one masked (a -inf fill), every later S a cleared accumulator
    masks = re.findall(r"= 0x0p\+0f/\*0\.000000e\+00\*/;\s*\} else \{\s*condval_\d+ = -CUDART_INF_F;", loop)
    assert len(masks) == 1, f"{len(masks)} masked score fills in the loop (step 0's only expected)"
    # lazy_rescale (the d 128 default): O's rescale only under a warp vote, after the row sums, before P·V's issue
    if cfg["lazy_rescale"]:
        vote = loop.index("__any_sync(")
        assert loop.index("AllReduce<tl::SumOp") < vote < loop.rindex("tl::warpgroup_arrive();"), \
            "O's rescale not under the vote"
    else:
        assert "__any_sync(" not in loop
    # tree_max (the d 128 sparse-only default): the step's row max as a pairwise tree (backends/cuda_rewrites)
    assert ("{ float tree_[" in loop) == cfg["tree_max"] and "max(row_max_tree[" not in src
    registers_q = re.search(r"tl::wgmma_rs<[^\n]*q_r \+", loop)
    if cfg["tile_n"] == spec.block_k:
        assert registers_q, "S_{t+1} should read Q from registers"
        assert re.search(r"ptx_ldmatrix\w*\(\(&\(\(\(bfloat16_t\*\)Q_s\)[^\n]*q_r\[", loop), "Q not copied to q_r"
        assert loop.count("tl::wgmma_ss<") == 1 and loop.count("tl::wgmma_rs<") == 2   # step 0's S; S_{t+1}, P·V
    else:
        assert not registers_q and "q_r" not in src
    # The consumer's waits for Q's and step 0's K's TMA loads sit in the loop's first iteration, so the loop
    # must run for a row without critical blocks too (one masked step): else the epilogue's writes to Q_s
    # (tma_store staging O) race Q's load still in flight (the H200 failure, d128 sparse-only, counts 0/1/2).
    bars = {name: re.search(rf"tl::tma_load\({name}_desc, mbarrier\[(\d+)\], \(&\(\(\(\w+\*\){tensor}\)",
                            src).group(1) for name, tensor in (("Q", "Q_s"), ("K", "K0_s"))}
    for name, bar in bars.items():
        assert f"mbarrier[{bar}].wait(" in loop, f"{name}'s barrier not waited in the consumer's loop"
        assert src.count(f"mbarrier[{bar}].wait(") == 1
    _assert_sparse_loop_runs(src, "forward overlap")
    plain = tl_backend.forward_kernel(spec, tl_backend._resolve_config(spec, {**change, "overlap": False}),
                                      **flags).get_kernel_source()
    base = _consumer_loop(plain)
    if cfg["tile_n"] == spec.block_k:   # last-first too: one masked S GEMM (step 0's) and one cleared one
        assert base.count("< Lk") == 1 and base.count("LUT") == 1 and base.count("wgmma_ss") == 2
        assert base.count("tl::warpgroup_commit_batch();") == base.count("tl::warpgroup_wait<0>();") == 3
    else:
        assert base.count("tl::warpgroup_commit_batch();") == base.count("tl::warpgroup_wait<0>();") == 2
    assert "K0_s" not in plain


@needs_compiler
@pytest.mark.parametrize("spec,flags", [
    (spec_of(d=128, fmap=None), {}),
    (spec_of(d=128, scope="marginal"), dict(save=True, has_w=True, has_bias=True)),
    (spec_of(d=64, scope="all", block=(128, 128)), {})],
    ids=lambda x: x.canonical if isinstance(x, KernelSpec) else "-".join(sorted(x)) or "plain")
def test_forward_pingpong_compiles_for_sm90a(spec, flags):
    """pingpong: each consumer step waits for its warpgroup's turn (bar.sync on named barrier 10 + wg), commits
    S_t = QK_tᵀ and the previous step's P·V as two batches without waiting, hands the turn over (bar.arrive on
    the other's barrier), waits for S_t alone (wait_wgmma<1>) before the softmax and for P·V (wait_wgmma<0>)
    before O's rescale; warpgroup 1 gives the first turn, warpgroup 0 takes the last hand-over, so the
    arrivals and syncs pair up. The last step's V tile is TMA-loaded before the loop and waited for once, in
    the consumer loop (its P·V is the last step's). The loop runs at least once."""
    cfg = tl_backend._resolve_config(spec, {"pingpong": True, "overlap": False})
    src = tl_backend.forward_kernel(spec, cfg, **flags).get_kernel_source()
    _assert_hopper_source(src, "forward pingpong")
    loop = _consumer_loop(src)
    turn = loop.index("tl::__sync_thread_partial(((((int)threadIdx.x) >> 7) + 9), 256);")
    hand = loop.index("tl::__named_barrier_arrive((12 - (((int)threadIdx.x) >> 7)), 256);")
    commits = [m.start() for m in re.finditer(r"tl::warpgroup_commit_batch\(\);", loop)]
    assert len(commits) == 3 and turn < commits[0] < commits[1] < hand < commits[2], "S_t, P·V in the turn; last P·V"
    assert "tl::warpgroup_wait<" not in loop[turn:hand], "a batch waited for inside the turn"
    first_wait, second_wait = loop.index("tl::wait_wgmma<1>();"), loop.index("tl::wait_wgmma<0>();")
    assert hand < first_wait < loop.index("exp2f(", first_wait) < second_wait
    # a store of the softmax's row sums before the K / V release keeps ptxas from hoisting that release, and
    # with it the P·V wait, above the exp2s
    assert "LSE[" in loop[loop.index("exp2f(", first_wait):second_wait], "no store pins the release after the softmax"
    assert re.search(r"\(t_1 == 0\) && \(\(\(\(int\)threadIdx.x\) >> 7\) == 2\)\) \{\s*tl::__named_barrier_arrive"
                     r"\(10, 256\);", loop), "warpgroup 1 does not give warpgroup 0 the first turn"
    assert re.search(r"== 1\)\) \{\s*tl::__sync_thread_partial\(10, 256\);", loop), "the last hand-over not taken"
    bar = re.search(r"tl::tma_load\(V_desc, mbarrier\[(\d+)\], \(&\(\(\(\w+\*\)V1_s\)", src).group(1)
    assert src.count(f"mbarrier[{bar}].wait(") == 1 and f"mbarrier[{bar}].wait(" in loop
    _assert_sparse_loop_runs(src, "forward pingpong")
    for change in ({"pingpong": True, "overlap": True},
                   {"pingpong": True, "overlap": False, "num_warps": 4, "tile_m": 64}):
        with pytest.raises(ValueError, match="pingpong=True needs"):
            tl_backend._resolve_config(spec, change)


@needs_compiler
@pytest.mark.parametrize("spec", [spec_of(d=128, scope="marginal"), spec_of(d=64, fmap=None)],
                         ids=lambda s: s.canonical)
def test_forward_with_two_key_blocks_per_step_compiles_for_sm90a(spec):
    """tile_n = 2·block_k: each half of the K / V tiles is TMA-loaded per 64-column chunk (a contiguous
    span of the swizzled tile; TileLang 0.1.15 rejects one copy into a gapped half), 128-wide wgmma."""
    cfg = tl_backend._resolve_config(spec, {"tile_n": 128, "overlap": False})   # (overlap adds step 0's K copies)
    src = tl_backend.forward_kernel(spec, cfg, save=False, has_w=False, has_bias=False).get_kernel_source()
    _assert_hopper_source(src, "forward tile_n=128")
    assert src.count("tl::tma_load(K_desc") == 2 * spec.head_dim // 64, "one K copy per half and chunk"
    assert re.search(r"wgmma_ss<[^>]*, 64, 128, 16,", src), "the S = QKᵀ wgmma is not 128 keys wide"
    with pytest.raises(ValueError, match="2·block_k"):
        tl_backend._resolve_config(spec_of(d=128, block=(128, 32)), {"tile_n": 128})


@needs_compiler
@pytest.mark.parametrize("fmap", [None, "softmax"])
def test_forward_with_two_ctas_per_sm_compiles_for_sm90a(fmap):
    """ctas_per_sm=2 (64-row tiles, the default there): __launch_bounds__(256, 2) — 128 registers per thread at
    launch — and the producer's registers handed to the consumer (setmaxnreg 24 / 232), still TMA and wgmma.
    A call with Proj's weight runs one CTA per SM (W's tile: two no longer fit an SM's shared memory), and the
    training forward with Proj always does (two of them hung on an H200). Without warp specialisation there is no
    producer to take registers from: every thread keeps the launch's 128."""
    spec = spec_of(d=128, fmap=fmap, scope="marginal", block=(64, 64))
    cfg = tl_backend._resolve_config(spec, None)
    assert cfg["ctas_per_sm"] == 2 and cfg["overlap"] and cfg["num_warps"] == 4
    for save in (False, True):
        src = tl_backend.forward_kernel(spec, cfg, save=save).get_kernel_source()
        assert "__launch_bounds__(256, 2)" in src
        assert "warpgroup_reg_dealloc<24>" in src and "warpgroup_reg_alloc<232>" in src
        assert "tl::tma_load" in src and "wgmma" in src
    if fmap is not None:
        for save in (False, True):
            with_w = tl_backend.forward_kernel(spec, cfg, save=save, has_w=True, has_bias=True).get_kernel_source()
            assert "__launch_bounds__(256, 1)" in with_w and "warpgroup_reg_alloc<240>" in with_w
    plain = {**cfg, "warp_specialized": False, "num_stages": 1, "pre_stages": 1, "overlap": False,
             "pre_async": False, "pre_overlap": False}
    src = tl_backend.forward_kernel(spec, plain).get_kernel_source()
    assert "__launch_bounds__(128, 2)" in src and "warpgroup_reg_alloc" not in src   # no producer warpgroup


def test_forward_ctas_per_sm_of_a_call():
    """The config's two CTAs per SM, except for a call applying Proj's weight where two CTAs with W's tile do not
    fit (and the training forward with Proj, always); shared_bytes counts W only for a call with it."""
    spec = spec_of(d=128, scope="marginal", block=(64, 64))
    cfg = tl_backend._resolve_config(spec, None)
    assert 2 * tl_backend.shared_bytes(cfg, spec) <= tl_backend.SHARED_MEMORY_PER_SM
    assert 2 * tl_backend.shared_bytes(cfg, spec, has_w=True) > tl_backend.SHARED_MEMORY_PER_SM
    assert tl_backend.forward_ctas_per_sm(spec, cfg, save=False, has_w=False) == 2
    assert tl_backend.forward_ctas_per_sm(spec, cfg, save=True, has_w=False) == 2
    assert tl_backend.forward_ctas_per_sm(spec, cfg, save=False, has_w=True) == 1
    assert tl_backend.forward_ctas_per_sm(spec, cfg, save=True, has_w=True) == 1
    one = tl_backend._resolve_config(spec, {"ctas_per_sm": 1})
    assert tl_backend.forward_ctas_per_sm(spec, one, save=False, has_w=False) == 1
    sparse = spec_of(d=128, fmap=None, scope="marginal", block=(64, 64))
    assert tl_backend.shared_bytes(cfg, sparse, has_w=True) == tl_backend.shared_bytes(cfg, sparse)


@needs_compiler
def test_dq_with_two_key_blocks_per_step_compiles_for_sm90a():
    spec = bwd_spec_of(d=128)
    cfg = tl_backend._resolve_config(spec, {"backward": "tilelang", "dq": {"tile_n": 128}})
    src = tl_backend.backward_kernel(spec, cfg, "dq").get_kernel_source()
    _assert_hopper_source(src, "dq tile_n=128")
    assert src.count("tl::tma_load(K_desc") == 4 and src.count("tl::tma_load(V_desc") == 4
    assert re.search(r"wgmma_ss<[^>]*, 64, 128, 16,", src), "S = QKᵀ is not 128 keys wide"
    with pytest.raises(ValueError, match="2·block_k"):
        tl_backend._resolve_config(bwd_spec_of(block=(128, 32)), {"backward": "tilelang", "dq": {"tile_n": 128}})


@needs_compiler
@pytest.mark.parametrize("spec", [spec_of(d=128, scope="marginal"), spec_of(d=64, fmap="elu", scope="all"),
                                  spec_of(d=64, scope="marginal")],
                         ids=lambda s: s.canonical)
def test_prepass_compiles_for_sm90a(spec):
    """The pre-pass: TMA loads, wgmma, warp specialisation; z_t = φ(K_t)ᵀ·1 on the tensor cores (an N=8
    wgmma against a ones tile), so the tile loop has no cross-warp AllReduce over rows (session 8: that
    reduction was 56 of the marginal d=128 pre-pass's 61 named barriers per tile)."""
    src = tl_backend.prepass_kernel(spec, tl_backend.default_config(spec)).get_kernel_source()
    _assert_hopper_source(src, "pre-pass")
    assert re.search(r"wgmma_ss<[^>]*, 64, 8, 16,", src), "z_t is not a wgmma against the ones tile"
    assert not re.search(r"AllReduce<tl::SumOp, 256,", src), "z_t still reduces rows across warps"
    if spec.scope == "marginal":      # scope 'all' reduces its fp32 partial once, after the loop
        assert "workspace" not in src, "the marginal pre-pass still reduces through shared-memory workspace"


@needs_compiler
@pytest.mark.parametrize("d", tl_backend.HEAD_DIMS)
def test_pooling_kernels_compile_for_sm90a(d):
    """The block map's pooling on TileLang: sla_pool (TMA loads, warp specialisation, each tile's column sums an
    N=8 wgmma against the ones tile; two CTAs resident per SM: launch bounds' minimum blocks 2, no register
    handover, at most 128 registers per thread) and the marginal pre-pass that pools K ('k') or K and Q ('qk')
    with the same instructions: one more ones-wgmma per pooled tile, Q's tiles TMA-loaded only by 'qk'."""
    spec = spec_of(d=d, scope="marginal")
    cfg = tl_backend.default_config(spec)
    pool_kernel = tl_backend.pool_kernel(spec.replace(role="block_map", feature_map=None), 64)
    pool = pool_kernel.get_kernel_source()
    assert "tl::tma_load" in pool and "wgmma" in pool and ".wait(" in pool, "sla_pool: not a TMA / wgmma pipeline"
    assert len(re.findall(r"wgmma_ss<[^>]*, 64, 8, 16,", pool)) == 1, "pool: not one ones-wgmma"
    # 256 threads: the consumer warpgroup and TileLang's producer (warp-specialised), two CTAs per SM
    assert tl_backend.POOL_CTAS_PER_SM == 2
    assert "__launch_bounds__(256, 2)" in pool and "warpgroup_reg_alloc" not in pool
    rep = ptxas.report(pool_kernel)
    assert rep.registers <= 128 and rep.spill_bytes == 0, rep
    plain = tl_backend.prepass_kernel(spec, cfg).get_kernel_source()
    ones = lambda src: len(re.findall(r"wgmma_ss<[^>]*, 64, 8, 16,", src))     # (h_t's wgmma is wider)
    assert ones(plain) == 1
    for pool_what, extra in (("k", 1), ("qk", 2)):
        src = tl_backend.prepass_kernel(spec, cfg, pool_what).get_kernel_source()
        _assert_hopper_source(src, f"pre-pass pool={pool_what}")
        assert ones(src) == 1 + extra, pool_what
        assert ("tl::tma_load(Q_desc" in src) == (pool_what == "qk"), pool_what
    assert "Q_desc" not in plain
    with pytest.raises(ValueError, match="only the pre-pass of scope 'marginal' pools"):
        tl_backend.prepass_kernel(spec_of(d=d, scope="all"), cfg, "k")


def test_pooling_tiles_and_chunks():
    """K's pooling tile is the marginal pre-pass's default tile (so it can pool K), Q's the same unless a query
    block is shorter; chunks hold whole blocks (of both kinds when the pre-pass pools Q too); the pre-pass
    pools only where its config's tile is K's pooling tile."""
    assert tl_backend.pool_tiles(128, 128, 64) == (64, 64)
    assert tl_backend.pool_tiles(128, 64, 128) == (64, 128)
    assert tl_backend.pool_tiles(64, 256, 256) == (128, 128)
    assert tl_backend._key_align(128, 64, 64, 64) == 2 and tl_backend._key_align(64, 128, 64, 128) == 1
    assert tl_backend._key_align(256, 256, 128, 128) == 2
    cpu = torch.device("cpu")
    for n_tiles, bh, align in ((512, 12, 2), (7, 1, 2), (1, 3, 4), (1183, 40, 1)):
        n, per = tl_backend.pool_chunks(n_tiles, bh, cpu, align)
        assert per % align == 0 and (n - 1) * per < n_tiles <= n * per, (n_tiles, bh, align, n, per)
    spec = spec_of(d=128, scope="marginal")
    cfg = tl_backend.default_config(spec)
    assert tl_backend._pooling_prepasses(spec, cfg) == ("qk", "k")
    assert tl_backend._pooling_prepasses(spec_of(d=128, block=(64, 128)), tl_backend.default_config(
        spec_of(d=128, block=(64, 128)))) == ("k",)
    assert tl_backend._pooling_prepasses(spec, {**cfg, "pre_tile": 32}) == ()
    assert tl_backend._pooling_prepasses(spec_of(d=128, scope="all"), cfg) == ()
    assert tl_backend._pooling_prepasses(spec_of(d=128, fmap=None), cfg) == ()


@needs_compiler
def test_prepass_async_stores_compile_for_sm90a():
    """pre_async: two H tiles, each tile's TMA store left in flight; a tile waits only for the store two tiles
    back (wait_group.read 1), and the CTA for all of them before it exits."""
    spec = spec_of(d=128, scope="marginal")
    src = tl_backend.prepass_kernel(spec, {**tl_backend.default_config(spec), "pre_async": True}).get_kernel_source()
    _assert_hopper_source(src, "pre-pass")
    assert src.count("tl::tma_store(") == 2 and "tma_store_wait<1, true>" in src, "H tiles not double-buffered"
    assert src.count("tma_store_wait<0, true>") == 1, "only the final wait may drain every store"
    for branch in src.split("tma_store_wait<1, true>")[1].split("} else {")[:2]:   # the consumers' barrier
        assert branch.index("__sync_thread_partial") < branch.index("stmatrix"), "H tile written before the barrier"


@needs_compiler
@pytest.mark.parametrize("d", tl_backend.HEAD_DIMS)
def test_prepass_overlap_compiles_for_sm90a(d):
    """pre_overlap: the pre-pass tile's column-sum GEMMs (K's and Q's pooling, z_t) are issued without a wait and
    the φ(K_t)ᵀV_t GEMM's one wait covers them: one wgmma wait per tile instead of one per GEMM; the pooling
    GEMMs are issued before φ(K_t)'s exp2s, z's after them. The same wgmma instructions as without it (so the
    same pooled bits as sla_pool's). K's and Q's TMA tiles are released only after that wait where the pooling
    GEMMs read them until then; without pooling K's tile is released once φ(K_t) is formed."""
    spec = spec_of(d=d, scope="marginal")
    cfg = tl_backend.default_config(spec)
    ones = r"wgmma_ss<[^>]*, 64, 8, 16,[^\n]*"
    strip = lambda calls: sorted(re.sub(r"desc_[ab](_\d+)?|ki(_\d+)?|acc_\w+", "", c) for c in calls)  # names only
    for pool, n_ones in (("", 1), ("k", 2), ("qk", 3)):
        plain = tl_backend.prepass_kernel(spec, {**cfg, "pre_overlap": False}, pool).get_kernel_source()
        src = tl_backend.prepass_kernel(spec, {**cfg, "pre_overlap": True}, pool).get_kernel_source()
        _assert_hopper_source(src, f"pre-pass overlap pool={pool!r}")
        assert len(re.findall(ones, src)) == n_ones and strip(re.findall(ones, src)) == strip(re.findall(ones, plain))
        assert plain.count("tl::warpgroup_wait<0>();") == n_ones + 1
        assert src.count("tl::warpgroup_wait<0>();") == 1, f"pool={pool!r}: more than one wgmma wait per tile"
        wait, first_exp = src.index("tl::warpgroup_wait<0>();"), src.index("exp2f(")
        issues = [m.start() for m in re.finditer(ones, src)]
        assert sum(i < first_exp for i in issues) == n_ones - 1, f"pool={pool!r}: pooling GEMMs not ahead of φ"
        assert first_exp < issues[-1] < wait, f"pool={pool!r}: z's GEMM not between φ and the wait"
        consumer = src[src.index("} else {", src.index("tl::tma_load(")):]
        releases = [m.start() for m in re.finditer(r"\]\.arrive\(\);", consumer)]
        assert len(releases) == (3 if pool == "qk" else 2)
        late = sum(r > consumer.index("tl::warpgroup_wait<0>();") for r in releases)
        # K's and Q's tiles wait for the pooling GEMMs reading them; without pooling K's goes right after φ(K_t)
        # is formed (z's GEMM reads P_s), and V's after the wait of φ(K_t)ᵀV_t either way.
        assert late == (len(releases) if pool else 1), f"pool={pool!r}: {late} of {len(releases)} tiles released late"
    with pytest.raises(ValueError, match="pre_overlap=True needs warp_specialized=True"):
        tl_backend._resolve_config(spec, dict(pre_overlap=True, warp_specialized=False, num_stages=1, pre_stages=1))


@needs_compiler
def test_compile_for_call_builds_the_variant_a_call_launches():
    """The autotuner's compile-only step: scope 'all' without saving folds W into H (the kernel has no W),
    with saving the kernel applies W; both come with the pre-pass; compiled once (memoised)."""
    spec = spec_of(d=64, fmap="elu", scope="all")
    cfg = tl_backend.default_config(spec)
    folded = tl_backend.compile_for_call(spec, None, save=False, has_w=True, has_bias=True)
    assert folded[0] is tl_backend.forward_kernel(spec, cfg, save=False, has_w=False, has_bias=True)
    assert folded[1] is tl_backend.prepass_kernel(spec, cfg)
    saving = tl_backend.compile_for_call(spec, None, save=True, has_w=True, has_bias=False)
    assert saving[0] is tl_backend.forward_kernel(spec, cfg, save=True, has_w=True, has_bias=False)


# ----------------------------------------------------------------------------------------------------
# GPU: against the reference (helpers shared with tools/check_tilelang.py)
# ----------------------------------------------------------------------------------------------------

def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def poison_allocator(nbytes: int, device) -> None:
    """Fill the caching allocator's free blocks with NaN, so that an output a kernel fails to write shows."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    x.fill_(float("nan"))
    del x


def make_mask(B, H, tm, tn, n_crit, negl, device, gen):
    """A random class mask with n_crit critical blocks per row (an int, 'all' = every block, 'topk' = 5 %)
    and floor(negl · T_n) negligible ones; 'mixed' gives rows 0, 1 and 2 critical blocks in turn."""
    scores = torch.rand(B, H, tm, tn, device=device, generator=gen)
    if n_crit == "mixed":
        one, two = reference.classify(scores, 1, 0), reference.classify(scores, min(2, tn), 0)
        row = (torch.arange(tm, device=device) % 3)[:, None]
        return torch.where(row == 1, one, torch.where(row == 2, two, torch.zeros_like(one)))
    c = tn if n_crit == "all" else reference.block_counts(tn, 0.05, 0.0)[0] if n_crit == "topk" else min(n_crit, tn)
    return reference.classify(scores, c, min(int(math.floor(negl * tn)), tn - c))


def make_qkv(B, H, lq, lk, d, dtype, layout, device, gen):
    """q, k, v as (B, H, L, D) views: contiguous 'bhld', 'blhd' transposed, or slices of a fused 'qkv'."""
    if layout == "bhld":
        return [torch.randn(B, H, n, d, device=device, dtype=dtype, generator=gen) for n in (lq, lk, lk)]
    if layout == "blhd":
        return [torch.randn(B, n, H, d, device=device, dtype=dtype, generator=gen).transpose(1, 2)
                for n in (lq, lk, lk)]
    qkv = torch.randn(B, lq, 3, H, d, device=device, dtype=dtype, generator=gen)
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


def case_inputs(*, B, H, L, lk, d, dtype, layout, fmap, scope, negl, n_crit, block, proj, gen):
    """q, k, v (make_qkv), the 9 BlockMap tensors of a make_mask mask, Proj's w, b (None without a linear
    branch or with proj=False) and the backends' keyword arguments, on the GPU."""
    dev = torch.device("cuda")
    bq, bk = block
    q, k, v = make_qkv(B, H, L, lk, d, DT[dtype], layout, dev, gen)
    mask = make_mask(B, H, reference.num_blocks(L, bq), reference.num_blocks(lk, bk), n_crit, negl, dev, gen)
    maps = list(BlockMap.from_mask(mask, block_q=bq, block_k=bk).tensors())
    w = b = None
    if fmap != "none" and proj:
        w = torch.randn(d, d, device=dev, generator=gen) / math.sqrt(d)
        b = torch.randn(d, device=dev, generator=gen) * 0.1
    cfg = dict(block_q=bq, block_k=bk, scale=d ** -0.5, feature_map=fmap, scope=scope, eps=reference.EPS)
    return q, k, v, maps, w, b, cfg


def run_case(*, L, H=2, B=1, d=128, dtype="bf16", fmap="softmax", scope="marginal", negl=0.0, n_crit="topk",
             block=(128, 64), layout="bhld", proj=True, save=True, seed=0, Lk=None, config=None,
             q_scale=1.0) -> dict:
    """One TileLang forward vs the reference (fp32, same inputs); returns {output: rel. err}. ``q_scale``
    multiplies q after the block map is formed (wide score ranges: a row's running max moves far between steps).

    Raises AssertionError when o's layout/dtype is wrong or the non-finite pattern (NaN anywhere, -inf LSE
    rows) differs from the reference's."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    q, k, v, maps, w, b, cfg = case_inputs(B=B, H=H, L=L, lk=Lk or L, d=d, dtype=dtype, layout=layout, fmap=fmap,
                                           scope=scope, negl=negl, n_crit=n_crit, block=block, proj=proj, gen=gen)
    if q_scale != 1.0:
        q = q * q_scale
    linear = fmap != "none"
    poison_allocator(8 * q.numel() * 4, dev)
    o, lse, o_lin, den = tl_backend.forward(q, k, v, maps, w, b, save, config=config, **cfg)
    torch.cuda.synchronize()
    ro, rlse, ro_lin, rden = torch_backend.forward(q.float(), k.float(), v.float(), maps, w, b, True, **cfg)
    assert o.dtype == q.dtype and o.stride() == torch.empty_like(q).stride(), (o.dtype, o.stride(), q.stride())
    fin = torch.isfinite(rlse)
    assert torch.equal(fin, torch.isfinite(lse)), "rows with -inf LSE differ from the reference"
    assert not torch.isnan(o).any(), f"{int(torch.isnan(o).sum())} NaN in o"
    errs = {"o": rel_err(o, ro)}
    if fin.any():
        errs["lse"] = rel_err(lse[fin], rlse[fin])
    if linear and save:
        assert o_lin.shape == q.shape and den.shape == q.shape[:-1]
        errs["o_lin"] = rel_err(o_lin, ro_lin) if ro_lin.norm() > 0 else float(o_lin.float().norm())
        errs["den"] = rel_err(den, rden)
    else:
        assert o_lin.numel() == 0 and den.numel() == 0
    return errs


GPU_CASES = (
    [dict(L=L, d=d, scope=sc, negl=ng, n_crit=c)
     for L, c in ((77, 1), (77, 2), (77, "all"), (4096, 1), (4096, 2), (4096, "all"), (32760, 1), (32760, 2),
                  (32760, "topk"))
     for d in (64, 128) for sc in ("marginal", "all") for ng in (0.0, 0.1)]
    + [dict(L=32760, d=128, scope="marginal", negl=0.1, n_crit="all", H=1),
       dict(L=75600, H=1, scope="marginal", negl=0.1, n_crit="topk"),
       dict(L=75600, H=1, fmap="none", n_crit="topk"),
       dict(L=4096, fmap="none", n_crit="mixed"), dict(L=4096, scope="marginal", n_crit="mixed"),
       dict(L=4096, fmap="elu", scope="marginal", negl=0.1, n_crit=2), dict(L=4096, fmap="relu", scope="all"),
       dict(L=4096, fmap="elu", scope="all", proj=False, save=False), dict(L=4096, scope="all", save=False),
       dict(L=4096, scope="marginal", save=False), dict(L=4096, dtype="fp16", negl=0.1),
       dict(L=4096, layout="blhd"), dict(L=4096, layout="qkv", scope="all", save=False),
       dict(L=1000, Lk=3001, negl=0.1, n_crit=2), dict(L=4096, block=(64, 64)), dict(L=4096, block=(128, 128)),
       dict(L=4096, d=64, block=(64, 32), fmap="elu"), dict(L=4096, B=2, H=3, scope="all"),
       dict(L=4096, config=dict(num_stages=3)), dict(L=4096, config=dict(warp_specialized=False, num_stages=1, pre_stages=1)),
       dict(L=4096, fmap="none", config=dict(tile_m=64, num_warps=4)),
       dict(L=4096, block=(128, 128), config=dict(tile_n=64, pre_tile=64)),
       # pre-pass variants (z_t on the tensor cores, session 8): one consumer warpgroup, 32-key tiles
       dict(L=4096, d=64, negl=0.1, n_crit=2, config=dict(pre_warps=4)),
       dict(L=1000, Lk=3001, negl=0.1, n_crit=2, config=dict(pre_tile=32)),
       # two resident CTAs per SM for 64-row tiles (registers capped at 128 per thread)
       dict(L=4096, block=(64, 64), config=dict(ctas_per_sm=2)),
       dict(L=32760, block=(64, 64), scope="marginal", negl=0.1, n_crit="topk", config=dict(ctas_per_sm=2)),
       # many CTAs per SM over the grid (1024 CTAs): the inference forward and the training one without Proj
       dict(L=32760, block=(64, 64), save=False, config=dict(ctas_per_sm=2)),
       dict(L=32760, block=(64, 64), proj=False, config=dict(ctas_per_sm=2))]
    # 64-row tiles with two resident CTAs per SM, the candidate default for them (the training forward with Proj
    # runs one regardless): the inference forward and the training one without Proj over lengths, head dims,
    # scopes; sparse-only; fp16, blhd, elu
    + [dict(L=L, d=d, block=(64, 64), scope=sc, negl=0.1, n_crit=c, **variant, config=dict(ctas_per_sm=2))
       for L, c in ((77, "all"), (4096, 2), (32760, "topk")) for d in (64, 128) for sc in ("marginal", "all")
       for variant in (dict(save=False), dict(proj=False))]
    + [dict(L=L, block=(64, 64), fmap="none", n_crit=c, config=dict(ctas_per_sm=2))
       for L, c in ((77, 1), (4096, "mixed"), (32760, "topk"))]
    + [dict(L=4096, block=(64, 64), dtype="fp16", save=False, config=dict(ctas_per_sm=2)),
       dict(L=4096, block=(64, 64), layout="blhd", proj=False, config=dict(ctas_per_sm=2)),
       dict(L=4096, block=(64, 64), fmap="elu", scope="marginal", proj=False, config=dict(ctas_per_sm=2))]
    # H_i loaded before the key loop; O (and O^l) written by TMA stores (partial last tiles: L = 77, 1000)
    + [dict(L=L, d=d, scope=sc, negl=0.1, n_crit=c, config=dict(prefetch_h=True))
       for L, c in ((77, "all"), (4096, 2), (32760, "topk")) for d in (64, 128) for sc in ("marginal", "all")]
    + [dict(L=L, d=d, scope=sc, negl=0.1, n_crit=c, config=dict(tma_store=True))
       for L, c in ((77, "all"), (32760, "topk")) for d in (64, 128) for sc in ("marginal", "all")]
    + [dict(L=1000, Lk=3001, n_crit=2, fmap="none", config=dict(tma_store=True)),
       dict(L=4096, layout="blhd", save=False, config=dict(tma_store=True, prefetch_h=True)),
       dict(L=4096, block=(64, 64), proj=False, config=dict(tma_store=True, ctas_per_sm=2))]
    # two selected key blocks per step (tile_n = 2·block_k): odd counts mask the last step's second half
    + [dict(L=L, d=d, scope="marginal", negl=0.1, n_crit=c, config=dict(tile_n=128))
       for L, c in ((77, 1), (77, "all"), (4096, 1), (4096, 2), (4096, "mixed"), (32760, "topk")) for d in (64, 128)]
    + [dict(L=4096, fmap="none", n_crit="mixed", config=dict(tile_n=128)),
       dict(L=4096, block=(64, 64), n_crit=3, config=dict(tile_n=128, tile_m=64, num_warps=4, ctas_per_sm=1)),
       dict(L=1000, Lk=3001, n_crit=3, config=dict(tile_n=128))]
    # overlap: S_{t+1} = QK_{t+1}ᵀ in flight during step t's softmax (step 0 peeled and masked, the LUT walked
    # last-first so that only step 0 can hold the partial key block; the last step's S unused):
    # scopes, head dims, 1 / 2 / all / top-k / mixed (0, 1, 2) counts, odd lengths, save and Proj off, 64x64
    # blocks (two CTAs per SM, and the one-CTA training forward with Proj), two key blocks per step (odd counts)
    + [dict(L=L, d=d, scope=sc, negl=0.1, n_crit=c, config=dict(overlap=True))
       for L, c in ((77, "all"), (77, 1), (4096, 2), (32760, "topk")) for d in (64, 128) for sc in ("marginal", "all")]
    + [dict(L=L, d=d, fmap="none", n_crit=c, config=dict(overlap=True))
       for L, c in ((77, 1), (4096, "mixed"), (32760, "topk")) for d in (64, 128)]
    + [dict(L=1000, Lk=3001, negl=0.1, n_crit=2, config=dict(overlap=True)),
       dict(L=1000, Lk=3001, fmap="none", n_crit=1, config=dict(overlap=True)),
       dict(L=4096, scope="marginal", n_crit="mixed", config=dict(overlap=True)),
       dict(L=4096, scope="marginal", save=False, config=dict(overlap=True)),
       dict(L=4096, scope="all", save=False, proj=False, config=dict(overlap=True)),
       dict(L=4096, dtype="fp16", negl=0.1, config=dict(overlap=True)),
       dict(L=4096, config=dict(overlap=True, num_stages=3)),
       # 64x64 with the linear branch and one CTA per SM; sparse-only and the default: two
       dict(L=4096, block=(64, 64), config=dict(overlap=True, ctas_per_sm=1)),
       dict(L=77, block=(64, 64), n_crit="all", save=False, config=dict(overlap=True, ctas_per_sm=1)),
       dict(L=32760, block=(64, 64), scope="marginal", negl=0.1, n_crit="topk", config=dict(overlap=True, ctas_per_sm=1)),
       dict(L=4096, block=(64, 64), fmap="none", n_crit="mixed", config=dict(overlap=True)),
       dict(L=32760, block=(64, 64), fmap="none", n_crit="topk", config=dict(overlap=True)),
       dict(L=4096, block=(128, 128), config=dict(overlap=True)),
       dict(L=4096, n_crit=3, config=dict(overlap=True, tile_n=128)),
       dict(L=77, n_crit=1, config=dict(overlap=True, tile_n=128)),
       dict(L=1000, Lk=3001, fmap="none", n_crit="mixed", config=dict(overlap=True, tile_n=128)),
       dict(L=32760, d=64, n_crit="topk", config=dict(overlap=True, tile_n=128))]
    # the pre-pass with asynchronous H stores feeding the forward (scope 'marginal')
    + [dict(L=L, d=d, scope="marginal", negl=0.1, n_crit=c, config=dict(pre_async=True))
       for L, c in ((77, "all"), (4096, "mixed"), (32760, "topk")) for d in (64, 128)]
    # the pre-pass's column-sum GEMMs in flight under its φ (pre_overlap) feeding the forward
    + [dict(L=L, d=d, scope="marginal", negl=0.1, n_crit=c, config=dict(pre_overlap=True))
       for L, c in ((77, "all"), (4096, "mixed"), (32760, "topk")) for d in (64, 128)]
    # pingpong: the two consumer warpgroups take turns at the tensor cores, P·V one step behind S (the last
    # step's V in a tile of its own): scopes, head dims, 1 / 2 / all / top-k / mixed (0, 1, 2) counts, odd
    # lengths, sparse-only, fp16, deeper pipeline, two steps per key block (128x128 blocks, 64-key steps)
    + [dict(L=L, d=d, scope=sc, negl=0.1, n_crit=c, config=PINGPONG)
       for L, c in ((77, "all"), (77, 1), (4096, 2), (32760, "topk")) for d in (64, 128) for sc in ("marginal",)]
    + [dict(L=L, fmap="none", n_crit=c, config=PINGPONG) for L, c in ((77, 1), (4096, "mixed"), (32760, "topk"))]
    + [dict(L=1000, Lk=3001, negl=0.1, n_crit=2, config=PINGPONG),
       dict(L=4096, scope="marginal", n_crit="mixed", config=PINGPONG),
       dict(L=4096, scope="all", save=False, proj=False, config=PINGPONG),
       dict(L=4096, dtype="fp16", negl=0.1, config=PINGPONG),
       dict(L=4096, config={**PINGPONG, "num_stages": 3}),
       dict(L=4096, block=(128, 128), n_crit="mixed", config=PINGPONG)]
    # the persistent forward (config persistent): head dims, counts 0 / 1 / 2 / all / top-k, partial query
    # tiles and key blocks, sparse-only, several batches and heads (the tile index decoded per tile), Proj's
    # weight (2 stages) with and without saving, 2 stages, 256-row query blocks (two tiles per LUT row), fp16,
    # layouts (blhd, a fused qkv tensor), elu / relu, wide score ranges, one head at 32760 with every block
    + [dict(L=L, d=d, scope="marginal", negl=0.1, n_crit=c, config=PERSISTENT)
       for L, c in ((77, "all"), (77, 1), (4096, 2), (4096, "mixed"), (32760, "topk")) for d in (64, 128)]
    + [dict(L=L, d=d, fmap="none", n_crit=c, config=PERSISTENT)
       for L, c in ((77, 1), (4096, "mixed"), (32760, "topk")) for d in (64, 128)]
    + [dict(L=1000, Lk=3001, negl=0.1, n_crit=2, config=PERSISTENT),
       dict(L=1000, Lk=3001, fmap="none", n_crit="mixed", config=PERSISTENT),
       dict(L=4096, B=2, H=3, n_crit="mixed", config=PERSISTENT),
       dict(L=1000, B=3, H=5, fmap="none", n_crit=2, config=PERSISTENT),
       dict(L=4096, save=False, config=PERSISTENT), dict(L=4096, n_crit="mixed", config={**PERSISTENT, "num_stages": 2}),
       dict(L=4096, block=(256, 64), n_crit="mixed", config=PERSISTENT),
       dict(L=1000, Lk=3001, d=64, block=(256, 64), config=PERSISTENT),
       dict(L=4096, layout="qkv", save=False, proj=False, config=PERSISTENT),
       dict(L=4096, layout="blhd", config=PERSISTENT), dict(L=4096, dtype="fp16", negl=0.1, config=PERSISTENT),
       dict(L=4096, fmap="elu", negl=0.1, config=PERSISTENT),
       dict(L=4096, fmap="relu", n_crit="mixed", proj=False, config=PERSISTENT),
       dict(L=4096, n_crit="all", q_scale=30.0, config=PERSISTENT),
       dict(L=32760, scope="marginal", negl=0.1, n_crit="all", H=1, config=PERSISTENT)]
    # wide score ranges (q ×8, ×30 after the map is formed): rows' running maxima move far and often, P spans
    # many binades; each key loop (overlap, plain, pingpong, two key blocks per step, two CTAs per SM)
    + [dict(L=L, d=d, n_crit=c, q_scale=qs) for L, c in ((4096, "all"), (32760, "topk")) for d in (64, 128)
       for qs in (8.0, 30.0)]
    + [dict(L=4096, n_crit="all", q_scale=30.0, config=cfg)
       for cfg in (dict(overlap=False), PINGPONG, dict(tile_n=128))]
    + [dict(L=4096, block=(64, 64), n_crit="all", q_scale=30.0, save=False, config=dict(ctas_per_sm=2)),
       dict(L=4096, fmap="none", n_crit="mixed", q_scale=30.0)]
    # the split tail (tail_split; tail_plan): L 4300, H 4 launches 33 whole query tiles per
    # head, then the last (partial) one of each head in four parts; L 4099, H 2 and L 77 split every tile (two
    # and four parts: parts without blocks where n_crit < 4); the headline shape (3 tiles per head in 3 parts).
    # Scopes, negligible on/off, sparse-only, counts 1 / 2 / mixed / all / top-k, both loops, d 64, fp16, Proj
    # and saving off, odd key lengths, wide score ranges
    + [dict(L=4300, H=4, d=d, scope=sc, negl=ng, n_crit=c, config=dict(tail_split=4))
       for c in (1, 2, "topk") for d in (64, 128) for sc in ("marginal", "all") for ng in (0.0, 0.1)]
    + [dict(L=L, H=H, fmap="none", n_crit=c, config=dict(tail_split=4))
       for L, H, c in ((4300, 4, "mixed"), (4099, 2, 1), (77, 2, 1), (77, 2, "all"))]
    + [dict(L=4099, H=2, n_crit="mixed", config=dict(tail_split=4)),
       dict(L=4300, H=4, n_crit="all", config=dict(tail_split=4, overlap=False)),
       dict(L=4300, H=4, d=64, fmap="none", n_crit="mixed", config=dict(tail_split=4, overlap=False)),
       dict(L=4300, H=4, dtype="fp16", save=False, config=dict(tail_split=4)),
       dict(L=4300, H=4, proj=False, layout="blhd", config=dict(tail_split=4)),
       dict(L=1000, Lk=3001, H=4, negl=0.1, n_crit=2, config=dict(tail_split=3)),
       dict(L=4300, H=4, n_crit="all", q_scale=30.0, config=dict(tail_split=4)),
       dict(L=32760, H=12, n_crit="topk", config=dict(tail_split=4)),
       dict(L=32760, H=12, fmap="none", n_crit="topk", config=dict(tail_split=4))]
    # lazy_rescale: a row's reference max moves only where the step's scores pass it by more than 2^8 (the O
    # rescale skipped in warps where no row's moved): every key loop, plain and wide score ranges (×30: the max
    # moves far and often, so the vote takes the rescale), counts 0 / 1 / mixed / all / top-k, odd lengths, fp16,
    # scope all, sparse-only, 64x64 (two CTAs per SM), two key blocks per step, the split tail, persistent
    + [dict(L=L, d=d, n_crit=c, q_scale=qs, config=LAZY) for L, c in ((4096, "mixed"), (32760, "topk"))
       for d in (64, 128) for qs in (1.0, 30.0)]
    + [dict(L=77, n_crit=1, config=LAZY), dict(L=1000, Lk=3001, negl=0.1, n_crit=2, config=LAZY),
       dict(L=4096, fmap="none", n_crit="mixed", q_scale=30.0, config=LAZY),
       dict(L=4096, dtype="fp16", negl=0.1, q_scale=8.0, config=LAZY),
       dict(L=4096, scope="all", n_crit="all", q_scale=30.0, config=LAZY),
       dict(L=4096, block=(64, 64), n_crit="all", q_scale=30.0, save=False, config=LAZY),
       dict(L=4096, n_crit="all", q_scale=30.0, config={**LAZY, "overlap": False}),
       dict(L=4096, n_crit="all", q_scale=30.0, config={**LAZY, **PINGPONG}),
       dict(L=4096, n_crit="mixed", q_scale=30.0, config={**LAZY, "tile_n": 128}),
       dict(L=4096, n_crit="mixed", q_scale=30.0, config={**LAZY, **PERSISTENT}),
       dict(L=4300, H=4, n_crit="all", q_scale=30.0, config={**LAZY, "tail_split": 4}),
       dict(L=32760, H=12, fmap="none", n_crit="topk", config={**LAZY, "tail_split": 4})])


def test_gpu_cases_have_valid_configs():
    """Every GPU case's tunables pass check_config (on the CPU: a stale case — e.g. tile_n=128 on 64x64 blocks,
    whose default became two CTAs per SM that no longer fit — fails here, not as a GPU failure)."""
    for case in GPU_CASES:
        kernels_of(case)
    ids = [case_id(case) for case in GPU_CASES]   # (a repeated id is suffixed by pytest: a runner can't name it)
    assert len(set(ids)) == len(ids), sorted({i for i in ids if ids.count(i) > 1})
    for case in BWD_GPU_CASES:
        tl_backend._resolve_config(case_spec(case).replace(role="backward"),
                                   {"backward": "tilelang", **(case.get("config") or {})})


def case_spec(case: dict) -> KernelSpec:
    """The forward KernelSpec of a GPU case (run_case's / run_backward_case's defaults)."""
    fmap = case.get("fmap", "softmax")
    return spec_of(d=case.get("d", 128), dtype=case.get("dtype", "bf16"), fmap=None if fmap == "none" else fmap,
                   scope=case.get("scope", "marginal"), negl=case.get("negl", 0.0) > 0,
                   block=case.get("block", (128, 64)))


def kernels_of(case: dict):
    """(spec, tunables, epilogue flags) of the kernels ``run_case(**case)`` launches."""
    spec = case_spec(case)
    linear = spec.feature_map is not None
    proj, save = case.get("proj", True) and linear, case.get("save", True) and linear
    cfg = tl_backend._resolve_config(spec, case.get("config"))    # as the call resolves it (validated)
    return spec, cfg, dict(save=save, has_w=proj and not (spec.scope == "all" and not save), has_bias=proj)


def precompile(cases, workers: int = 8) -> list:
    """Compile every kernel ``cases`` need in parallel threads (nvcc runs as subprocesses); returns the
    failures as (description, exception) pairs."""
    jobs = {}
    for case in cases:
        spec, cfg, flags = kernels_of(case)
        jobs[(spec, tuple(sorted(cfg.items())), tuple(sorted(flags.items())))] = (spec, cfg, flags)

    def one(job):
        spec, cfg, flags = job
        tl_backend.forward_kernel(spec, cfg, **flags)
        if cfg["tail_split"] > 1 and not cfg["persistent"]:
            tl_backend.forward_kernel(spec, cfg, tail=True, **flags)
        if spec.feature_map is not None:
            tl_backend.prepass_kernel(spec, cfg)
    failures = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(one, job): job for job in jobs.values()}
        for fut in concurrent.futures.as_completed(futures):
            if fut.exception() is not None:
                spec, cfg, flags = futures[fut]
                failures.append((f"{spec.canonical} {flags} {cfg}", fut.exception()))
    return failures


@pytest.fixture(scope="module")
def gpu_kernels(request):
    """Compile the selected GPU cases' kernels up front, in parallel (a failure shows in its case)."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_gpu_forward_matches_reference"]
    precompile(selected, workers=min(16, os.cpu_count() or 1))


def case_id(c: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in c.items()).replace(" ", "")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_forward_matches_reference(case, gpu_kernels):
    errs = run_case(**case)
    assert max(errs.values()) < TOL, errs


TREE_CASES = [dict(L=32760, H=12, n_crit="topk"), dict(L=32760, H=12, fmap="none", n_crit="topk"),
              dict(L=4096, n_crit="mixed", q_scale=30.0), dict(L=77, n_crit=1, negl=0.1),
              dict(L=1000, Lk=3001, n_crit=2, scope="all", dtype="fp16"),
              dict(L=4096, n_crit="all", q_scale=30.0, config={"overlap": False}),
              dict(L=4096, n_crit="all", q_scale=30.0, config=PINGPONG),
              dict(L=4096, n_crit="mixed", q_scale=30.0, config={"tile_n": 128}),
              dict(L=4096, n_crit="mixed", q_scale=30.0, config=PERSISTENT),
              dict(L=4300, H=4, n_crit="all", q_scale=30.0, config={"tail_split": 4}),
              dict(L=4096, block=(64, 64), n_crit="all", q_scale=30.0),
              dict(L=4096, d=64, fmap="none", n_crit="mixed", q_scale=30.0)]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("case", TREE_CASES, ids=[case_id(c) for c in TREE_CASES])
def test_gpu_tree_max_gives_the_same_bits(case):
    """tree_max (the step's row max as a pairwise tree, backends/cuda_rewrites) changes no bit of any output: max is
    exact in any order. Every key loop, with and without lazy_rescale, wide score ranges, partial blocks, both
    scopes, sparse-only, fp16, d 64."""
    case = dict(case)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(7)
    config, q_scale, fmap = case.pop("config", {}), case.pop("q_scale", 1.0), case.get("fmap", "softmax")
    q, k, v, maps, w, b, cfg = case_inputs(
        B=1, H=case.get("H", 2), L=case["L"], lk=case.get("Lk", case["L"]), d=case.get("d", 128),
        dtype=case.get("dtype", "bf16"), layout="bhld", fmap=fmap, scope=case.get("scope", "marginal"),
        negl=case.get("negl", 0.0), n_crit=case["n_crit"], block=case.get("block", (128, 64)), proj=fmap != "none",
        gen=gen)
    q = q * q_scale
    for lazy in (True, False):
        runs = []
        for tree in (False, True):
            poison_allocator(8 * q.numel() * 4, dev)
            runs.append(tl_backend.forward(q, k, v, maps, w, b, True, config={**config, "lazy_rescale": lazy,
                                                                              "tree_max": tree}, **cfg))
        torch.cuda.synchronize()
        assert not torch.isnan(runs[1][0]).any(), f"NaN in o (lazy_rescale={lazy})"
        for name, chain, tree in zip(("o", "lse", "o_lin", "den"), *runs):
            assert torch.equal(chain, tree), f"{name} differs with tree_max (lazy_rescale={lazy})"


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("L,H,fmap", [(4300, 4, "softmax"), (77, 2, "none"), (32760, 12, "softmax")])
def test_gpu_split_tail_is_deterministic_and_matches_whole_tiles(L, H, fmap):
    """The split tail's result does not depend on which part finishes last (two calls: the same bits) and is
    the whole-tile forward's up to the merge's rounding (tail_split=1 launches whole tiles only)."""
    assert tl_backend.tail_plan(-(-L // 128), H, torch.cuda.get_device_properties(0).multi_processor_count, 4)[0]
    case = dict(L=L, H=H, fmap=fmap, n_crit="topk" if L > 77 else 2)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(3)
    q, k, v, maps, w, b, cfg = case_inputs(B=1, H=H, L=L, lk=L, d=128, dtype="bf16", layout="bhld", fmap=fmap,
                                           scope="marginal", negl=0.0, n_crit=case["n_crit"], block=(128, 64),
                                           proj=fmap != "none", gen=gen)
    runs = []
    for config in ({"tail_split": 4}, {"tail_split": 4}, {"tail_split": 1}):
        poison_allocator(8 * q.numel() * 4, dev)
        runs.append(tl_backend.forward(q, k, v, maps, w, b, True, config=config, **cfg))
    torch.cuda.synchronize()
    for a, b2 in zip(runs[0], runs[1]):
        assert torch.equal(a, b2), "two calls of the split tail differ"
    o, lse = runs[0][0], runs[0][1]
    assert rel_err(o, runs[2][0]) < 1e-2, rel_err(o, runs[2][0])
    fin = torch.isfinite(runs[2][1])
    assert torch.equal(fin, torch.isfinite(lse)) and rel_err(lse[fin], runs[2][1][fin]) < 1e-5


@pytest.mark.gpu
@needs_hopper
def test_gpu_repeated_calls_reuse_their_plans_on_new_inputs():
    """The per-call plans (checks, config, compiled kernels) and the Triton relaunches of one layout serve
    later calls on new inputs: three forwards of one layout (partial blocks) match the reference, then three
    public calls (block map + forward) match the reference given their own maps, the third relaunching the
    block map's Triton kernels directly (not the Triton pool: the pre-pass pooled); the three forwards given a
    map relaunch the kernels that form its marginal-block operands."""
    import slagen
    from slagen.backends.triton import launch
    for seed in (0, 1, 2):
        errs = run_case(L=4099, seed=seed)
        assert max(errs.values()) < TOL, (seed, errs)
    dev = torch.device("cuda")
    api = dict(topk=0.05, block_q=128, block_k=64)
    pool_keys = {name: len(fn) for name, fn in launch._BY_KERNEL.items() if name.endswith("pool_kernel")}
    for seed in (3, 4, 5):
        gen = torch.Generator(device=dev).manual_seed(seed)
        q, k, v = make_qkv(1, 2, 4099, 4099, 128, torch.bfloat16, "bhld", dev, gen)
        poison_allocator(8 * q.numel() * 4, dev)
        with torch.no_grad():
            o = slagen.attention(q, k, v, backend="tilelang", **api)
        bmap = slagen.block_map(q, k, backend="tilelang", **api)
        ref = slagen.attention(q.float(), k.float(), v.float(), block_map=bmap, backend="torch", **api)
        assert rel_err(o, ref) < TOL, seed
    relaunched = {name: len(fn) for name, fn in launch._BY_KERNEL.items()}
    for kernel in ("scores_kernel", "select_kernel", "z_part_kernel", "marginal_rows_kernel"):
        assert any(name.endswith(kernel) and n for name, n in relaunched.items()), relaunched
    assert all(n == pool_keys.get(name, 0) for name, n in relaunched.items() if name.endswith("pool_kernel")), \
        relaunched   # no Triton pooling launch was added by these calls (other tests of the process may have)


# ----------------------------------------------------------------------------------------------------
# GPU: the block map's pooling on TileLang, and the pre-pass that pools
# ----------------------------------------------------------------------------------------------------

# (Lq, Lk, d, dtype, blocks, layout): self- and cross-attention lengths, partial blocks, Q pooled by the pre-pass
# (tq = tk) or not (block_q < K's tile), two tiles per block (256x256), blhd strides, fp16
POOL_GPU_CASES = [(4099, 4099, 128, "bf16", (128, 64), "bhld"), (77, 77, 64, "bf16", (64, 64), "blhd"),
                  (4099, 2050, 128, "fp16", (128, 64), "bhld"), (1000, 1000, 128, "bf16", (64, 128), "bhld"),
                  (32760, 32760, 128, "bf16", (128, 64), "qkv"), (3000, 3000, 64, "bf16", (256, 256), "bhld"),
                  (77, 200, 64, "fp16", (128, 128), "blhd")]


def _pool_id(c):
    return "Lq{}_Lk{}_d{}_{}_b{}x{}_{}".format(c[0], c[1], c[2], c[3], *c[4], c[5])


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("pre_overlap", [False, True], ids=["pre_overlap0", "pre_overlap1"])
@pytest.mark.parametrize("case", POOL_GPU_CASES, ids=_pool_id)
def test_gpu_pooling_matches_float64_and_the_prepass_pools_the_same_bits(case, pre_overlap, monkeypatch):
    """sla_pool's block means of q and k and K's chunk sums against float64 (rel. err < 1e-5: fp32 sums of
    tensor-core column sums); the marginal pre-pass that pools (early_terms) gives the same bits for all three
    (the property behind attention(q, k, v) == attention(q, k, v, block_map=block_map(q, k))) and h_t, z_t as
    the plain pre-pass — with the pre-pass's column-sum GEMMs issued without a wait (pre_overlap, made the
    default here) and without."""
    lq, lk, d, dtype, (bq, bk), layout = case
    monkeypatch.setitem(tl_backend._DEFAULTS[d], "pre_overlap", pre_overlap)
    # fresh memos: the early plan's config and the tuned-or-default config it reads are resolved once per key,
    # which does not hold the patched default (the other variant of this case, run first, would have set it)
    monkeypatch.setattr(tl_backend, "_EARLY_PLANS", plans.Plans())
    monkeypatch.setattr(tl_backend, "_RESOLVED_CONFIGS", plans.Plans())
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(lq + lk)
    q, k, v = make_qkv(2, 3, lq, lk, d, DT[dtype], layout, dev, gen)
    if lq != lk:
        q = torch.randn(2, 3, lq, d, device=dev, dtype=DT[dtype], generator=gen)
    plan = tl_backend._pool_plan(q, k, bq, bk)
    assert plan.tilelang
    poison_allocator(8 * k.numel() * 4, dev)
    q_mean, k_mean, k_part = tl_backend.pool(plan, q, k)
    torch.cuda.synchronize()
    assert k_part.shape[2] == plan.k_chunks[0]
    errs = {"q_mean": rel_err(q_mean.double(), block_means(q, bq)),
            "k_mean": rel_err(k_mean.double(), block_means(k, bk)),
            "k_total": rel_err(k_part.double().sum(2), k.double().sum(2))}
    assert all(e < 1e-5 for e in errs.values()), errs
    spec = spec_of(d=d, dtype=dtype, block=(bq, bk))
    early = tl_backend.early_terms(q, k, v, block_q=bq, block_k=bk, feature_map="softmax", scope="marginal",
                                   has_negligible=False, density=0.05)
    assert early is not None and early.cfg == tl_backend._resolve_config(spec, None)
    assert early.cfg["pre_overlap"] == pre_overlap
    torch.cuda.synchronize()
    for name, got, want in zip(("q_mean", "k_mean", "k_part"), early.pooled.means, (q_mean, k_mean, k_part)):
        assert torch.equal(got, want), (name, rel_err(got, want))
    plain = tl_backend.linear_terms_of(spec, early.cfg, k, v)
    for name, got, want in zip(("h_t", "z_t"), early.terms, plain):
        assert rel_err(got, want) < 1e-6, name


@pytest.mark.gpu
@needs_hopper
def test_gpu_pooling_on_two_streams_is_ordered_before_its_readers():
    """pool() launches Q's sla_pool on a side stream: the current stream must wait for it before anything after
    the call reads q̄. Q's launch is held back on the side stream (a GPU sleep before it) and q̄ is copied on the
    current stream right after the call, with no synchronisation: without the join the copy would read the
    poisoned buffer before the kernel writes it. Both means against float64 too."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(5)
    q, k, _ = make_qkv(1, 4, 4099, 4099, 128, torch.bfloat16, "bhld", dev, gen)
    plan = tl_backend._pool_plan(q, k, 128, 64)
    assert plan.tilelang
    kernel_q = plan.kernel_q

    def late_kernel_q(*args):
        assert torch.cuda.current_stream(dev) != torch.cuda.default_stream(dev), "Q's pooling is not on a side stream"
        torch.cuda._sleep(50_000_000)       # ~25 ms at the H200's clock: far longer than the copy below
        kernel_q(*args)

    late = dataclasses.replace(plan, kernel_q=late_kernel_q)
    poison_allocator(8 * q.numel() * 4, dev)
    q_mean, k_mean, _ = tl_backend.pool(late, q, k)
    early_copy = q_mean.clone()
    torch.cuda.synchronize()
    assert torch.equal(early_copy, q_mean)
    assert rel_err(q_mean.double(), block_means(q, 128)) < 1e-5
    assert rel_err(k_mean.double(), block_means(k, 64)) < 1e-5


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("case", [POOL_GPU_CASES[i] for i in (0, 2, 3, 6)], ids=_pool_id)
def test_gpu_attention_equals_attention_given_its_block_map(case, monkeypatch):
    """An eager SLA call pools in its pre-pass (early_terms ran) and its selection writes the marginal-block
    operands: its map equals, bitwise, slagen.block_map(q, k) (pooled by sla_pool); its operands equal, bitwise,
    those a forward given that map forms (selection.marginal_operands), and those of the operand kernel and z
    GEMM (the 0/1 operand and so H_i bitwise, Z_i, summed in another order, to fp32 accuracy); its output
    equals, bitwise, the call given the map (with and without grad); output and gradients of the call against
    the fp32 reference given that map."""
    import slagen
    lq, lk, d, dtype, (bq, bk), layout = case
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(7)
    q, k, v = make_qkv(1, 2, lq, lk, d, DT[dtype], layout, dev, gen)
    if lq != lk:
        q = torch.randn(1, 2, lq, d, device=dev, dtype=DT[dtype], generator=gen)
    ran, maps = [], []
    early_terms, block_map = tl_backend.early_terms, tl_backend.block_map
    monkeypatch.setattr(tl_backend, "early_terms", lambda *a, **kw: ran.append(early_terms(*a, **kw)) or ran[-1])
    monkeypatch.setattr(tl_backend, "block_map", lambda *a, **kw: maps.append(block_map(*a, **kw)) or maps[-1])
    api = dict(topk=0.1, block_q=bq, block_k=bk, backend="tilelang")
    bmap = slagen.block_map(q, k, **api)
    poison_allocator(8 * q.numel() * 4, dev)
    with torch.no_grad():
        assert torch.equal(slagen.attention(q, k, v, **api), slagen.attention(q, k, v, block_map=bmap, **api))
    early = ran[0]
    assert early is not None and early.pooled.written
    for name in ("mask", "crit_lut", "crit_count", "negl_lut", "negl_count"):
        assert torch.equal(maps[1][LUT_FIELDS.index(name)], getattr(bmap, name)), name
    ops = early.pooled.marginal
    again = tl_backend._marginal_buffers(q, k, bq, bk, early.cfg, early.terms[1])
    selection.marginal_operands(q, k, list(bmap.tensors()), bq, bk, again)
    assert torch.equal(again.sel, ops.sel) and torch.equal(again.z_sums, ops.z_sums)
    spec = spec_of(d=d, dtype=dtype, block=(bq, bk))
    want = tl_backend.marginal_sums(spec, early.cfg, *early.terms, bmap.mask)
    got = tl_backend.marginal_sums(spec, early.cfg, *early.terms, bmap.mask, given=ops)
    assert torch.equal(got[0], want[0]) and rel_err(got[1], want[1]) < 1e-6, rel_err(got[1], want[1])
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = slagen.attention(*leaves, **api)      # (a saving forward is another kernel variant: compared with its own)
    assert torch.equal(out, slagen.attention(*leaves, block_map=bmap, **api))
    assert len(ran) == 2 and all(early is not None and early.pooled.written for early in ran)
    do = torch.randn(out.shape, device=dev, dtype=out.dtype, generator=gen)
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = slagen.attention(*ref_leaves, block_map=bmap, **{**api, "backend": "torch"})
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.float())
    errs = {"o": rel_err(out, ref), **{n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)}}
    assert errs["o"] < TOL and max(errs.values()) < BWD_TOL, errs


# The pre-pass's key-side terms alone (linear_terms_of) vs float64: per key tile h_t = φ(K_t)ᵀV_t (input dtype)
# and z_t = Σ_rows φ(K_t) (fp32) for scope 'marginal', the per-head totals H, Z for scope 'all'. φ is rounded
# to the input dtype in the kernel (the tensor-core operand); the reference rounds it the same way, so z_t
# (summed on the tensor cores since session 8) must match to fp32 accumulation error plus the rare φ that rounds the
# other way (CPU-emulated: up to 1.3e-5), h_t to its output rounding (bf16: 1.7e-3).
PREPASS_GPU_CASES = (
    [dict(L=L, d=d, scope=sc) for L in (77, 1000, 32760) for d in (64, 128) for sc in ("marginal", "all")]
    + [dict(L=4096, fmap=f, scope=sc) for f in ("elu", "relu") for sc in ("marginal", "all")]
    + [dict(L=4096, dtype="fp16", scope=sc) for sc in ("marginal", "all")]
    + [dict(L=4099, d=d, config=dict(pre_warps=4)) for d in (64, 128)]
    + [dict(L=4099, d=d, block=(128, 64), config=dict(pre_tile=32)) for d in (64, 128)]
    + [dict(L=4099, block=(128, 128)), dict(L=4099, d=64, block=(128, 128), scope="all"),
       dict(L=4096, B=2, H=3, layout="blhd"), dict(L=4096, layout="qkv", scope="all"),
       dict(L=4096, config=dict(pre_stages=1)), dict(L=4096, config=dict(pre_stages=3)),
       dict(L=4096, config=dict(warp_specialized=False, num_stages=1, pre_stages=1))]
    # two H tiles with asynchronous TMA stores (odd tile counts per chunk, partial last tiles, 32-key tiles)
    + [dict(L=L, d=d, config=dict(pre_async=True)) for L in (77, 4099, 32760) for d in (64, 128)]
    + [dict(L=4099, d=d, config=dict(pre_async=True, pre_tile=32)) for d in (64, 128)]
    # the column-sum GEMMs issued without a wait (pre_overlap), with and without the asynchronous H stores
    + [dict(L=L, d=d, config=dict(pre_overlap=True)) for L in (77, 4099, 32760) for d in (64, 128)]
    + [dict(L=4099, d=d, config=dict(pre_overlap=True, pre_async=False, pre_tile=32)) for d in (64, 128)]
    + [dict(L=4096, fmap=f, config=dict(pre_overlap=True)) for f in ("elu", "relu")])

PREPASS_TOL = {"h": 1e-2, "z": 1e-3}     # z: φ rounding ties (fast-math exp2 vs float64) ~1e-5


def prepass_case(*, L, B=1, H=2, d=128, dtype="bf16", fmap="softmax", scope="marginal", block=(128, 64),
                 layout="bhld", config=None, seed=0) -> dict:
    """The TileLang pre-pass vs float64 sums of the input-dtype-rounded φ(K); returns {term: rel. err}.
    Scope 'marginal' also checks the zero rows past the last tile (n padded to a multiple of 8)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    _, k, v = make_qkv(B, H, L, L, d, DT[dtype], layout, dev, gen)
    spec = spec_of(d=d, dtype=dtype, fmap=fmap, scope=scope, block=block)
    cfg = tl_backend._resolve_config(spec, config)      # as a call resolves it (defaults that need WS give way)
    poison_allocator(8 * k.numel() * 4, dev)
    got_h, got_z = tl_backend.linear_terms_of(spec, cfg, k, v)
    torch.cuda.synchronize()
    phi = reference.feature_map(k.double(), fmap).to(k.dtype).double()
    tile, n = cfg["pre_tile"], math.ceil(L / cfg["pre_tile"])
    if scope == "marginal":
        pad = n * tile - L
        phi_t = torch.nn.functional.pad(phi, (0, 0, 0, pad)).view(B, H, n, tile, d)
        v_t = torch.nn.functional.pad(v.double(), (0, 0, 0, pad)).view(B, H, n, tile, d)
        want_h, want_z = phi_t.transpose(-1, -2) @ v_t, phi_t.sum(-2)
        assert got_h.dtype == k.dtype and got_z.dtype == torch.float32
        assert got_h.shape[2] == got_z.shape[2] >= n
        assert not got_h[:, :, n:].any() and not got_z[:, :, n:].any(), "rows past the last tile are not zero"
        got_h, got_z = got_h[:, :, :n], got_z[:, :, :n]
    else:
        want_h, want_z = phi.transpose(-1, -2) @ v.double(), phi.sum(-2)
    assert torch.isfinite(got_h).all() and torch.isfinite(got_z).all(), "non-finite pre-pass terms"
    return {"h": rel_err(got_h.double(), want_h), "z": rel_err(got_z.double(), want_z)}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("case", PREPASS_GPU_CASES, ids=case_id)
def test_gpu_prepass_matches_float64(case):
    errs = prepass_case(**case)
    assert all(errs[t] < PREPASS_TOL[t] for t in errs), errs


# ----------------------------------------------------------------------------------------------------
# Backward (sparse branch on TileLang, the rest on the Triton state kernels)
# ----------------------------------------------------------------------------------------------------

BWD_TOL = 3e-2


def bwd_spec_of(**kw):
    return spec_of(**kw).replace(role="backward")


def test_lookup_tables_reach_the_kernels_as_int32_with_at_least_one_column():
    """Every sparse loop walks at least one (masked) step and reads LUT entry 0 even where the count is 0:
    an empty table (a map without any critical block) gets one zero column; others pass unchanged."""
    empty = tl_backend._lut(torch.empty((1, 2, 3, 0), dtype=torch.int8))
    assert empty.shape == (1, 2, 3, 1) and empty.dtype == torch.int32 and not empty.any()
    lut = torch.arange(24, dtype=torch.int64).view(1, 2, 3, 4).transpose(-1, -2)
    got = tl_backend._lut(lut)
    assert got.dtype == torch.int32 and got.is_contiguous() and torch.equal(got, lut.to(torch.int32))


def test_backward_kernels_get_the_fused_terms_or_stand_ins():
    """The linear-branch inputs of the dq / dk-dv kernels: with lin_fused the glue's terms, viewed per head
    (B, H_g, ...); without it the small stand-ins of the right rank and dtype; none for sparse-only."""
    q = torch.zeros(1, 3, 77, 64, dtype=torch.bfloat16)
    g, gz = torch.randn(1 * 3 * 8, 64, 64).to(torch.bfloat16), torch.randn(1 * 3 * 8, 64)
    got = tl_backend._lin_inputs(bwd_spec_of(d=64), q, (g, gz), [(1, 3, -1, 64, 64), (1, 3, -1, 64)], ("g", "gz"))
    assert [t.shape for t in got] == [(1, 3, 8, 64, 64), (1, 3, 8, 64)] and got[0].data_ptr() == g.data_ptr()
    stand = tl_backend._lin_inputs(bwd_spec_of(d=64), q, None, [], ("g", "gz", "den"))
    assert [(t.dim(), t.dtype) for t in stand] == [(5, torch.bfloat16), (4, torch.float32), (3, torch.float32)]
    assert stand[0].shape[-2:] == (64, 64)
    assert tl_backend._lin_inputs(bwd_spec_of(d=64, fmap=None), q, None, [], ("g", "gz")) == []


def test_lse_and_ds_reach_the_dkdv_kernel_per_query_block_with_a_padding_block():
    """(B, H, T_m + 1, block_q): the rows past Lq and the whole block T_m (which the masked step of a key block
    no query block chose reads) have LSE = +inf and D^s = 0; the rows below Lq are the inputs'."""
    lse, ds = torch.randn(2, 3, 77), torch.randn(2, 3, 77)
    plse, pds = tl_backend._per_query_block(lse, ds, 32)
    assert plse.shape == pds.shape == (2, 3, 4, 32)
    assert torch.equal(plse.flatten(-2)[..., :77], lse) and torch.equal(pds.flatten(-2)[..., :77], ds)
    assert torch.isinf(plse.flatten(-2)[..., 77:]).all() and (plse.flatten(-2)[..., 77:] > 0).all()
    assert not pds.flatten(-2)[..., 77:].any()


def test_backward_config_defaults_to_tilelang_where_its_tiles_fit_and_checks_them():
    for block in ((128, 64), (64, 64), (128, 128)):
        spec = bwd_spec_of(block=block)
        cfg = tl_backend.default_config(spec)
        assert cfg["backward"] == "tilelang", block
        tl_backend.check_config(cfg, spec)
    spec = bwd_spec_of(block=(128, 64))
    small = bwd_spec_of(block=(64, 32))
    assert tl_backend.default_config(small)["backward"] == "triton"     # dkdv needs 64 keys per CTA
    tl_backend.check_config(tl_backend.default_config(small), small)      # the Triton path ignores the tiles
    bad = [({"backward": "cuda"}, "backward"), ({"bogus": 1}, "unknown keys"),
           ({"dkdv": {"tile_n": 32}}, "tile_n"), ({"dq": {"tile_m": 64, "num_warps": 8}}, "num_warps=4"),
           ({"warp_specialized": False}, "num_stages=1"), ({"dq": {"num_stages": 9}}, "num_stages"),
           ({"dq": {"row_regs": True, "tile_n": 128}}, "row_regs=True with two key blocks"),
           ({"dq": {"row_regs": 1}}, "row_regs"), ({"dkdv": {"tile_n": "64"}}, "tile_n"),
           # two dK/dV CTAs per SM hung the GPU (session 35): the tunable is refused, by name
           ({"dkdv": {"ctas_per_sm": 2}}, "'ctas_per_sm' is no longer a tunable: two dK/dV CTAs per SM hung"),
           ({"dkdv": {"ctas_per_sm": 1}}, "'ctas_per_sm' is no longer a tunable")]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            tl_backend._resolve_config(spec, {"backward": "tilelang", **change})
    d64 = bwd_spec_of(d=64)     # row_regs: on at d 128 by default, off and refused at d 64 (a wrong dQ there)
    assert tl_backend.default_config(spec)["dq"]["row_regs"] and not tl_backend.default_config(d64)["dq"]["row_regs"]
    with pytest.raises(ValueError, match="row_regs=True is supported at head_dim 128 only"):
        tl_backend._resolve_config(d64, {"backward": "tilelang", "dq": {"row_regs": True}})
    with pytest.raises(ValueError, match="tile_n"):
        tl_backend._resolve_config(small, {"backward": "tilelang"})


def test_linear_part_takes_the_kept_sums_launch_only_where_the_forward_keeps_them():
    """The linear part's state kernels get _SUMS_PREP only where the forward keeps H_i, Z_i (scope 'marginal'
    with a linear branch), rows clamped to the blocks; elsewhere the Triton backward's defaults, and overrides win."""
    from slagen.backends.triton import bwd
    want = tl_backend._SUMS_PREP[128]
    for fmap, scope, block, kept in (("softmax", "marginal", (128, 64), True), ("elu", "marginal", (64, 32), True),
                                     ("softmax", "all", (128, 64), False), (None, "marginal", (128, 64), False)):
        spec = bwd_spec_of(fmap=fmap, scope=scope, block=block)
        assert backends.keeps_linear_sums("tilelang", True, fmap or "none", scope) == kept
        prep = tl_backend.linear_config(spec, {})["prep"]
        if kept:
            assert {**prep, "rows": want["rows"]} == {**bwd.default_config(spec)["prep"], **want}, (fmap, scope)
            assert prep["rows"] == min(want["rows"], *block)
        else:
            assert prep == bwd.default_config(spec)["prep"], (fmap, scope)
    spec = bwd_spec_of()
    assert tl_backend.linear_config(spec, {"prep": {"num_warps": 8}})["prep"]["num_warps"] == 8


def test_a_calls_tuned_or_default_config_is_resolved_once_per_generation(monkeypatch):
    """Host time: the backward resolved its config (defaults, the tuned lookup, every check) at each call (~0.25
    ms of an H200 host's ~1.4 ms per backward, session 33). The tuned-or-default config is now resolved once per
    spec, device, key length, density and generation of the tuned-config memo; a `slagen tune` in the process
    (select.forget) makes the next call resolve it again. A config the caller gives is resolved at every call."""
    from slagen.autotune import select
    looked_up = []
    monkeypatch.setattr(select, "config_for", lambda spec, *a, **kw: looked_up.append(spec))
    select.forget()         # a new generation: nothing an earlier test resolved is found
    q = torch.empty((1, 2, 300, 128), dtype=torch.bfloat16)
    for spec in (spec_of(), bwd_spec_of()):
        first = tl_backend._config_for(spec, q, q, 0.05, None)
        assert first == tl_backend._resolve_config(spec, None)
        assert tl_backend._config_for(spec, q, q, 0.05, None) is first
        assert tl_backend._config_for(spec, q, q, 0.1, None) is not first          # another density
        assert tl_backend._config_for(spec, q, q[:, :, :200], 0.05, None) is not first    # another key length
        select.forget()
        again = tl_backend._config_for(spec, q, q, 0.05, None)
        assert again is not first and again == first
        given = {"num_stages": 3} if spec.role == "forward" else {"dq": {"num_stages": 3}}
        assert tl_backend._config_for(spec, q, q, 0.05, given) is not tl_backend._config_for(spec, q, q, 0.05, given)
    assert len(looked_up) == 2 * 4


def test_the_linear_part_config_without_a_base_is_memoised_and_still_checked():
    """linear_config ran four times per backward (the default, its check, the Triton glue): without a base its
    result is kept per (spec, overrides). Bad overrides still raise at every call; a base is applied each time."""
    spec = bwd_spec_of()
    first = tl_backend.linear_config(spec, {"dq": {"num_warps": 4}})
    assert tl_backend.linear_config(spec, {"dq": {"num_warps": 4}}) is first
    assert tl_backend.linear_config(spec, {"dq": {"num_warps": 8}})["dq"]["num_warps"] == 8
    for bad in ({"dq": {"num_warps": 3.5}}, {"dq": {"num_warps": [4]}}, {"nope": {}}):
        for _ in range(2):
            with pytest.raises(ValueError):
                tl_backend.linear_config(spec, bad)
    from slagen.backends.triton import bwd
    base = bwd.default_config(spec)
    base["prep"]["num_warps"] = 2
    assert tl_backend.linear_config(spec, {}, base)["prep"]["num_warps"] == 2
    assert tl_backend.linear_config(spec, {}, base) is not tl_backend.linear_config(spec, {}, base)


@pytest.mark.parametrize("tuned", [False, True], ids=["untuned", "tuned"])
def test_tilelang_backward_hands_the_linear_part_its_config_through_the_triton_glue(monkeypatch, tuned):
    """The TileLang backward passes ``functools.partial(linear_config, spec, overrides)`` to the Triton glue's
    backward_linear_part, which calls it with the Triton backward's tuned config of the call (None where there is
    none): the linear part then runs with that config (or the defaults with _SUMS_PREP) and the overrides on top.
    (Session 27 dropped linear_config's third parameter as unused; every TileLang backward on a GPU then failed
    with a TypeError that no CPU test reached.)"""
    import functools
    from slagen.backends import triton as triton_backend
    from slagen.backends.triton import bwd
    spec = bwd_spec_of()
    base = bwd.default_config(spec)
    base["prep"]["num_warps"] = 2
    seen = {}
    monkeypatch.setattr(triton_backend, "_backward_config", lambda *a: base if tuned else None)
    monkeypatch.setattr(bwd, "linear_part", lambda *a, config, **kw: seen.setdefault("config", config))
    overrides = {"dq": {"num_warps": 4}}
    triton_backend.backward_linear_part(*[None] * 11, sparse_dq=None, sparse_dkdv=None,
                                        linear=functools.partial(tl_backend.linear_config, spec, overrides))
    want = tl_backend.linear_config(spec, overrides, base if tuned else None)
    assert seen["config"] == want and want["dq"]["num_warps"] == 4
    assert (want["prep"]["num_warps"] == 2) == tuned
    assert want["prep"]["rows"] == (base["prep"]["rows"] if tuned else tl_backend._SUMS_PREP[128]["rows"])


@pytest.mark.parametrize("empty_rows", [False, True])
def test_the_dq_epilogues_closed_form_row_sum_is_the_softmax_vjps(empty_rows):
    """The fused dq epilogue takes rowsum(φ(Q_i) ⊙ dφ(Q_i)) as D^l·eps/den (SLA.md §3/§5: O^l = φH/(φZ + eps) is
    unchanged by a rescaled φ but for eps). Checked in float64 by autograd through O = O^l Wᵀ + b, with rows whose
    marginal set is empty (H_i = 0, Z_i = 0: den = eps, D^l = 0)."""
    gen = torch.Generator().manual_seed(1)
    rows, d = 64, 32
    phi = torch.softmax(torch.randn(rows, d, generator=gen, dtype=torch.float64) * 2, dim=-1).requires_grad_()
    h = torch.randn(d, d, generator=gen, dtype=torch.float64)
    z = torch.rand(d, generator=gen, dtype=torch.float64) * 50
    if empty_rows:
        h, z = h * 0, z * 0
    w, b = torch.randn(d, d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    do = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    den = phi @ z + reference.EPS
    o_l = (phi @ h) / den[:, None]
    (dphi,) = torch.autograd.grad(((o_l @ w.t() + b) * do).sum(), phi)
    dl = ((do @ w) * o_l).sum(-1)
    want = (phi * dphi).sum(-1)
    got = dl * reference.EPS / den
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * float(dphi.abs().max())), (got - want).abs().max()
    assert bool((want != 0).any()) != empty_rows


def test_dq_prefetches_h_by_default_where_it_fuses_the_linear_term_and_refuses_it_elsewhere():
    """h_prefetch (dq loads H_i into registers before its key loop): on by default wherever lin_fused is and the
    registers allow (8 warps at head_dim 128); off for sparse-only and 4-warp dq; a caller's config that turns
    lin_fused off or takes 4 warps turns the default off; asked for where it cannot apply, a clear error."""
    def dq_of(spec, config=None):
        return tl_backend._resolve_config(spec, {"backward": "tilelang", **(config or {})})["dq"]
    assert dq_of(bwd_spec_of(d=128))["h_prefetch"] and dq_of(bwd_spec_of(d=64))["h_prefetch"]
    assert not dq_of(bwd_spec_of(d=128, fmap=None))["h_prefetch"]
    assert not dq_of(bwd_spec_of(d=128, block=(64, 64)))["h_prefetch"]          # 64-row dq: 4 warps
    assert dq_of(bwd_spec_of(d=64, block=(64, 64)))["h_prefetch"]               # d 64: 32 values per thread
    assert not dq_of(bwd_spec_of(d=128), {"dq": {"lin_fused": False}})["h_prefetch"]
    assert not dq_of(bwd_spec_of(d=128), {"dq": {"lin_init": True}})["h_prefetch"]
    with pytest.raises(ValueError, match=r"h_prefetch=True needs lin_fused=True"):
        dq_of(bwd_spec_of(d=128), {"dq": {"lin_fused": False, "h_prefetch": True}})
    with pytest.raises(ValueError, match=r"h_prefetch=True needs lin_fused=True"):
        dq_of(bwd_spec_of(d=128, fmap=None), {"dq": {"h_prefetch": True}})
    with pytest.raises(ValueError, match=r"h_prefetch=True needs num_warps=8 at head_dim 128"):
        dq_of(bwd_spec_of(d=128, block=(64, 64)), {"dq": {"h_prefetch": True}})


def test_query_state_kernel_is_the_default_where_it_applies_and_refused_elsewhere():
    """config 'query_state': 'tilelang' (the TileLang query-state kernel, where the forward kept H_i, Z_i) by default
    for a linear branch, scope 'marginal', bf16; 'triton' otherwise; asked for where it cannot serve, or given an
    unknown value, a clear error naming the key."""
    def qs_of(spec, config=None):
        return tl_backend._resolve_config(spec, {"backward": "tilelang", **(config or {})})["query_state"]
    assert qs_of(bwd_spec_of(d=128)) == "tilelang"
    assert qs_of(bwd_spec_of(d=64, block=(64, 64), fmap="elu")) == "tilelang"
    assert qs_of(bwd_spec_of(d=128), {"query_state": "triton"}) == "triton"
    for spec, why in ((bwd_spec_of(d=128, fmap=None), "a linear branch"),
                      (bwd_spec_of(d=128, scope="all"), "scope 'marginal'"),
                      (bwd_spec_of(d=128, dtype="fp16"), "bf16 inputs")):
        assert qs_of(spec) == "triton"
        with pytest.raises(ValueError, match=rf"config\['query_state'\]='tilelang' needs {why}"):
            qs_of(spec, {"query_state": "tilelang"})
        with pytest.raises(ValueError, match=f"the query-state kernel needs {why}"):
            tl_backend.backward_kernel(spec, tl_backend._resolve_config(spec, {"backward": "tilelang"}), "query_state")
    with pytest.raises(ValueError, match=r"config\['query_state'\]='cuda' is not supported; allowed: tilelang, triton"):
        qs_of(bwd_spec_of(d=128), {"query_state": "cuda"})


def test_query_state_launch_fills_one_wave_and_pipelines_where_two_stages_fit():
    """query_state_chunk: enough query blocks per CTA that one CTA per SM covers every head (at least one);
    query_state_stages: two stages of Q, dO, H_i where they fit beside Proj's tiles (d 128: not with Proj)."""
    assert tl_backend.query_state_chunk(256, 12, 132) == 24          # headline: 11 chunks per head, 132 CTAs
    assert -(-256 // 24) * 12 == 132
    assert tl_backend.query_state_chunk(1, 1, 132) == 1 and tl_backend.query_state_chunk(3, 2, 1) == 6
    assert tl_backend.query_state_stages(bwd_spec_of(d=128), False) == 2
    assert tl_backend.query_state_stages(bwd_spec_of(d=128), True) == 1
    assert tl_backend.query_state_stages(bwd_spec_of(d=64, block=(64, 64)), True) == 2


@needs_compiler
@pytest.mark.parametrize("spec", [bwd_spec_of(d=128), bwd_spec_of(d=64, block=(128, 64), fmap="relu")],
                         ids=lambda s: s.canonical)
def test_query_state_kernel_pipelines_its_loads_and_stores_dh_by_tma_where_the_tile_fits(spec):
    """The query-state kernel: Q, dO and H_i by TMA in a two-stage pipeline (a stage index in each load), O by
    per-thread loads from global memory inside the consumer loop (TileLang once dropped a global-to-fragment
    T.copy of it without a trace: the values must be read), dH_i stored by TMA through Q's tile where block_q =
    head_dim, else by the consumers' stores."""
    cfg = tl_backend._resolve_config(spec, {"backward": "tilelang"})
    src = tl_backend.backward_kernel(spec, cfg, "query_state").get_kernel_source()
    for desc in ("Q_desc", "DO_desc", "HI_desc"):
        assert re.search(rf"tma_load\({desc}, mbarrier\[\(t & 1\)", src) or \
            re.search(rf"tma_load\({desc}, mbarrier\[\(\(t & 1\) \+ \d\)\]", src), desc
    assert re.search(r"condval = O\[", src) and re.search(r"o_r\[i(_\d+)?\] = condval;", src)
    assert ("tma_store(G_desc" in src) == (spec.block_q == spec.head_dim)


@needs_compiler
@pytest.mark.parametrize("kernel,pair", [("dq", False), ("dkdv", False), ("dkdv", True)])
def test_fused_epilogues_form_the_softmax_feature_map_once(kernel, pair):
    """lin_fused (softmax φ): the epilogue after the key loop forms φ(Q_i) / φ(K_j) once, with one exp2 pass
    (one vectorised source loop: one run of exp2f calls, its vector's lanes), and reads it wherever φ is needed
    (dq's row sum of the vector-Jacobian product in closed form; dk/dv's φ(K_j)·G_j operand from the same values);
    until session 28 each use recomputed it (dq three exp2 passes, dk/dv four). The paired dK/dV splits its epilogue: each consumer,
    after its loop, forms φ(K_j) once (consumer 1 for φ(K_j)·G_j, consumer 0 for the vector-Jacobian product)."""
    spec = bwd_spec_of(d=128)
    cfg = tl_backend._resolve_config(spec, {"backward": "tilelang", "dkdv": {"pair": pair}})
    src = tl_backend.backward_kernel(spec, cfg, kernel).get_kernel_source()
    if pair:        # consumer 1's branch comes first in the source: its epilogue ends where consumer 0 waits for K, V
        end1 = src.rindex("empty1[(j & 1)].arrive();")
        tails = [src[end1:src.index("kv_full[0].wait(0)", end1)], src[src.rindex("empty0["):]]
    else:
        tails = [src[src.index(_consumer_loop(src)) + len(_consumer_loop(src)):]]
    for tail in tails:      # one pass: a single run of consecutive exp2f lines (its vector's lanes)
        assert len(re.findall(r"(?:[^\n]*exp2f\([^\n]*\n)+", tail)) == 1, tail.count("exp2f(")


@needs_compiler
def test_dq_prefetch_loads_h_before_the_key_loop_and_stores_it_to_shared_memory_after():
    """h_prefetch: the consumers' vector loads of H_i come before their key loop and nothing of H_i is read in it;
    after the loop the registers go to H_s (shared), which the dO·H_iᵀ wgmma reads; without it H_i is loaded after
    the loop."""
    spec = bwd_spec_of(d=128)
    srcs = {on: tl_backend.backward_kernel(spec, tl_backend._resolve_config(
        spec, {"backward": "tilelang", "dq": {"h_prefetch": on}}), "dq").get_kernel_source() for on in (True, False)}
    for on, src in srcs.items():
        loop = _consumer_loop(src)
        head, tail = src[:src.index(loop)], src[src.index(loop) + len(loop):]
        assert "HJ +" not in loop and "h_r" not in loop, on
        assert ("HJ +" in head) == on and ("HJ +" in tail) == (not on), on
        assert (re.search(r"\(\(bfloat16_t\*\)H_s\)[^;]*= \*\(uint4\*\)\(h_r", tail) is not None) == on, on
        assert re.search(r"initialize_wgmma_descriptor<[^>]*>\(\w+, \(&\(\(\(bfloat16_t\*\)H_s\)", tail), on


class _SignatureCheckingKernel:
    """Stands in for a compiled TileLang kernel on a machine without a GPU: each call is checked against the
    prim_func's parameters as TileLang's packed call checks it — the count, each tensor's rank and dtype and
    static extents, and one value per dynamic extent across all buffers — and recorded in ``calls``."""

    calls: list = []

    def __init__(self, func):
        self.func = func

    def __call__(self, *args):
        params, name = self.func.params, str(self.func.attrs["global_symbol"])
        assert len(args) == len(params), f"{name}: {len(args)} arguments for {[p.name for p in params]}"
        dims = {}
        for param, arg in zip(params, args):
            buf = self.func.buffer_map.get(param)
            if buf is None:
                assert isinstance(arg, (int, float)), f"{name}: {param.name} is a scalar, got {type(arg)}"
                continue
            assert isinstance(arg, torch.Tensor) and arg.dim() == len(buf.shape), (name, buf.name, buf.shape)
            assert str(arg.dtype).removeprefix("torch.") == str(buf.dtype), (name, buf.name, arg.dtype, buf.dtype)
            for n, extent in zip(arg.shape, buf.shape):
                if hasattr(extent, "value"):
                    assert n == extent.value, (name, buf.name, tuple(arg.shape), buf.shape)
                else:
                    assert dims.setdefault(extent.name, n) == n, \
                        f"{name}: {buf.name} gives {extent.name} = {n}, another buffer {dims[extent.name]}"
        self.calls.append(name)


def _fake_tilelang_kernels(monkeypatch) -> None:
    """Run the TileLang glue on the CPU: kernels replaced by _SignatureCheckingKernel (calls emptied), the CUDA
    device context, the input check's CUDA requirement and the SM count stubbed."""
    monkeypatch.setattr(tl_backend, "_compile", lambda key, make, *a, **k: _SignatureCheckingKernel(make()))
    monkeypatch.setattr(tl_backend, "_check_inputs", lambda *a: None)       # (it requires CUDA tensors)
    monkeypatch.setattr(tl_backend, "_sm_count", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_SignatureCheckingKernel, "calls", [])


@needs_compiler
@pytest.mark.parametrize("case", [
    dict(states=True), dict(save=False), dict(proj=True), dict(fmap="none"), dict(scope="all", fmap="elu"),
    dict(d=64, block=(64, 64), n_crit=2), dict(config={"tail_split": 4})], ids=str)
def test_tilelang_forward_glue_calls_its_kernels_as_their_signatures_say(monkeypatch, case):
    """The TileLang forward (block map given) end to end on the CPU with its kernels replaced by signature checks
    (see the backward's test): the pre-pass (with a linear branch) and the forward kernel are called with
    arguments that bind, and the outputs come back in the shapes the backward reads."""
    B, H, L = 1, 2, 300
    d, block, fmap = case.get("d", 128), case.get("block", (128, 64)), case.get("fmap", "softmax")
    _fake_tilelang_kernels(monkeypatch)
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(0)
    q, k, v = make_qkv(B, H, L, L, d, torch.bfloat16, "bhld", cpu, gen)
    tm, tn = reference.num_blocks(L, block[0]), reference.num_blocks(L, block[1])
    maps = list(BlockMap.from_mask(make_mask(B, H, tm, tn, case.get("n_crit", "mixed"), 0.0, cpu, gen),
                                   block_q=block[0], block_k=block[1]).tensors())
    w = b = None
    if case.get("proj") and fmap != "none":
        w, b = torch.randn(d, d, generator=gen) / math.sqrt(d), torch.randn(d, generator=gen) * 0.1
    cfg = dict(block_q=block[0], block_k=block[1], scale=d ** -0.5, feature_map=fmap, scope=case.get("scope", "marginal"),
               eps=reference.EPS)
    out = tl_backend.forward(q, k, v, maps, w, b, case.get("save", True), states=case.get("states", False),
                             config=case.get("config"), **cfg)
    linear = fmap != "none"
    assert [c for c in _SignatureCheckingKernel.calls if c != "sla_forward_tail"] == \
        (["sla_prepass"] if linear else []) + ["sla_forward"]
    assert out[0].shape == q.shape and out[0].dtype == q.dtype and out[1].shape == (B, H, L)
    if case.get("states") and linear:
        assert out[4].shape == (B, H, tm, d, d) and out[5].shape == (B, H, tm, d)


@needs_compiler
@pytest.mark.parametrize("case", [
    dict(keep_sums=True, proj=True), dict(keep_sums=False, proj=True), dict(keep_sums=True, proj=False, d=64),
    dict(fmap="none"), dict(block=(64, 64), n_crit=2),
    dict(keep_sums=True, proj=True, config={"dq": {"lin_fused": False}, "dkdv": {"lin_fused": False}}),
    dict(keep_sums=True, proj=False, config={"dq": {"h_prefetch": False, "tile_n": 128}}),
    dict(keep_sums=True, proj=True, config={"query_state": "triton"}), dict(keep_sums=True, negl=True, n_crit=1),
    dict(keep_sums=True, proj=True, d=64, block=(64, 64)), dict(keep_sums=True, proj=True, B=2, head_groups=True),
    dict(keep_sums=True, proj=True, config={"dkdv": {"pair": False}})],
    ids=str)
def test_tilelang_backward_glue_calls_its_kernels_as_their_signatures_say(monkeypatch, case):
    """The TileLang backward end to end on the CPU, its Triton linear part in the interpreter and its dq / dk-dv
    (and, with kept sums, query-state) kernels replaced by signature checks (the prim_funcs are built, not compiled): every argument list the glue
    hands the kernels must bind (a wrong count, rank, dtype or a dynamic extent bound two ways fails on a GPU
    only, as session 27's linear_config and this session's H_i view did), and the gradients come back whole.
    head_groups: a temporaries budget small enough that the backward runs one head at a time (with B = 2 each
    group's views of den, the counts and the kept sums are not contiguous)."""
    B, H, L = case.get("B", 1), 2, 300
    if case.get("head_groups"):
        from slagen.backends.triton import bwd
        monkeypatch.setenv(bwd.TEMP_BUDGET_ENV, "0.01")
    d, block, fmap = case.get("d", 128), case.get("block", (128, 64)), case.get("fmap", "softmax")
    _fake_tilelang_kernels(monkeypatch)
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(0)
    q, k, v, do = make_qkv(B, H, L, L, d, torch.bfloat16, "bhld", cpu, gen) + [torch.randn(B, H, L, d, generator=gen,
                                                                                        dtype=torch.bfloat16)]
    mask = make_mask(B, H, reference.num_blocks(L, block[0]), reference.num_blocks(L, block[1]),
                     case.get("n_crit", "mixed"), 0.3 if case.get("negl") else 0.0, cpu, gen)
    maps = list(BlockMap.from_mask(mask, block_q=block[0], block_k=block[1]).tensors())
    w = b = None
    if case.get("proj") and fmap != "none":
        w, b = torch.randn(d, d, generator=gen) / math.sqrt(d), torch.randn(d, generator=gen) * 0.1
    tm, linear = maps[0].shape[-2], fmap != "none"
    assert maps[5].shape[-1] > 0 if case.get("negl") else maps[5].shape[-1] == 0
    o, lse = torch.randn_like(q), torch.randn(B, H, L, generator=gen)
    sums = {}
    if case.get("keep_sums") and linear:       # the forward kept H_i, Z_i and saved no O^l, den
        o_lin, den = q.new_empty(0), lse.new_empty(0)
        sums["lin_sums"] = (torch.randn(B, H, tm, d, d, generator=gen).to(q.dtype), torch.rand(B, H, tm, d, generator=gen))
    else:
        o_lin, den = torch.randn_like(q), torch.rand(B, H, L, generator=gen) + 1
    cfg = dict(block_q=block[0], block_k=block[1], scale=d ** -0.5, feature_map=fmap, scope="marginal",
               eps=reference.EPS)
    grads = tl_backend.backward(do, q, k, v, o, lse, o_lin, den, maps, w, b,
                                config={"backward": "tilelang", **case.get("config", {})}, **cfg, **sums)
    # where the forward kept H_i, Z_i the query-state kernel replaces the Triton _lin_rows + _query_state by default
    tl_state = case.get("keep_sums") and linear and case.get("config", {}).get("query_state") != "triton"
    groups = H if case.get("head_groups") else 1
    dkdv = "sla_dkdv" if case.get("config", {}).get("dkdv", {}).get("pair") is False else "sla_dkdv_pair"
    assert _SignatureCheckingKernel.calls == (["sla_query_state"] * bool(tl_state) + ["sla_dq", dkdv]) * groups
    for g, x in zip(grads[:3], (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    assert (grads[3] is not None and grads[3].shape == (d, d)) == (w is not None)


@needs_compiler
@pytest.mark.parametrize("spec", [bwd_spec_of(d=128), bwd_spec_of(d=128, fmap=None, block=(64, 64))],
                         ids=lambda s: s.canonical)
def test_dq_with_rows_in_registers_compiles_pipelined_without_spills(spec):
    """row_regs: dq's S = QKᵀ and dP = dOVᵀ take Q and dO from registers (copied from shared memory once), so
    the loop's three GEMMs are register-operand wgmmas reading K / V alone; ptxas keeps them pipelined, no spills."""
    cfg = tl_backend._resolve_config(spec, {"backward": "tilelang", "dq": {"row_regs": True}})
    kernel = tl_backend.backward_kernel(spec, cfg, "dq")
    loop = _consumer_loop(kernel.get_kernel_source())
    assert loop.count("tl::wgmma_ss<") == 0 and loop.count("tl::wgmma_rs<") == 3
    assert re.search(r"wgmma_rs<[^\n]*q_r \+", loop) and re.search(r"wgmma_rs<[^\n]*do_r \+", loop)
    rep = ptxas.report(kernel)
    assert not rep.wgmma_serialized and rep.spill_bytes == 0, rep


@needs_compiler
@pytest.mark.parametrize("spec", [bwd_spec_of(d=128), bwd_spec_of(d=64, fmap=None), bwd_spec_of(d=128, block=(64, 64))],
                         ids=lambda s: s.canonical)
def test_backward_epilogue_variants_compile_for_sm90a(spec):
    """dq / dkdv with lin_init and tma_store: the gradients leave through the CTA's shared tiles by TMA stores
    alone (no per-thread global stores of DQ, DK, DV), still TMA loads and wgmma; the linear variants read
    the linear terms from the gradients themselves (per-thread loads), the others never read them."""
    both = {"lin_init": True, "tma_store": True}
    cfg = tl_backend._resolve_config(spec, {"backward": "tilelang", "dq": both, "dkdv": both})
    linear = spec.feature_map is not None
    for kernel, outs in (("dq", ("DQ",)), ("dkdv", ("DK", "DV"))):
        src = tl_backend.backward_kernel(spec, cfg, kernel).get_kernel_source()
        _assert_hopper_source(src, f"{kernel} {both}")
        for out in outs:
            assert f"tma_store({out}_desc" in src, f"{out} is not written by a TMA store"
            assert not re.search(rf"\b{out}\[[^;]*?\]\s*=[^=]", src), f"{out} is also written by per-thread stores"
            assert bool(re.search(rf"\b{out}\[", src)) == linear, f"{out}: the linear term is read iff linear"
    with pytest.raises(ValueError, match="lin_init"):
        tl_backend._resolve_config(spec, {"backward": "tilelang", "dq": {"lin_init": 1}})


PTXAS_C7515 = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma \
instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function 'k'
ptxas info    : Used 168 registers, used 4 barriers, 1024 bytes smem
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads"""


def test_ptxas_report_reads_registers_spills_and_the_wgmma_serialisation_advisory():
    """The parser on ptxas 13.0's own wording (the C7515 line of session 19's swapped-accumulator forward)."""
    rep = ptxas.parse(PTXAS_C7515)
    assert (rep.registers, rep.spill_bytes, rep.wgmma_serialized) == (168, 8, True)
    clean = ptxas.parse("ptxas info    : Used 240 registers, used 4 barriers, 1024 bytes smem\n"
                        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
    assert (clean.registers, clean.spill_bytes, clean.advisories, clean.wgmma_serialized) == (240, 0, (), False)
    with pytest.raises(ValueError, match="one kernel"):
        ptxas.parse("ptxas info    : 0 bytes gmem")


@needs_compiler
@pytest.mark.parametrize("what", ["forward", "forward sparse-only", "forward training", "forward tail", "prepass", "dq",
                                  "dkdv", "query_state", "query_state proj", "forward 64x64",
                                  "forward sparse-only 64x64", "forward training 64x64", "forward d64",
                                  "forward d64 64x64"])
def test_default_kernels_keep_their_wgmma_pipelined_and_spill_nothing(what):
    """ptxas serialises no wgmma of the default d128 128x64 kernels (and the split tail's, tail_split 4) and
    spills nothing (backends/ptxas.py: a serialised kernel computes the same bits, slower — session 19's swapped
    accumulators: +28 %; the paired dK/dV's epilogue spilled 72 bytes until session 37 split it). At 64x64 blocks
    the forward's 64-row tiles, two CTAs per SM, launch at 128 registers and run the overlapped loop in the
    consumer's 232 (the register handover). d 64 runs the overlapped loop by default too since session 33 (128x64
    and 64x64)."""
    block = (64, 64) if what.endswith("64x64") else (128, 64)
    d = 64 if " d64" in what else 128
    what = what.replace(" 64x64", "").replace(" d64", "")
    spec = spec_of(d=d, fmap=None if what == "forward sparse-only" else "softmax", block=block)
    if what in ("dq", "dkdv") or what.startswith("query_state"):
        spec = spec.replace(role="backward")
        cfg = tl_backend._resolve_config(spec, {"backward": "tilelang"})
        proj = what == "query_state proj"
        kernel = tl_backend.backward_kernel(spec, cfg, what.split()[0], has_w=proj, has_b=proj)
        if what.startswith("query_state"):     # Q, dO, H_i by TMA; its GEMMs (one more with Proj) on wgmma
            src = kernel.get_kernel_source()
            assert "tma_load" in src and "wgmma" in src
    else:
        cfg = tl_backend._resolve_config(spec, {"tail_split": 4} if what == "forward tail" else {})
        kernel = (tl_backend.prepass_kernel(spec, cfg) if what == "prepass" else
                  tl_backend.forward_kernel(spec, cfg, save=what == "forward training", tail=what == "forward tail"))
    rep = ptxas.report(kernel)
    assert not rep.wgmma_serialized, rep.advisories
    assert rep.spill_bytes == 0, rep
    if what == "dkdv":
        assert cfg["dkdv"]["pair"], cfg["dkdv"]
    if what.startswith("forward"):
        assert cfg["overlap"] and cfg["tma_store"], cfg
    if block == (64, 64):
        assert cfg["ctas_per_sm"] == 2 and rep.registers == 128, (cfg, rep)


@needs_compiler
@needs_nvdisasm
@pytest.mark.parametrize("fmap", ["softmax", None], ids=["softmax", "sparse-only"])
def test_dkdv_runs_one_cta_per_sm_with_its_loop_in_registers(fmap):
    """The one-consumer d128 128x64 dkdv (pair=False: the default for fp16 and block_k 128): __launch_bounds__(256,
    1), the producer's registers handed to the consumer (setmaxnreg 24 / 240), wgmma pipelined, no spill and no local
    memory in the key loop. (Two CTAs per SM at 24 / 232 hung the GPU at random: session 35.)"""
    spec = bwd_spec_of(d=128, fmap=fmap)
    cfg = tl_backend._resolve_config(spec, {"backward": "tilelang", "dkdv": {"pair": False}})
    kernel = tl_backend.backward_kernel(spec, cfg, "dkdv")
    src = kernel.get_kernel_source()
    assert "__launch_bounds__(256, 1)" in src and "warpgroup_reg_alloc<240>" in src and \
        "warpgroup_reg_dealloc<24>" in src
    rep = ptxas.report(kernel)
    assert not rep.wgmma_serialized and rep.spill_bytes == 0, rep
    mix = dict(sass.loop_mix(sass.disassemble(kernel)))
    assert mix.get("HGMMA", 0) >= 16 and not mix.get("STL") and not mix.get("LDL"), mix


_LOOP_SASS = """
        LDSM.16.M88.4 R120, [R8] ;
.L_x_1:
        @P1 BRA `(.L_x_2) ;
        LDSM.16.M88.4 R24, [R8] ;
.L_x_2:
        HGMMA.64x64x16.F32.BF16 R56, R24, gdesc[UR4], RZ, !UPT ;
        HGMMA.64x64x16.F32.BF16 R88, R120, gdesc[UR4], RZ, !UPT ;
        {inside}
        @!P0 BRA `(.L_x_1) ;
        FMUL.FTZ R25, R1, R2 ;
        STS [R25], R121 ;
"""


def test_sass_check_flags_a_loaded_operand_written_inside_its_loop():
    """backends/sass.py: an LDSM-loaded RS-wgmma operand written by another instruction inside the loop around
    that wgmma is flagged (session 20's d 64 dq: the dP accumulator on the step-0 copy of Q); writes after the
    loop, stores (no destination) and an operand loaded before the loop and never rewritten are not."""
    clobber = "HGMMA.64x64x16.F32.BF16 R24, R128, gdesc[UR4], RZ, !UPT ;"
    assert sass.clobbered_operands(_LOOP_SASS.format(inside=clobber)) == [(24, clobber)]
    assert sass.clobbered_operands(_LOOP_SASS.format(inside="IMAD.MOV.U32 R27, RZ, RZ, RZ ;")) == [
        (24, "IMAD.MOV.U32 R27, RZ, RZ, RZ ;")]
    assert sass.clobbered_operands(_LOOP_SASS.format(inside="LDS.128 R122, [R9] ;")) == [(120, "LDS.128 R122, [R9] ;")]
    assert sass.clobbered_operands(_LOOP_SASS.format(inside="STS [R24], R30 ;")) == []
    assert sass.clobbered_operands(_LOOP_SASS.format(inside="FADD R100, R1, R2 ;")) == []


_SCHEDULE_SASS = """
.L_x_0:
        IADD3 R1, R1, 0x1, RZ ;
        @P2 BRA `(.L_x_0) ;
        SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x40], R7 ;
.L_x_1:
        FMNMX.FTZ R9, R88, -INF , !PT ;
        FMNMX.FTZ R9, R90, R9, !PT ;
        SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R7+UR15], R8 ;
        SHFL.BFLY PT, R10, R9, 0x2, 0x1f ;
        @!P0 BRA `(.L_x_2) ;
.L_x_2:
        HGMMA.64x64x16.F32.BF16 R120, R152, gdesc[UR4], RZ, !UPT ;
        MUFU.EX2 R88, R88 ;
        MUFU.EX2 R89, R89 ;
        FADD.FTZ R3, R88, R89 ;
        F2FP.BF16.F32.PACK_AB R100, R89, R88 ;
        HGMMA.64x128x16.F32.BF16 R24, R100, gdesc[UR8].tnspB, R24, gsb0 ;
        WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        SYNCS.ARRIVE.TRANS64.A1T0 RZ, [R7+UR15+0x20], RZ ;
        @!P1 BRA `(.L_x_1) ;
        EXIT ;
"""


def test_sass_loop_schedule_names_the_main_loop_in_order():
    """backends/sass.py loop_schedule: the innermost loop holding the most HGMMAs (not the loop without one, not
    what precedes it), its waits, branches, wgmmas by shape, DEPBAR, EX2, FMNMX, SHFL, F2FP and releases in
    order, runs counted; other instructions left out; empty without a loop around a wgmma."""
    assert sass.loop_schedule(_SCHEDULE_SASS) == ("2×MAX WAIT SHFL BRA HGMMA64x64 2×EX2 F2FP HGMMA64x128 DEPBAR ARRIVE "
                                                  "BRA")
    assert sass.loop_schedule(_SCHEDULE_SASS.replace("HGMMA", "NOP ;//")) == ""


def test_sass_loop_mix_counts_the_main_loop_by_opcode():
    """backends/sass.py loop_mix: the same main loop's instructions by opcode, most frequent first (ties by
    name), predicated ones included, IMAD.MOV counted as MOV; the loop without a wgmma and what precedes the
    main loop left out; empty without a loop around a wgmma."""
    snippet = _SCHEDULE_SASS.replace("        FADD.FTZ R3, R88, R89 ;\n",
                                     "        FADD.FTZ R3, R88, R89 ;\n        IMAD.MOV.U32 R4, RZ, RZ, R3 ;\n"
                                     "        @P1 IMAD.MOV.U32 R5, RZ, RZ, R3 ;\n        IMAD.WIDE R6, R3, 0x4, R4 ;\n")
    assert sass.loop_mix(snippet) == [("BRA", 2), ("FMNMX", 2), ("HGMMA", 2), ("MOV", 2), ("MUFU", 2), ("SYNCS", 2),
                                      ("F2FP", 1), ("FADD", 1), ("IMAD", 1), ("SHFL", 1), ("WARPGROUP", 1)]
    assert sass.loop_mix(_SCHEDULE_SASS.replace("HGMMA", "NOP ;//")) == []


@needs_compiler
@needs_nvdisasm
@pytest.mark.parametrize("what", ["forward", "forward training", "forward sparse-only", "forward tail",
                                  "forward d64 overlap", "dq"])
def test_default_kernels_keep_their_loaded_register_operands_across_the_loop(what):
    """The step-0 register copies the key loops read in every step (the forward's Q, dq's Q and dO) are written
    by nothing else inside the loop (backends/sass.py), in the default d 128 kernels and the d 64 overlapped
    forward; the d 64 dq with row_regs, which computed a wrong dQ on an H200 (session 20), is flagged — the
    check sees that miscompile, and the config refuses it."""
    if what == "dq":
        spec = spec_of(d=128).replace(role="backward")
        kernel = tl_backend.backward_kernel(spec, tl_backend._resolve_config(spec, {"backward": "tilelang"}), "dq")
        assert tl_backend._resolve_config(spec, {"backward": "tilelang"})["dq"]["row_regs"]
    else:
        spec = spec_of(d=64 if "d64" in what else 128, fmap=None if "sparse-only" in what else "softmax")
        cfg = tl_backend._resolve_config(spec, {"overlap": True} if "d64" in what else
                                         {"tail_split": 4} if what == "forward tail" else {})
        train = what == "forward training"
        kernel = tl_backend.forward_kernel(spec, cfg, save=train, has_w=train, has_bias=train,
                                           tail=what == "forward tail")
    code = sass.disassemble(kernel)
    assert re.search(r"LDSM\.\S+\s+R\d+,", code) and re.search(r"HGMMA\.\S+\s+R\d+,\s+R\d+,", code), \
        "no register operand loaded by LDSM: the check would pass vacuously"
    assert sass.clobbered_operands(code) == []
    if what == "dq":    # the known miscompile, built without the config check that refuses it
        d64 = spec_of(d=64).replace(role="backward")
        cfg = tl_backend.default_config(d64)
        cfg["dq"] = {**cfg["dq"], "row_regs": True}
        assert sass.clobbered_operands(sass.disassemble(tl_backend.backward_kernel(d64, cfg, "dq")))


def _smem_offsets(src: str) -> dict:
    """{shared buffer: byte offset in the dynamic shared memory} of generated CUDA."""
    return {k: int(v) for k, v in re.findall(r"void\* (\w+_s) = \(\(void\*\)\(\(char\*\)buf_dyn_shmem \+ (\d+)\)\)", src)}


@needs_compiler
@pytest.mark.parametrize("spec", [bwd_spec_of(d=128, fmap="softmax", scope="marginal", negl=True),
                                  bwd_spec_of(d=64, fmap="elu", scope="marginal"),
                                  bwd_spec_of(d=128, fmap="relu", scope="marginal", block=(64, 64))],
                         ids=lambda s: s.canonical)
@pytest.mark.parametrize("kernel", ["dq", "dkdv"])
def test_backward_with_fused_linear_terms_compiles_for_sm90a(spec, kernel):
    """lin_fused: the gradients are written whole by TMA stores and never read (no linear term in them on
    entry); the per-block sums (dq: H_i; dk/dv: G_j, and dV's staging tile) take the shared memory of the loop's
    streamed stages (dq: K / V; dk/dv: Q / dO), so the CTA's shared memory does not grow;
    more wgmma: dq dO·H_iᵀ, dk/dv φ(K_j)·G_j (φ(K_j) staged in DV_s) and V_j·G_jᵀ."""
    one = {"pair": False} if kernel == "dkdv" else {}       # (the one-consumer dK/dV's shared memory)
    fused = tl_backend._resolve_config(spec, {"backward": "tilelang", kernel: {"lin_fused": True, **one}})
    plain = tl_backend._resolve_config(spec, {"backward": "tilelang", kernel: {"lin_fused": False, **one}})
    src = tl_backend.backward_kernel(spec, fused, kernel).get_kernel_source()
    base = tl_backend.backward_kernel(spec, plain, kernel).get_kernel_source()
    _assert_hopper_source(src, f"{kernel} lin_fused")
    _assert_sparse_loop_runs(src, f"{kernel} lin_fused")
    outs, sums, streamed, added = (("DQ",), ("H_s",), ("K_s", "V_s"), {"wgmma_ss<": 1, "wgmma_rs<": 0}) \
        if kernel == "dq" else (("DK", "DV"), ("G_s", "DV_s"), ("Q_s", "DO_s"), {"wgmma_ss<": 2, "wgmma_rs<": 0})
    for out in outs:
        assert f"tma_store({out}_desc" in src and not re.search(rf"\b{out}\[", src), out
    offsets, before = _smem_offsets(src), _smem_offsets(base)
    assert max(offsets.values()) == max(before.values()), "the fused epilogue grew the shared memory"
    stages = sorted(before[name] for name in streamed)
    # the end of the streamed stages: the next buffer, or (last in memory) one more buffer of their equal size
    end = min((v for v in before.values() if v > stages[1]), default=2 * stages[1] - stages[0])
    assert all(stages[0] <= offsets[name] < end for name in sums), (offsets, before)
    if kernel == "dkdv":
        d, n = spec.head_dim, fused["dkdv"]["tile_n"]             # both live at once: disjoint
        assert offsets["DV_s"] >= offsets["G_s"] + 2 * d * d or offsets["G_s"] >= offsets["DV_s"] + 2 * n * d
    for op, more in added.items():
        assert src.count(op) == base.count(op) + more, op


def test_fused_linear_terms_need_what_the_fused_kernel_reads():
    """lin_fused (dq, dkdv) needs the per-block sums of scope 'marginal' (GEMM states) in bf16, and no lin_init."""
    cases = [(bwd_spec_of(fmap=None), {}, "a linear branch"), (bwd_spec_of(scope="all"), {}, "scope 'marginal'"),
             (bwd_spec_of(dtype="fp16"), {}, "bf16"), (bwd_spec_of(), {}, "lin_init"),
             (bwd_spec_of(), {"linear": {"prep": {"marginal_states": "gather"}}}, "GEMM states")]
    for kernel in ("dq", "dkdv"):
        for spec, change, match in cases:
            change = {**change, kernel: {**change.get(kernel, {}), "lin_fused": True}}
            if "lin_init" in match:
                change[kernel]["lin_init"] = True
            with pytest.raises(ValueError, match=rf"config\['{kernel}'\]\['lin_fused'\]=True needs .*{match}"):
                tl_backend._resolve_config(spec, {"backward": "tilelang", **change})
    tl_backend._resolve_config(bwd_spec_of(), {"backward": "tilelang", "dq": {"lin_fused": True},
                                               "dkdv": {"lin_fused": True}})


def test_fused_linear_terms_are_the_default_where_they_apply():
    """Default lin_fused: on for scope 'marginal' in bf16 with a linear branch, off elsewhere; a caller's lin_init
    or gathered states turn the default off (an explicit lin_fused=True with them is an error, above)."""
    for spec, want in ((bwd_spec_of(), True), (bwd_spec_of(d=64, block=(64, 64)), True), (bwd_spec_of(fmap=None), False),
                       (bwd_spec_of(scope="all"), False), (bwd_spec_of(dtype="fp16"), False)):
        cfg = tl_backend._resolve_config(spec, {"backward": "tilelang"})
        assert (cfg["dq"]["lin_fused"], cfg["dkdv"]["lin_fused"]) == (want, want), spec.canonical
    cfg = tl_backend._resolve_config(bwd_spec_of(), {"backward": "tilelang", "dq": {"lin_init": True}})
    assert (cfg["dq"]["lin_fused"], cfg["dkdv"]["lin_fused"]) == (False, True)
    cfg = tl_backend._resolve_config(bwd_spec_of(), {"backward": "tilelang",
                                                     "linear": {"prep": {"marginal_states": "gather"}}})
    assert (cfg["dq"]["lin_fused"], cfg["dkdv"]["lin_fused"]) == (False, False)
    for bad, match in (({"dq": 5}, r"config\['dq'\] must be a dict"), ({"linear": 3}, r"config\['linear'\]=3")):
        with pytest.raises(ValueError, match=match):
            tl_backend._resolve_config(bwd_spec_of(), {"backward": "tilelang", **bad})


BWD_GRID = [bwd_spec_of(d=d, dtype=dt, fmap=fm, scope=sc, negl=ng)
            for d, dt, fm, sc, ng in itertools.product((64, 128), ("bf16", "fp16"), ("softmax", "elu", None),
                                                       ("marginal", "all"), (False, True))
            if fm is not None or (sc == "marginal" and not ng)]


@pytest.mark.parametrize("spec", BWD_GRID + [bwd_spec_of(block=b) for b in ((64, 64), (128, 128))],
                         ids=lambda s: s.canonical)
def test_backward_template_renders_valid_python(spec):
    text = codegen.render(spec, "tilelang")
    names = {n.name for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}
    linear = spec.feature_map is not None     # the linear terms are read from the gradients themselves
    # the query-state kernel: where a forward keeps H_i, Z_i (scope marginal with a linear branch)
    assert names == {"dq_kernel", "dkdv_kernel", "dkdv_pair_kernel"} | (
        {"query_state_kernel"} if linear and spec.scope == "marginal" else set())
    assert all((f"T.Cast(ACC, {out}[" in text) == linear for out in ("DQ", "DK", "DV"))


# (spec, config overrides): both head dims and dtypes, a linear branch and sparse-only, other tiles, and the
# fallback without warp specialisation; 5 specs × 2 kernels.
BWD_COMPILES = [
    (bwd_spec_of(d=128, fmap="softmax", scope="marginal", negl=True), {}),
    (bwd_spec_of(d=128, fmap=None), {}),
    (bwd_spec_of(d=64, dtype="fp16", fmap="elu", scope="all"), {}),
    (bwd_spec_of(d=64, fmap=None, block=(64, 128)), dict(dkdv=dict(tile_n=128, num_warps=8), dq=dict(tile_n=128))),
    (bwd_spec_of(d=128, fmap="relu", scope="all"),
     dict(warp_specialized=False, dq=dict(num_stages=1), dkdv=dict(num_stages=1))),
]


@needs_compiler
@pytest.mark.parametrize("spec,change", BWD_COMPILES, ids=lambda x: x.canonical if isinstance(x, KernelSpec) else
                         "-".join(sorted(x)) or "default")
def test_backward_compiles_for_sm90a(spec, change):
    cfg = tl_backend._resolve_config(spec, {"backward": "tilelang", **change})
    for kernel in ("dq", "dkdv") + (("query_state",) if cfg["query_state"] == "tilelang" else ()):
        src = tl_backend.backward_kernel(spec, cfg, kernel).get_kernel_source()
        if cfg["warp_specialized"] or kernel == "query_state":     # (its loop walks ≥ 1 query block per CTA)
            _assert_hopper_source(src, f"backward {kernel}")
            if kernel == "dkdv" and cfg["dkdv"]["pair"]:
                _assert_paired_loops_run(src, "backward dkdv (pair)")
            elif kernel != "query_state":
                _assert_sparse_loop_runs(src, f"backward {kernel}")
        else:
            assert "wgmma" in src, f"backward {kernel}: no wgmma in the generated CUDA"


@needs_compiler
@pytest.mark.parametrize("spec", [bwd_spec_of(d=128), bwd_spec_of(d=128, fmap=None), bwd_spec_of(d=64),
                                  bwd_spec_of(d=128, fmap="elu", scope="all"), bwd_spec_of(block=(64, 64))],
                         ids=lambda s: s.canonical)
def test_paired_dkdv_compiles_for_sm90a(spec):
    """config dkdv pair=True (the default where _pair_blocker allows): one CTA of 384 threads — the producer at 24 registers, two consumers
    at 240, each with its own partial barrier and one barrier of both for the handover of each other's sums — TMA
    loads, wgmma pipelined, no spill. With lin_fused, G_j is TMA-loaded after the producer's loop on a barrier of its
    own (g_full) that each consumer waits for after its loop, so the first steps wait for K and V only."""
    cfg = tl_backend._resolve_config(spec, {"backward": "tilelang", "dkdv": {"pair": True}})
    kernel = tl_backend.backward_kernel(spec, cfg, "dkdv")
    src = kernel.get_kernel_source()
    assert "__launch_bounds__(384, 1)" in src and src.count("warpgroup_reg_alloc<240>") == 2 and \
        "warpgroup_reg_dealloc<24>" in src and src.count("__sync_thread_partial(1, 256)") == 2
    assert "tma_load" in src and "wgmma" in src and "__syncthreads()" not in src.split("warpgroup_reg_dealloc")[1]
    _assert_paired_loops_run(src, spec.canonical)
    second = [m.start() for m in re.finditer(r"kv_full\[0\]\.wait\(0\)", src)][1]   # consumer 0's branch from here
    ids = [set(re.findall(r"__sync_thread_partial\((\d+), 128\)", part)) for part in (src[:second], src[second:])]
    assert all(len(x) == 1 for x in ids) and ids[0] != ids[1], ids    # one per consumer: neither waits for the other
    if cfg["dkdv"]["lin_fused"]:
        producer_loop = re.search(r"for \(int t\w* = 0;", src).start()
        g_load = src.index("tma_load(GJ_desc")
        g_waits = [m.start() for m in re.finditer(r"g_full\[0\]\.wait\(0\)", src)]
        consumer_loops = [m.start() for m in re.finditer(r"for \(int j\w* = 0;", src)]
        assert producer_loop < g_load and "kv_full" not in src[g_load - 200:g_load], "G_j is not loaded after the loop"
        assert len(g_waits) == 2 and consumer_loops[0] < g_waits[0] < consumer_loops[1] < g_waits[1], (g_waits,
                                                                                                    consumer_loops)
    rep = ptxas.report(kernel)
    assert not rep.wgmma_serialized and rep.spill_bytes == 0, rep


def test_paired_dkdv_is_refused_where_it_cannot_run():
    spec = bwd_spec_of()
    for change, match in (({"pair": 1}, "must be True or False"), ({"pair": True, "lin_init": True}, "lin_init=False"),
                          ({"pair": True, "num_stages": 3}, "fewer stages"), ({"pair": True, "tile_m": 128}, "tile_m = 64"),
                          ({"pair": True, "num_stages": 1}, "num_stages >= 2")):
        with pytest.raises(ValueError, match=match):
            tl_backend._resolve_config(spec, {"backward": "tilelang", "dkdv": change})
    for other, match in ((bwd_spec_of(dtype="fp16"), "bf16"), (bwd_spec_of(block=(128, 128)), "block_k = 64")):
        with pytest.raises(ValueError, match=match):
            tl_backend._resolve_config(other, {"backward": "tilelang", "dkdv": {"pair": True}})


def test_paired_dkdv_is_the_default_where_it_runs_and_gives_way_to_the_callers_dkdv():
    """pair is on by default for bf16 with block_k 64 (d 64 and 128, 128x64 and 64x64), off for fp16 and block_k
    128; a default pair turns off where the caller's dkdv (or warp_specialized) rules it out, and stays on beside a
    dkdv change it allows."""
    def pair(spec, config=None):
        return tl_backend._resolve_config(spec, {"backward": "tilelang", **(config or {})})["dkdv"]["pair"]
    for spec in (bwd_spec_of(), bwd_spec_of(d=64), bwd_spec_of(block=(64, 64)), bwd_spec_of(fmap=None)):
        assert pair(spec) is True, spec.canonical
    for spec in (bwd_spec_of(dtype="fp16"), bwd_spec_of(block=(128, 128))):
        assert pair(spec) is False, spec.canonical
    assert pair(bwd_spec_of(), {"dkdv": {"num_stages": 3}}) is False
    assert pair(bwd_spec_of(), {"dkdv": {"lin_init": True}}) is False
    assert pair(bwd_spec_of(), {"warp_specialized": False, "dq": {"num_stages": 1},
                                "dkdv": {"num_stages": 1}}) is False
    assert pair(bwd_spec_of(), {"dkdv": {"tma_store": False}}) is True
    with pytest.raises(ValueError, match="num_stages"):     # a value of the wrong type: check_config's message
        pair(bwd_spec_of(), {"dkdv": {"num_stages": "2"}})


def run_backward_case(*, L, H=2, B=1, d=128, dtype="bf16", fmap="softmax", scope="marginal", negl=0.0,
                      n_crit="topk", block=(128, 64), layout="bhld", proj=True, seed=0, config=None,
                      keep_sums=True) -> dict:
    """One TileLang backward (config backward='tilelang') after the TileLang forward, vs the reference's
    gradients (fp32, same inputs) and the Triton backward of the same saved tensors; returns {name: rel. err}.
    With ``keep_sums`` the forward keeps its H_i, Z_i (states=True) and saves no O^l or den, and both backwards
    read the sums (forming O^l and den from them); without, the forward saves O^l and den and both backwards
    form the sums again. dW, db (the Triton Proj-grad kernel in both paths, its fp32 sums tiled by each path's
    state-kernel launch: the TileLang path's _SUMS_PREP with kept sums) must match the Triton backward's to
    fp32 reordering (1e-5), and are compared with the reference's too."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    q, k, v, maps, w, b, cfg = case_inputs(B=B, H=H, L=L, lk=L, d=d, dtype=dtype, layout=layout, fmap=fmap,
                                           scope=scope, negl=negl, n_crit=n_crit, block=block, proj=proj, gen=gen)
    do = make_qkv(B, H, L, L, d, DT[dtype], layout, dev, gen)[0]
    out = tl_backend.forward(q, k, v, maps, w, b, True, states=keep_sums, **cfg)
    saved, kept = out[:4], keep_sums and backends.keeps_linear_sums("tilelang", True, fmap, scope)
    if keep_sums:
        assert all((t.numel() > 0) == kept for t in out[4:]), "H_i, Z_i kept exactly where keeps_linear_sums says"
    if fmap != "none":
        assert all((t.numel() == 0) == kept for t in saved[2:]), "O^l, den saved exactly where no sums are kept"
    sums = dict(lin_sums=out[4:]) if kept else {}
    poison_allocator(16 * q.numel() * 4, dev)
    got = tl_backend.backward(do, q, k, v, *saved, maps, w, b, config={"backward": "tilelang", **(config or {})},
                              **cfg, **sums)
    torch.cuda.synchronize()
    poison_allocator(16 * q.numel() * 4, dev)
    tri = tl_backend.backward(do, q, k, v, *saved, maps, w, b, config={"backward": "triton"}, **cfg, **sums)
    want = torch_backend.backward(do.float(), q.float(), k.float(), v.float(), None, None, None, None, maps, w, b,
                                  **cfg)
    errs = {}
    for name, g, t, r, x in zip(("dq", "dk", "dv"), got, tri, want, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape and g.stride() == torch.empty_like(x).stride(), name
        assert torch.isfinite(g).all(), f"{name}: {int((~torch.isfinite(g)).sum())} non-finite values"
        errs[name] = rel_err(g, r)
        errs[f"{name}_vs_triton"] = rel_err(g, t)
    # With the TileLang query-state kernel (kept sums, bf16) den = φ(Q_i)Z_i + eps comes from its row sums instead of
    # _lin_rows': a few O^l elements that the Proj-grad kernel rounds to bf16 then land one ulp apart (H200, session
    # 29: dW 1.4e-5 .. 2.2e-5 from the Triton backward's; else fp32 reordering alone, below 1e-5)
    qs_kernel = kept and dtype == "bf16" and (config or {}).get("query_state", "tilelang") == "tilelang"
    for name, g, t, r in zip(("dw", "db"), got[3:], tri[3:], want[3:]):
        assert rel_err(g, t) < (1e-4 if qs_kernel else 1e-5), \
            f"{name} differs from the Triton backward's: {rel_err(g, t):.2e}"
        if r.numel():       # (with kept sums, the Proj-grad kernel forms O^l from them)
            errs[name] = rel_err(g, r)
    return errs


EPILOGUE = dict(lin_init=True, tma_store=True)
BWD_GPU_CASES = (
    [dict(L=L, d=d, layout=lo, fmap=fm, scope="marginal", negl=0.1 if fm != "none" else 0.0)
     for L in (77, 4096, 32760) for d in (64, 128) for lo in ("bhld", "blhd") for fm in ("softmax", "none")]
    + [dict(L=4096, fmap="elu", scope="all"), dict(L=4096, n_crit="mixed"), dict(L=4096, n_crit=1),
       dict(L=4096, n_crit="all", H=1), dict(L=4096, block=(64, 64)), dict(L=4096, dtype="fp16"),
       dict(L=1000, d=64, n_crit=2), dict(L=4096, layout="qkv", scope="all"),
       dict(L=4096, config=dict(warp_specialized=False, dq=dict(num_stages=1), dkdv=dict(num_stages=1))),
       dict(L=4096, keep_sums=False), dict(L=1000, d=64, n_crit="mixed", keep_sums=False)]
    # (lin_fused, dq and dk/dv adding the linear terms in their epilogues, is the default where it applies: scope
    # 'marginal', bf16; the cases above run it there) dk / dv alone with the linear terms (dq without)
    + [dict(L=L, d=d, fmap=fm, negl=ng, n_crit=c, config=dict(dq=dict(lin_fused=False), dkdv=dict(lin_fused=True)))
       for L, d, fm, ng, c in ((77, 64, "softmax", 0.1, 1), (1000, 128, "elu", 0.0, "mixed"),
                               (4096, 128, "relu", 0.1, "mixed"), (4096, 64, "softmax", 0.0, "topk"),
                               (32760, 128, "softmax", 0.0, "topk"))]
    + [dict(L=4096, block=(64, 64), n_crit="mixed", config=dict(dq=dict(lin_fused=False))),
       dict(L=4096, layout="blhd", keep_sums=False, config=dict(dq=dict(lin_fused=False)))]
    # dq alone likewise, and neither (the Triton linear part's dq and dk/dv kernels)
    + [dict(L=L, d=d, fmap=fm, negl=ng, n_crit=c, config=dict(dq=dict(lin_fused=True), dkdv=dict(lin_fused=False)))
       for L, d, fm, ng, c in ((77, 128, "softmax", 0.1, 1), (1000, 64, "elu", 0.0, "mixed"),
                               (4096, 128, "relu", 0.1, "mixed"), (32760, 128, "softmax", 0.0, "topk"))]
    + [dict(L=4096, n_crit="mixed", config=dict(dq=dict(tile_n=128), dkdv=dict(lin_fused=False))),
       dict(L=4096, layout="blhd", config=dict(dq=dict(lin_fused=False), dkdv=dict(lin_fused=False))),
       dict(L=32760, config=dict(dq=dict(lin_fused=False), dkdv=dict(lin_fused=False))),
       dict(L=77, d=64, fmap="elu", n_crit=1, config=dict(dq=dict(lin_fused=False), dkdv=dict(lin_fused=False)))]
    # dq with two selected key blocks per step (tile_n = 2·block_k)
    + [dict(L=L, d=d, n_crit=c, config=dict(dq=dict(tile_n=128)))
       for L, c in ((77, 1), (4096, "mixed"), (32760, "topk")) for d in (64, 128)]
    + [dict(L=4096, block=(64, 64), n_crit=3, fmap="none", config=dict(dq=dict(tile_n=128)))]
    # the epilogue variants (lin_init: linear term in the accumulator first; tma_store, the default since
    # session 8: gradients by TMA; tma_store False: per-thread global stores)
    + [dict(L=L, d=d, layout=lo, fmap=fm, scope="marginal", negl=0.1 if fm != "none" else 0.0,
            config=dict(dq=EPILOGUE, dkdv=EPILOGUE))
       for L in (77, 32760) for d in (64, 128) for lo in ("bhld", "blhd") for fm in ("softmax", "none")]
    + [dict(L=4096, fmap="elu", scope="all", config=dict(dq=EPILOGUE, dkdv=EPILOGUE)),
       dict(L=1000, d=64, n_crit=2, config=dict(dq=EPILOGUE, dkdv=EPILOGUE)),
       dict(L=4096, block=(64, 64), config=dict(dq=EPILOGUE, dkdv=EPILOGUE)),
       dict(L=4096, dtype="fp16", config=dict(dq=EPILOGUE, dkdv=EPILOGUE)),
       dict(L=4096, n_crit="mixed", config=dict(dq=dict(tile_n=128, **EPILOGUE))),
       dict(L=4096, config=dict(dq=dict(lin_init=True, tma_store=False), dkdv=dict(lin_init=True, tma_store=False))),
       dict(L=4096, config=dict(dq=dict(tma_store=False), dkdv=dict(tma_store=False))),
       dict(L=77, d=64, config=dict(dq=dict(tma_store=False), dkdv=dict(tma_store=False))),
       dict(L=32760, fmap="none", config=dict(dq=dict(tma_store=False), dkdv=dict(tma_store=False)))]
    # dq with Q and dO as the register operands of its S and dP GEMMs (row_regs; the d 128 default, refused at 64)
    + [dict(L=L, fmap=fm, n_crit=c, config=dict(dq=dict(row_regs=True)))
       for L, c in ((77, 1), (4096, "mixed"), (32760, "topk")) for fm in ("softmax", "none")]
    + [dict(L=1000, n_crit=2, config=dict(dq=dict(row_regs=True, **EPILOGUE))),
       dict(L=4096, block=(64, 64), n_crit="mixed", config=dict(dq=dict(row_regs=True))),
       dict(L=4096, d=64, n_crit="mixed", config=dict(dq=dict(row_regs=False)))]
    # dq with H_i loaded into registers before its key loop (h_prefetch), with Proj and without
    + [dict(L=L, d=d, fmap=fm, n_crit=c, proj=p, config=dict(dq=dict(h_prefetch=True)))
       for L, d, fm, c, p in ((77, 128, "softmax", 1, True), (1000, 64, "elu", "mixed", True),
                              (4096, 128, "softmax", "mixed", False), (32760, 128, "softmax", "topk", True))]
    # the query-state kernel (the default with kept sums; with Proj in the cases above): without Proj, each feature
    # map, head dim and query block, with negligible blocks, rows whose A_i is empty; and the Triton kernels instead
    + [dict(L=L, d=d, fmap=fm, negl=ng, n_crit=c, block=blk, proj=False)
       for L, d, fm, ng, c, blk in ((77, 128, "softmax", 0.0, 1, (128, 64)),
                                    (4099, 64, "relu", 0.1, "mixed", (128, 64)),
                                    (1000, 128, "elu", 0.1, 2, (64, 64)),
                                    (32760, 128, "softmax", 0.0, "topk", (128, 64)),
                                    (4096, 64, "softmax", 0.0, "all", (64, 64)))]
    + [dict(L=1000, block=(64, 64), fmap="elu", n_crit=2), dict(L=4096, config=dict(query_state="triton"))]
    # two dK / dV tiles per key block (block_k 128, tile_n 64) with a partial last block, SLA and sparse-only
    + [dict(L=4099, block=(128, 128), n_crit="mixed"),
       dict(L=1000, d=64, fmap="none", block=(128, 128), n_crit="mixed")]
    # the longest length of the issue's list (Wan2.1-14B 720p, one head: the fp32 reference's memory), SLA with
    # Proj (the query-state kernel) and sparse-only
    + [dict(L=75600, H=1, n_crit="topk"), dict(L=75600, H=1, fmap="none", n_crit="topk")]
    # dK/dV with one consumer warpgroup (pair=False; the default is two, where they run: the cases above): SLA
    # (lin_fused) and sparse-only, counts of 0..all, partial blocks, d 64, scope 'all', 64x64 blocks
    + [dict(L=4096, n_crit="mixed", config=dict(dkdv=dict(pair=False))),
       dict(L=77, n_crit=1, config=dict(dkdv=dict(pair=False))),
       dict(L=4099, d=64, fmap="none", n_crit="mixed", config=dict(dkdv=dict(pair=False))),
       dict(L=32760, n_crit="topk", config=dict(dkdv=dict(pair=False))),
       dict(L=4096, layout="blhd", fmap="elu", scope="all", config=dict(dkdv=dict(pair=False))),
       dict(L=1000, block=(64, 64), n_crit="all", config=dict(dkdv=dict(pair=False)))])


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("case", BWD_GPU_CASES, ids=case_id)
def test_gpu_backward_matches_reference_and_triton(case):
    errs = run_backward_case(**case)
    assert max(errs.values()) < BWD_TOL, errs


@pytest.mark.gpu
@needs_hopper
def test_gpu_second_backward_of_a_graph_forms_the_released_sums_again():
    """Through slagen.attention (the eager autograd path; the TileLang forward keeps H_i, Z_i, the backward
    releases them before dK/dV): a second backward of the same graph (retain_graph) runs the forward again for
    the sums and gives the first one's gradients; both match the reference's."""
    import slagen
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(11)
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 4099, 4099, 128, torch.bfloat16, "bhld", dev, gen))
    do = torch.randn(q.shape, device=dev, dtype=q.dtype, generator=gen)
    api = dict(topk=0.05, block_q=128, block_k=64)
    bmap = slagen.block_map(q, k, backend="tilelang", **api)
    poison_allocator(8 * q.numel() * 4, dev)
    out = slagen.attention(q, k, v, block_map=bmap, backend="tilelang", **api)
    first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    poison_allocator(8 * q.numel() * 4, dev)
    second = torch.autograd.grad(out, (q, k, v), do)
    up = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = torch.autograd.grad(slagen.attention(*up, block_map=bmap, backend="torch", **api), up, do.float())
    for name, a, b, r in zip("qkv", first, second, ref):
        assert rel_err(b, a) < 1e-6 and rel_err(a, r) < BWD_TOL, (name, rel_err(b, a), rel_err(a, r))


def test_early_pre_pass_applies_only_where_it_can_pool(monkeypatch):
    """early_terms (the eager call's pre-pass that pools for its block map) declines — returns None, so the call
    pools in its block map — for tensors the TileLang kernels do not read (here: CPU), and the public API asks
    for it only from a backend that has one and with a linear branch."""
    from slagen import api
    q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))
    early = dict(block_q=128, block_k=64, feature_map="softmax", scope="marginal", has_negligible=False, density=0.05)
    assert tl_backend.early_terms(q, k, v, **early) is None
    assert not tl_backend._pool_plan(q, k, 128, 64).tilelang
    asked = []
    monkeypatch.setattr(tl_backend, "early_terms", lambda *a, **kw: asked.append(kw) or None)
    for name, fmap in (("torch", "softmax"), ("triton", "softmax"), ("tilelang", None)):
        assert api._early_terms(name, q, k, v, 0.05, 0.0, 128, 64, fmap, "marginal", False, None, None) is None
    assert asked == []
    assert api._early_terms("tilelang", q, k, v, 0.05, 0.0, 128, 64, "softmax", "marginal", False, None, None) is None
    assert asked == [dict(block_q=128, block_k=64, feature_map="softmax", scope="marginal", has_negligible=False,
                          density=1 / 4)]      # T_n = 4 key blocks, n_crit = max(1, floor(0.05 · 4)) = 1
