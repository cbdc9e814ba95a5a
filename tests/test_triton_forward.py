"""The Triton SLA forward (backends/triton/fwd.py) against the torch reference backend.

CPU tests run the kernels under Triton's interpreter in fp32 (tiny shapes, rel. error < 1e-4); GPU tests
(marker ``gpu``) run bf16/fp16 at realistic lengths against the fp32 reference (rel. error < 2e-2).
Every output the kernels allocate is poisoned: torch's deterministic mode fills torch.empty with NaN.
"""

import contextlib

import pytest
import torch

from slagen import codegen
from slagen.backends import reference as ref_backend
from slagen.blockmap import BlockMap
from slagen.reference import block_counts, num_blocks
from slagen.spec import ARCHS, KernelSpec

from slagen.backends.triton import fwd

CPU_TOL = 1e-4
GPU_TOL = 2e-2


@contextlib.contextmanager
def nan_poisoned_empty():
    """torch.empty / empty_like return NaN-filled memory inside the block (deterministic mode)."""
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def make_inputs(B, H, lq, lk, d, dtype=torch.float32, device="cpu", layout="bhld"):
    """Random q (B, H, lq, d), k, v (B, H, lk, d); 'blhd' gives transposed views of (B, L, H, D) tensors."""
    def one(length):
        if layout == "blhd":
            return torch.randn(B, length, H, d, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(B, H, length, d, device=device, dtype=dtype)
    return one(lq), one(lk), one(lk)


def make_maps(q, k, topk, negligible, block_q, block_k):
    n_crit, n_negl = block_counts(num_blocks(k.shape[-2], block_k), topk, negligible)
    return list(ref_backend.block_map(q, k, n_crit, n_negl, block_q, block_k))


def make_proj(d, weight, bias, device="cpu"):
    w = torch.randn(d, d, device=device) / d ** 0.5 if weight else None
    b = torch.randn(d, device=device) * 0.5 if bias else None
    return w, b


def run_both(q, k, v, maps, w, b, save, config=None, **cfg):
    with nan_poisoned_empty():
        out = fwd.forward(q, k, v, maps, w, b, save, config=config, **cfg)
    qf, kf, vf = (x.float() for x in (q, k, v))
    ref = ref_backend.forward(qf, kf, vf, maps, w, b, save, **cfg)
    return out, ref


def check_lse(lse, ref_lse, tol):
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), dead)
    assert rel_err(lse[~dead], ref_lse[~dead]) < tol


def check_all(out, ref, tol, save, linear):
    o, lse, o_lin, den = out
    r_o, r_lse, r_lin, r_den = ref
    assert not torch.isnan(o).any()
    assert rel_err(o, r_o) < tol
    check_lse(lse, r_lse, tol)
    if save and linear:
        assert o_lin.shape == r_lin.shape and o_lin.dtype == o.dtype and o_lin.is_contiguous()
        assert den.shape == r_den.shape and den.dtype == torch.float32
        assert rel_err(o_lin, r_lin) < tol
        assert rel_err(den, r_den) < tol
    else:
        assert o_lin.numel() == 0 and den.numel() == 0 and o_lin is not den


# (feature_map, scope, negligible, proj weight, proj bias, save, B, H, Lq, Lk, D, block_q, block_k, config)
CASES = [
    ("softmax", "marginal", 0.0, True, True, True, 2, 2, 77, 130, 16, 16, 32, None),
    ("softmax", "marginal", 0.2, True, True, False, 2, 2, 130, 77, 32, 32, 16, None),
    ("softmax", "all", 0.0, True, True, False, 2, 2, 77, 130, 16, 16, 32, None),     # Proj folded into H
    ("softmax", "all", 0.2, True, False, True, 1, 2, 130, 130, 32, 32, 32, None),
    ("elu", "marginal", 0.2, False, True, True, 2, 1, 77, 130, 16, 32, 16, None),
    ("elu", "all", 0.0, False, False, False, 1, 2, 130, 77, 16, 16, 16, None),
    ("relu", "marginal", 0.0, True, True, True, 2, 2, 77, 77, 16, 16, 32, None),
    ("relu", "all", 0.2, True, True, False, 1, 2, 77, 130, 32, 32, 16, None),
    ("none", "marginal", 0.0, False, False, True, 2, 2, 77, 130, 16, 16, 32, None),
    ("none", "all", 0.2, False, False, False, 2, 1, 130, 77, 32, 32, 16, None),
    # tiles smaller than the blocks (all-masked key tiles past Lk), several epilogue chunks
    ("softmax", "marginal", 0.2, True, True, True, 1, 2, 77, 77, 16, 32, 32,
     dict(tile_m=16, tile_n=16, epi_k=8)),
    # pre-pass split into several chunks (B·H = 1), 32-column epilogue chunks of D = 32
    ("elu", "marginal", 0.0, True, True, True, 1, 1, 130, 130, 32, 32, 16, dict(pre_tile=16, epi_k=16)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c[:10]))
