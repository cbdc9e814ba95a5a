"""The Triton block map (backends/triton/selection.py) against the torch backend.

CPU tests run the kernels under TRITON_INTERPRET=1 in fp32 and require every one of the 9 tensors to equal
the reference exactly (inputs are seeded randn; exact ties are built on purpose). GPU tests (marker gpu)
run bf16/fp16 at video lengths against the fp32 reference of the same inputs, where a class may differ
only between blocks whose reference scores are within 1e-5 (relative to the row's largest |score|).
"""

import os
import subprocess
import sys

import pytest
import torch

import slagen
from slagen import reference
from slagen.backends import reference as torch_backend
from slagen.backends.triton import selection
from slagen.blockmap import LUT_FIELDS, lists_from_mask
from slagen.spec import ARCHS, KernelSpec
from tests.dense import block_means

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_qk(b, h, lq, lk, d, *, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, h, lk, d, generator=g)
    return q.to(device, dtype), k.to(device, dtype)


def assert_equal_maps(got, ref):
    assert len(got) == len(LUT_FIELDS)
    for name, a, b in zip(LUT_FIELDS, got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert a.is_contiguous(), name
        assert torch.equal(a, b), f"{name} differs:\n{a}\n{b}"


def assert_maps_match_up_to_near_ties(got, q, k, n_crit, n_negl, block_q, block_k, rel_tol=1e-5):
    """got is self-consistent, has the right class counts, and differs from the fp32 reference of (q, k)
    only at blocks whose reference score is within rel_tol * max|row| of the row's class boundary."""
    mask = got[0]
    for name, a, b in zip(LUT_FIELDS, got, lists_from_mask(mask, n_crit, n_negl)):
        assert torch.equal(a, b), f"{name} is not the list of the returned mask"
    assert bool(((mask == 1).sum(-1) == n_crit).all()) and bool(((mask == -1).sum(-1) == n_negl).all())
    scores = reference.block_scores(q.float(), k.float(), block_q, block_k)
    ref_mask = reference.classify(scores, n_crit, n_negl)
    diff = mask != ref_mask
    if not bool(diff.any()):
        return
    ordered = scores.sort(-1, descending=True).values
    tol = rel_tol * scores.abs().amax(-1, keepdim=True)
    near = (scores - ordered[..., n_crit - 1:n_crit]).abs() <= tol
    if n_negl:
        near |= (scores - ordered[..., -n_negl:][..., :1]).abs() <= tol
    assert bool(near[diff].all()), f"{int((diff & ~near).sum())} class mismatches are not near-ties"


# B, H, Lq, Lk, D, block_q, block_k, n_crit, n_negl
CASES = [
    (1, 2, 77, 130, 16, 16, 16, 2, 3),     # odd lengths, Lq != Lk, partial blocks, negligible class
    (2, 2, 130, 77, 32, 32, 16, 1, 0),     # n_crit = 1, no negligible class
    (2, 1, 130, 130, 32, 16, 32, 5, 0),    # n_crit = T_n: all critical
    (1, 2, 100, 77, 16, 16, 32, 1, 2),     # n_crit + n_negl = T_n: nothing marginal
    (2, 2, 64, 96, 16, 32, 32, 2, 1),      # whole blocks only
    (1, 1, 600, 1000, 16, 16, 16, 6, 6),   # T_m = 38 (several programs), T_n = 63 (padded to 64)
    (1, 2, 600, 1000, 16, 16, 16, 40, 20), # thresholds among the negative scores
    (1, 1, 40, 10, 16, 16, 16, 1, 0),      # T_n = 1
    (1, 1, 90, 3000, 16, 16, 16, 9, 18),   # T_n = 188: several key-pooling groups, 2 score tiles wide
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}_Lq{}_Lk{}_d{}_b{}x{}_c{}_n{}".format(*c))
def test_matches_reference(case):
    b, h, lq, lk, d, bq, bk, n_crit, n_negl = case
    q, k = make_qk(b, h, lq, lk, d, seed=lq * 7 + lk)
    assert_equal_maps(selection.block_map(q, k, n_crit, n_negl, bq, bk),
                      torch_backend.block_map(q, k, n_crit, n_negl, bq, bk))


def test_near_tie_checker():
    """The GPU tests' checker accepts the exact map and rejects a swap of two well-separated blocks."""
    q, k = make_qk(1, 1, 64, 128, 16, seed=2)
    got = selection.block_map(q, k, 2, 2, 16, 16)
    assert_maps_match_up_to_near_ties(got, q, k, 2, 2, 16, 16)
    mask = got[0].clone()
    row = mask[0, 0, 0]
    crit, marg = int((row == 1).nonzero()[0]), int((row == 0).nonzero()[-1])
    row[crit], row[marg] = 0, 1
    with pytest.raises(AssertionError, match="not near-ties"):
        assert_maps_match_up_to_near_ties(lists_from_mask(mask, 2, 2), q, k, 2, 2, 16, 16)


def test_strided_inputs():
    """(B, L, H, D) views and a D-slice of a wider tensor: any strides with unit stride on D, no copies."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 77, 2, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 2, 130, 48, generator=g)[..., 8:24]
    assert not q.is_contiguous() and not k.is_contiguous()
    assert_equal_maps(selection.block_map(q, k, 2, 2, 16, 32),
                      torch_backend.block_map(q.contiguous(), k.contiguous(), 2, 2, 16, 32))


def test_small_tiles_config():
    """Tunables change the tiling (more loop trips everywhere), never the result."""
    q, k = make_qk(1, 2, 600, 1000, 32, seed=11)
    config = dict(pool_rows=8, pool_qgroup=3, pool_kprogs=5, pool_stages=3, score_rows=16, score_cols=16,
                  score_dchunk=16, score_parts=2, select_rows=3, select_chunk=32, col_rows=8, col_cols=4)
    assert_equal_maps(selection.block_map(q, k, 5, 9, 16, 16, config=config),
                      torch_backend.block_map(q, k, 5, 9, 16, 16))


def test_plan_launches_one_by_one():
    """plan() gives the outputs and the four launches (what tools/bench_blockmap.py times), in order."""
    q, k = make_qk(1, 2, 77, 130, 16, seed=4)
    out, launches = selection.plan(q, k, 2, 3, 16, 16)
    assert [name for name, _ in launches] == ["pool", "scores", "select", "column"]
    for _, launch in launches:
        launch()
    assert_equal_maps(out, torch_backend.block_map(q, k, 2, 3, 16, 16))


def _pooled_float64(q, k, block_q, block_k, groups):
    """(q̄, k̄, key group sums) as a caller that pooled already passes them: block means and the row sums of
    ``groups`` groups of whole key blocks, formed in float64 and rounded once to fp32."""
    per = -(-k.shape[2] // groups)
    parts = torch.stack([k[:, :, i:i + per].double().sum(-2) for i in range(0, k.shape[2], per)], 2)
    return tuple(t.float().contiguous() for t in (block_means(q, block_q), block_means(k, block_k), parts))


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[8]], ids=lambda c: "Lq{}_Lk{}".format(c[2], c[3]))
def test_given_pooled_sums_skip_the_pool_launch(case):
    """pooled (the TileLang backend's pre-pass pooled q and k already): no pool launch, the scores read the
    given means and group sums (any grouping of the keys), and the map equals the reference's."""
    b, h, lq, lk, d, bq, bk, n_crit, n_negl = case
    q, k = make_qk(b, h, lq, lk, d, seed=lq * 7 + lk)
    want = torch_backend.block_map(q, k, n_crit, n_negl, bq, bk)
    for groups in (1, 3):
        pooled = _pooled_float64(q, k, bq, bk, groups)
        out, launches = selection.plan(q, k, n_crit, n_negl, bq, bk, pooled=pooled)
        assert [name for name, _ in launches] == ["scores", "select", "column"]
        assert_equal_maps(selection.block_map(q, k, n_crit, n_negl, bq, bk, pooled=pooled), want)
    bad = (pooled[0], pooled[1][:, :, 1:], pooled[2])
    with pytest.raises(ValueError, match="pooled k_mean must be a contiguous float32 tensor of shape"):
        selection.block_map(q, k, n_crit, n_negl, bq, bk, pooled=bad)


# (case, per_block): partial blocks with the negligible class, all critical, nothing marginal, three score tiles
MARGINAL_CASES = [(CASES[0], 1), (CASES[2], 2), (CASES[3], 1), (CASES[8], 2)]


@pytest.mark.parametrize("case,per_block", MARGINAL_CASES,
                         ids=lambda c: "Lq{}_Lk{}_c{}_n{}".format(c[2], c[3], c[7], c[8]) if isinstance(c, tuple) else f"pb{c}")
def test_marginal_operands_beside_the_map(case, per_block):
    """With ``marginal`` the map is unchanged and its scores and selection also write the mask GEMM's operand
    (1 exactly on each row's marginal blocks, 0 elsewhere and past T_n) and Z_i = Σ_marginal z_j against float64
    (``per_block`` z units per key block, zero rows past the keys), exactly 0 for a row without marginal blocks;
    poisoned outputs, so every slot must be written. marginal_operands gives the same bits from the map alone."""
    from slagen.backends.linear_terms import padded_rows
    b, h, lq, lk, d, bq, bk, n_crit, n_negl = case
    q, k = make_qk(b, h, lq, lk, d, seed=lq * 7 + lk)
    t_m, t_n = -(-lq // bq), -(-lk // bk)
    units = t_n * per_block - (per_block - 1)           # the last key block one unit short
    z = torch.rand(b, h, padded_rows(units) + 8, d, generator=torch.Generator().manual_seed(5))
    z[:, :, units:] = 0
    sel = torch.full((b, h, t_m, padded_rows(t_n)), 7.0, dtype=torch.bfloat16)
    z_sums = torch.full((b, h, t_m, d), float("nan"))
    got = selection.block_map(q, k, n_crit, n_negl, bq, bk,
                              marginal=selection.MarginalOperands(z, per_block, sel, z_sums))
    assert_equal_maps(got, torch_backend.block_map(q, k, n_crit, n_negl, bq, bk))
    marginal = got[0] == 0
    assert torch.equal(sel[..., :t_n], marginal.to(sel.dtype)) and bool((sel[..., t_n:] == 0).all())
    per_key_block = z[:, :, :t_n * per_block].double().view(b, h, t_n, per_block, d).sum(3)
    want = marginal.double() @ per_key_block
    none = ~marginal.any(-1)
    assert bool((z_sums[none] == 0).all())
    some = ~none
    if bool(some.any()):
        err = ((z_sums.double() - want)[some].norm() / want[some].norm()).item()
        assert err < 1e-6, err
    # a map given to a forward: the same operands from the map alone (z_part_kernel, marginal_rows_kernel), bitwise
    again = selection.MarginalOperands(z, per_block, torch.full_like(sel, 7.0), torch.full_like(z_sums, float("nan")))
    selection.marginal_operands(q, k, got, bq, bk, again)
    assert torch.equal(again.sel, sel) and torch.equal(again.z_sums, z_sums)
    bad = selection.MarginalOperands(z, per_block, sel[..., :t_n - 1], z_sums)
    with pytest.raises(ValueError, match="marginal operands: sel"):
        selection.block_map(q, k, n_crit, n_negl, bq, bk, marginal=bad)
    with pytest.raises(ValueError, match="marginal operands: sel"):
        selection.marginal_operands(q, k, got, bq, bk, bad)


def test_map_without_columns_skips_their_launch():
    """columns=False (a call that will not be differentiated): no column launch, zero-size column tables, the
    other five tensors as with columns; the torch backend's map the same way."""
    q, k = make_qk(1, 2, 77, 130, 16, seed=4)
    out, launches = selection.plan(q, k, 2, 3, 16, 16, columns=False)
    assert [name for name, _ in launches] == ["pool", "scores", "select"]
    for _, launch in launches:
        launch()
    full = torch_backend.block_map(q, k, 2, 3, 16, 16)
    lean = torch_backend.block_map(q, k, 2, 3, 16, 16, columns=False)
    for i, name in enumerate(LUT_FIELDS):
        if "col" in name:
            want = (1, 2, 0, 0) if name.endswith("lut") else (1, 2, 0)
            assert out[i].shape == lean[i].shape == want and out[i].dtype == lean[i].dtype == torch.int32, name
        else:
            assert torch.equal(out[i], full[i]) and torch.equal(lean[i], full[i]), name


def test_rows_longer_than_a_chunk():
    """Rows of several select chunks (the last one partial), ties straddling both thresholds across chunks."""
    patterns = [i % 7 for i in range(150)]             # T_n = 150 (ld 160): 5 chunks of 32; 21-22 ties each
    q, _ = make_qk(1, 2, 70, 150 * 16, 16, seed=12)
    k = tied_keys(1, 2, 150 * 16, 16, 16, patterns, seed=13)
    for n_crit, n_negl in ((30, 50), (1, 149 - 21), (150, 0), (7, 11)):
        got = selection.block_map(q, k, n_crit, n_negl, 16, 16, config=dict(select_chunk=32))
        assert_equal_maps(got, torch_backend.block_map(q, k, n_crit, n_negl, 16, 16))


def tied_keys(b, h, lk, d, block_k, patterns, *, seed):
    """k whose key blocks repeat len(patterns) random block patterns: pooled scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(len(set(patterns)), block_k, d, generator=g)
    k = blocks[torch.tensor(patterns)].reshape(len(patterns) * block_k, d)[:lk]
    return k.expand(b, h, -1, -1).contiguous()


@pytest.mark.parametrize("config", [None, dict(select_rows=2, select_chunk=32, pool_kprogs=3)],
                         ids=["default", "small"])
@pytest.mark.parametrize("n_crit,n_negl", [(1, 1), (2, 3), (4, 0), (5, 3)])
def test_exact_ties_prefer_smaller_index(n_crit, n_negl, config):
    patterns = [0, 1, 0, 2, 1, 0, 2, 1]                 # every score appears 2 or 3 times in a row
    q, _ = make_qk(2, 2, 77, 8 * 16, 16, seed=5)
    q[0, 0, :16] = 0.0                                  # a query block whose scores are all zero (+-0.0)
    k = tied_keys(2, 2, 8 * 16, 16, 16, patterns, seed=6)
    got = selection.block_map(q, k, n_crit, n_negl, 16, 16, config=config)
    assert_equal_maps(got, torch_backend.block_map(q, k, n_crit, n_negl, 16, 16))
    first = got[1][0, 0, 0]                             # the all-zero row: the first n_crit blocks win
    assert first.tolist() == list(range(n_crit))
    assert got[5][0, 0, 0].tolist() == list(range(8 - n_negl, 8))


def test_all_blocks_equal():
    """Identical key blocks: every row is one n-way tie, so critical = first n_crit, negligible = last n_negl."""
    q, _ = make_qk(1, 1, 50, 6 * 16, 32, seed=9)
    k = tied_keys(1, 1, 6 * 16, 32, 16, [0] * 6, seed=10)
    got = selection.block_map(q, k, 2, 3, 16, 16)
    assert_equal_maps(got, torch_backend.block_map(q, k, 2, 3, 16, 16))
    assert got[0][0, 0].tolist() == [[1, 1, 0, -1, -1, -1]] * 4


def test_public_api_backend_triton():
    q, k = make_qk(1, 2, 77, 130, 32, seed=21)
    got = slagen.block_map(q, k, topk=0.25, negligible=0.3, block_q=16, block_k=16, backend="triton")
    ref = slagen.block_map(q, k, topk=0.25, negligible=0.3, block_q=16, block_k=16, backend="torch")
    assert_equal_maps(got.tensors(), ref.tensors())


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_crit=0), "n_crit"),
    (dict(n_crit=10), "n_crit"),
    (dict(n_negl=9), "n_negl"),
    (dict(block_k=48), "block_k"),
    (dict(config=dict(tile=64)), "unknown keys"),
    (dict(config=dict(score_rows=8)), "score_rows"),
    (dict(config=dict(pool_rows=32)), "pool_rows"),
    (dict(config=dict(score_dot="tf32")), "score_dot"),
])
def test_errors(kwargs, match):
    q, k = make_qk(1, 1, 40, 130, 16, seed=0)           # T_n = 9 with block_k 16
    args = dict(n_crit=2, n_negl=1, block_q=16, block_k=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        selection.block_map(q, k, **args)


def test_unsupported_inputs():
    q, k = make_qk(1, 1, 40, 40, 8, seed=0)
    with pytest.raises(ValueError, match="head_dim"):
        selection.block_map(q, k, 1, 0, 16, 16)
    q, k = make_qk(1, 1, 40, 40, 16, seed=0)
    with pytest.raises(ValueError, match="dtype"):
        selection.block_map(q.double(), k.double(), 1, 0, 16, 16)
    with pytest.raises(ValueError, match="agree"):
        selection.block_map(q, k[:, :, :, :8].contiguous(), 1, 0, 16, 16)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_default_configs_are_valid(arch, head_dim):
    for bq, bk in ((16, 16), (64, 64), (128, 64), (256, 32)):
        spec = KernelSpec(arch=arch, head_dim=head_dim, block_q=bq, block_k=bk, role="block_map")
        selection.check_config(selection.default_config(spec), spec)


# Compiles (no launch) the kernels for a GPU target in a child process without TRITON_INTERPRET, through
# Triton's bundled LLVM and ptxas: catches lowering errors the interpreter cannot see, on CPU-only CI.
# Arguments are specialised as a launch on contiguous video-sized inputs would be (unit stride on D, 16-byte
# divisible pointers and q/k strides); the child reruns Triton's ptxas with -v on each kernel's PTX and
# prints "name registers spill_bytes", and checks that lengths and counts are not value-specialised.
_COMPILE = r"""
import re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from slagen import codegen
from slagen.backends.triton import selection
from slagen.spec import KernelSpec

cap, chunk, negl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
spec = KernelSpec(arch=f"sm{cap}", head_dim=128, block_q=128, block_k=64, feature_map=None,
                  has_negligible=negl, dtype="bf16", role="block_map")
cfg, mod = selection.default_config(spec), codegen.load(spec, "triton")
ptr = dict(q="*bf16", k="*bf16", mask="*i8", q_mean="*fp32", k_mean="*fp32", k_part="*fp32", keys="*i32",
           zt="*fp32", z_part="*fp32", z_out="*fp32", sel="*bf16")
runtime = {"BH", "H", "Lq", "Lk", "T_m", "T_n", "q_per", "k_per", "n_qprog", "n_kprog", "n_parts", "n_tiles_n",
           "n_crit", "n_negl", "k_cols", "z_rows", "per_block"}
aligned = {"sqb", "sqh", "sql", "skb", "skh", "skl", "ld"}  # ld: T_n rounded up to 16

def build(fn, warps, stages=1, maxnreg=None, **constexprs):
    if "sqd" in fn.arg_names:
        constexprs = dict(constexprs, sqd=1, skd=1)
    sig = {a: "constexpr" if a in constexprs else ptr.get(a, "*i32" if "lut" in a or "count" in a else "i32")
           for a in fn.arg_names}
    unspecialised = {p.name for p in fn.params if p.do_not_specialize}
    assert runtime & set(fn.arg_names) <= unspecialised, (fn.__name__, runtime & set(fn.arg_names) - unspecialised)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or a in aligned}
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", cap, 32),
                            options=dict(num_warps=warps, num_stages=stages, maxnreg=maxnreg))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src:
        src.write(kernel.asm["ptx"])
        src.flush()
        log = subprocess.run([get_ptxas(cap).path, "-v", "-lineinfo", "--regAllocOptLevel=2",
                              f"--gpu-name=sm_{cap}{'a' if cap == 90 else ''}", src.name, "-o", src.name + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    print(fn.__name__ + ("_sums" if constexprs.get("SUMS") else ""), regs, spill)

build(mod.pool_kernel, cfg["pool_warps"], cfg["pool_stages"], ROWS=cfg["pool_rows"], STAGES=cfg["pool_stages"])
build(mod.z_part_kernel, cfg["score_warps"], cfg["score_stages"], BN=cfg["score_cols"])
build(mod.marginal_rows_kernel, 1, maxnreg=cfg["select_maxnreg"], ROWS=cfg["select_rows"],
      CH=chunk or cfg["select_chunk"])
for sums in (False, True):
    build(mod.scores_kernel, cfg["score_warps"], cfg["score_stages"], BM=cfg["score_rows"], BN=cfg["score_cols"],
          DCHUNK=cfg["score_dchunk"], DOT=cfg["score_dot"], PARTS=cfg["score_parts"], SUMS=sums)
    build(mod.select_kernel, 1, maxnreg=cfg["select_maxnreg"] if sums else None, ROWS=cfg["select_rows"],
          CH=chunk or cfg["select_chunk"], SUMS=sums)
build(mod.column_kernel, cfg["col_warps"], ROWS=cfg["col_rows"], COLS=cfg["col_cols"])
"""


@pytest.mark.parametrize("cap,chunk,negl", [(80, 0, True), (80, 0, False), (90, 0, True), (90, 0, False),
                                            (90, 256, True), (90, 1024, True)])
def test_kernels_compile_for_gpu(cap, chunk, negl, tmp_path):
    """The d=128 kernels compile for sm80/sm90 with their default configs (chunk 0) and larger select chunks,
    with no register spills; the scores and selection also with the marginal operands (SUMS), the selection
    then under its default register cap (select_maxnreg: 80 without the negligible class, within the plain
    selection's count), and the two kernels that form those operands for a given map."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(SLAGEN_CACHE_DIR=str(tmp_path / "slagen"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(cap), str(chunk), str(int(negl))], env=env,
                         capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    usage = {name: (int(regs), int(spill)) for name, regs, spill in (line.split() for line in run.stdout.splitlines())}
    assert set(usage) == {"pool_kernel", "scores_kernel", "select_kernel", "column_kernel", "scores_kernel_sums",
                          "select_kernel_sums", "z_part_kernel", "marginal_rows_kernel"}, run.stdout
    assert all(spill == 0 for _, spill in usage.values()), f"register spills (name: registers, spill bytes): {usage}"
    if not negl and not chunk:
        assert usage["select_kernel_sums"][0] <= usage["select_kernel"][0], usage


# ------------------------------------------------------------------------------------------------ GPU
def _poison_cuda_allocator(nbytes=1 << 30):
    """Fill free cached memory with garbage so torch.empty outputs start poisoned."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    x.fill_(0xA5)
    del x


def _gpu_check(q, k, topk, negligible, block_q, block_k):
    t_n = reference.num_blocks(k.shape[2], block_k)
    n_crit, n_negl = reference.block_counts(t_n, topk, negligible)
    torch.cuda.synchronize()
    _poison_cuda_allocator()
    got = selection.block_map(q, k, n_crit, n_negl, block_q, block_k)
    torch.cuda.synchronize()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        assert_maps_match_up_to_near_ties(got, q, k, n_crit, n_negl, block_q, block_k)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_plan_serves_new_inputs_of_the_same_layout_and_a_new_layout_gets_its_own():
    """A block map's plan (checks, config, grids) is built once per layout: a second call of the same layout
    on new inputs gives that input's map, and a strided view of the same shape is a different plan."""
    seen = []
    for seed in (0, 1):
        q, k = make_qk(1, 2, 300, 260, 32, seed=seed)
        assert_equal_maps(selection.block_map(q, k, 2, 1, 32, 32), torch_backend.block_map(q, k, 2, 1, 32, 32))
        seen.append(selection._plan_of(q, k, 2, 1, 32, 32, None, True))
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, n, 2, 32, generator=g).transpose(1, 2) for n in (300, 260))   # (B, L, H, D) storage
    assert_equal_maps(selection.block_map(q, k, 2, 1, 32, 32), torch_backend.block_map(q, k, 2, 1, 32, 32))
    seen.append(selection._plan_of(q, k, 2, 1, 32, 32, None, True))
    assert seen[0] is seen[1] and seen[2] is not seen[0]


def test_plan_of_a_tuned_call_is_rebuilt_after_the_tuning_memo_is_dropped():
    """The backend's block map looks its tuned config up when it builds a plan, so the plan is keyed by the
    tuning memo's generation: after slagen.autotune.select.forget() (tuning, importing records) the next call
    builds a new plan; an explicit config keys its own."""
    from slagen.autotune import select
    from slagen.backends import plans
    from slagen.backends import triton as triton_backend
    q, k = make_qk(1, 2, 200, 200, 32, seed=5)
    first = triton_backend.block_map(q, k, 2, 0, 32, 32)
    plan = selection._plan_of(q, k, 2, 0, 32, 32, plans.TUNED, True)
    assert selection._plan_of(q, k, 2, 0, 32, 32, plans.TUNED, True) is plan
    select.forget()
    assert_equal_maps(triton_backend.block_map(q, k, 2, 0, 32, 32), first)
    rebuilt = selection._plan_of(q, k, 2, 0, 32, 32, plans.TUNED, True)
    assert rebuilt is not plan and rebuilt.key != plan.key
    explicit = selection._plan_of(q, k, 2, 0, 32, 32, dict(select_chunk=64), True)
    assert explicit.key != rebuilt.key and explicit.cfg["select_chunk"] == 64


def test_relauncher_relaunches_by_key_with_the_constexprs_in_parameter_order(monkeypatch):
    """The first launch of a key goes through Triton; later ones call the compiled kernel's launcher with the
    positional arguments followed by every constexpr (given or default) in the kernel's parameter order. No
    key (None) or another device: through Triton again."""
    from slagen.backends.triton import launch
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("direct", grid, args))

    def kernel(x, n, BLOCK, FLAG=7):   # the Python function a triton.jit wraps
        pass

    class Jit:
        fn = staticmethod(kernel)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append(("triton", grid, args, kwargs))
                return Compiled()
            return run

    device = [0]
    monkeypatch.setattr(launch, "_compiled_kernel_type", lambda: Compiled)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device[0])
    run = launch.Relauncher(Jit())
    run("k", (4, 2), ("x", 3), BLOCK=16, num_warps=4)
    run("k", (4, 2), ("y", 5), BLOCK=16, num_warps=4)
    run(None, (4, 2), ("z", 5), BLOCK=16, num_warps=4)
    device[0] = 1
    run("k", (4, 2), ("w", 5), BLOCK=16, num_warps=4)
    assert calls == [("triton", (4, 2), ("x", 3), dict(BLOCK=16, num_warps=4)),
                     ("direct", (4, 2, 1), ("y", 5, 16, 7)),
                     ("triton", (4, 2), ("z", 5), dict(BLOCK=16, num_warps=4)),
                     ("triton", (4, 2), ("w", 5), dict(BLOCK=16, num_warps=4))]
    with pytest.raises(TypeError, match="'BLOCK'"):
        launch.Relauncher(Jit())("other", (1,), ("x", 3), num_warps=4)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("length", [32760, 75600])