def test_matches_reference(case):
    fmap, scope, negl, weight, bias, save, B, H, lq, lk, d, bq, bk, config = case
    torch.manual_seed(CASES.index(case))
    q, k, v = make_inputs(B, H, lq, lk, d)
    maps = make_maps(q, k, 0.3, negl, bq, bk)
    w, b = make_proj(d, weight, bias)
    cfg = dict(block_q=bq, block_k=bk, scale=d ** -0.5, feature_map=fmap, scope=scope, eps=1e-5)
    out, ref = run_both(q, k, v, maps, w, b, save, config=config, **cfg)
    check_all(out, ref, CPU_TOL, save, fmap != "none")


@pytest.mark.parametrize("scope", ["marginal", "all"])
def test_blhd_strided_inputs(scope):
    torch.manual_seed(1)
    q, k, v = make_inputs(2, 2, 77, 130, 16, layout="blhd")
    maps = make_maps(q, k, 0.3, 0.2, 16, 32)
    w, b = make_proj(16, True, True)
    cfg = dict(block_q=16, block_k=32, scale=0.3, feature_map="softmax", scope=scope, eps=1e-5)
    out, ref = run_both(q, k, v, maps, w, b, True, **cfg)
    assert out[0].stride() == q.stride()
    check_all(out, ref, CPU_TOL, True, True)


@pytest.mark.parametrize("scope", ["marginal", "all"])
def test_rows_with_no_and_all_critical_blocks(scope):
    """Row 0: no critical block (O^s = 0, LSE = -inf); row 1: all critical (empty marginal set:
    O^l = 0); row 2: critical + negligible covering every block; row 3: mixed."""
    torch.manual_seed(2)
    B, H, lq, lk, d, bq, bk = 1, 2, 61, 77, 16, 16, 16
    q, k, v = make_inputs(B, H, lq, lk, d)
    tm, tn = num_blocks(lq, bq), num_blocks(lk, bk)
    mask = torch.zeros(B, H, tm, tn, dtype=torch.int8)
    mask[:, :, 1] = 1
    mask[:, :, 2, :2], mask[:, :, 2, 2:] = 1, -1
    mask[:, :, 3, 0], mask[:, :, 3, 3], mask[:, :, 3, 4] = 1, -1, 1
    maps = list(BlockMap.from_mask(mask, block_q=bq, block_k=bk).tensors())
    w, b = make_proj(d, True, True)
    cfg = dict(block_q=bq, block_k=bk, scale=d ** -0.5, feature_map="relu", scope=scope, eps=1e-5)
    out, ref = run_both(q, k, v, maps, w, b, True, **cfg)
    check_all(out, ref, CPU_TOL, True, True)
    assert torch.isinf(out[1][:, :, :bq]).all() and (out[0][:, :, :bq] != 0).any()


def test_sparse_only_kernel_has_no_linear_code():
    spec = KernelSpec(arch="sm90", head_dim=64, block_q=128, block_k=64, feature_map=None, dtype="bf16")
    source = codegen.render(spec, "triton")
    for name in ("sla_linear_totals_kernel", "_phi", "HT", "blk_acc", "eps"):
        assert name not in source
    marginal = codegen.render(spec.replace(feature_map="softmax", has_negligible=True), "triton")
    assert "NEGL_LUT" in marginal and "_add_block_linear" in marginal
    assert "_add_block_linear" not in codegen.render(spec.replace(feature_map="elu", scope="all"), "triton")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_default_config_is_valid(arch, head_dim):
    for fmap, scope, bq, bk in ((None, "marginal", 16, 16), ("softmax", "marginal", 128, 64),
                                ("elu", "all", 256, 32)):
        spec = KernelSpec(arch=arch, head_dim=head_dim, block_q=bq, block_k=bk, feature_map=fmap, scope=scope)
        cfg = fwd.default_config(spec)
        fwd.check_config(cfg, spec)
        assert cfg["tile_m"] <= bq and cfg["tile_n"] <= bk


def test_clear_errors():
    q, k, v = make_inputs(1, 1, 20, 20, 16)
    maps = make_maps(q, k, 0.5, 0.0, 16, 16)
    cfg = dict(block_q=16, block_k=16, scale=0.25, feature_map="softmax", scope="marginal", eps=1e-5)
    with pytest.raises(ValueError, match="feature_map"):
        fwd.forward(q, k, v, maps, None, None, False, **{**cfg, "feature_map": "gelu"})
    with pytest.raises(ValueError, match="scope"):
        fwd.forward(q, k, v, maps, None, None, False, **{**cfg, "scope": "some"})
    with pytest.raises(ValueError, match="dtype"):
        fwd.forward(q.double(), k.double(), v.double(), maps, None, None, False, **cfg)
    with pytest.raises(ValueError, match="tile_m"):
        fwd.forward(q, k, v, maps, None, None, False, config=dict(tile_m=32), **cfg)
    with pytest.raises(ValueError, match=r"unknown keys \['block_m'\]"):
        fwd.forward(q, k, v, maps, None, None, False, config=dict(block_m=32), **cfg)
    with pytest.raises(ValueError, match="fp32_dot"):
        fwd.forward(q, k, v, maps, None, None, False, config=dict(fp32_dot="fp64"), **cfg)
    with pytest.raises(ValueError, match="proj_weight"):
        fwd.forward(q, k, v, maps, torch.randn(8, 8), None, False, **cfg)


# --------------------------------------------------------------------------------------------------
# GPU: realistic shapes, bf16/fp16 against the fp32 reference.

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu)")


@gpu
@needs_cuda
@pytest.mark.parametrize("negligible", [0.0, 0.1])
@pytest.mark.parametrize("scope", ["marginal", "all"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("length", [32760, 75600])
def test_gpu_realistic(length, head_dim, dtype, scope, negligible):
    torch.manual_seed(length + head_dim)
    B, H, bq, bk = 1, 2, 128, 64
    q, k, v = make_inputs(B, H, length, length, head_dim, dtype=dtype, device="cuda")
    maps = make_maps(q, k, 0.05, negligible, bq, bk)
    w, b = make_proj(head_dim, True, True, device="cuda")
    save = scope == "marginal"
    cfg = dict(block_q=bq, block_k=bk, scale=head_dim ** -0.5, feature_map="softmax", scope=scope, eps=1e-5)
    out, ref = run_both(q, k, v, maps, w, b, save, **cfg)
    check_all(out, ref, GPU_TOL, save, True)


@gpu
@needs_cuda
@pytest.mark.parametrize("feature_map", ["none", "elu", "relu"])
def test_gpu_feature_maps(feature_map):
    torch.manual_seed(3)
    q, k, v = make_inputs(1, 2, 32760, 32760, 128, dtype=torch.bfloat16, device="cuda", layout="blhd")
    maps = make_maps(q, k, 0.05, 0.1, 128, 64)
    linear = feature_map != "none"
    w, b = make_proj(128, linear, linear, device="cuda")
    cfg = dict(block_q=128, block_k=64, scale=128 ** -0.5, feature_map=feature_map, scope="marginal", eps=1e-5)
    out, ref = run_both(q, k, v, maps, w, b, True, **cfg)
    check_all(out, ref, GPU_TOL, True, linear)