@pytest.mark.parametrize("blocks", [(64, 64), (128, 64)])
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_gpu_video_lengths(length, blocks, dtype, head_dim):
    q, k = make_qk(1, 2, length, length, head_dim, seed=length + blocks[0], dtype=dtype, device="cuda")
    _gpu_check(q, k, 0.05, 0.1, *blocks)


@pytest.mark.gpu
@requires_cuda
def test_gpu_blhd_layout_no_negligible():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 32760, 2, 128, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, 32760, 2, 128, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    _gpu_check(q, k, 0.05, 0.0, 128, 64)


@pytest.mark.gpu
@requires_cuda
def test_gpu_exact_ties():
    patterns = [i % 5 for i in range(64)]
    q, _ = make_qk(1, 2, 4000, 64 * 64, 128, seed=8)
    k = tied_keys(1, 2, 64 * 64, 128, 64, patterns, seed=9)
    q, k = q.to("cuda", torch.bfloat16), k.to("cuda", torch.bfloat16)
    got = selection.block_map(q, k, 7, 9, 64, 64)
    ref = torch_backend.block_map(q, k, 7, 9, 64, 64)
    assert_equal_maps(got, ref)


@pytest.mark.gpu
@requires_cuda
def test_gpu_new_length_does_not_recompile():
    """Lengths are run-time values: a new length reuses the kernels."""
    from slagen import codegen
    q, k = make_qk(1, 2, 32760, 32760, 128, seed=1, dtype=torch.bfloat16, device="cuda")
    mod = codegen.load(selection.kernel_spec(q, 64, 64, True), "triton")
    kernels = (mod.pool_kernel, mod.scores_kernel, mod.select_kernel, mod.column_kernel)
    if not all(hasattr(fn, "device_caches") for fn in kernels):
        pytest.skip("this Triton version does not expose JITFunction.device_caches")
    selection.block_map(q, k, 25, 51, 64, 64)
    count = lambda: sum(len(fn.device_caches[torch.cuda.current_device()][0]) for fn in kernels)  # noqa: E731
    before = count()
    q, k = make_qk(1, 2, 30001, 29500, 128, seed=2, dtype=torch.bfloat16, device="cuda")
    _gpu_check(q, k, 0.05, 0.1, 64, 64)
    assert count() == before
