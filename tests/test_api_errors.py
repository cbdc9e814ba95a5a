"""Bad input gets a ValueError/TypeError naming the argument and what is allowed, before any kernel runs."""

import pytest
import torch

import slagen


def qkv(lq=40, lk=40, d=16, dtype=torch.float32):
    return (torch.randn(1, 2, lq, d, dtype=dtype), torch.randn(1, 2, lk, d, dtype=dtype),
            torch.randn(1, 2, lk, d, dtype=dtype))


def call(**overrides):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, block_q=16, block_k=16, backend="torch")
    args.update(overrides)
    return slagen.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("overrides,exc,words", [
    (dict(q=torch.randn(2, 40, 16)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(1, 3, 40, 16)), ValueError, "must agree on B, H and D"),
    (dict(v=torch.randn(1, 2, 41, 16)), ValueError, "v must match k"),
    (dict(k=torch.randn(1, 2, 40, 16, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(q=torch.randint(0, 3, (1, 2, 40, 16))), TypeError, "allowed: bfloat16, float16, float32"),
    (dict(q=torch.randn(1, 2, 16, 40).transpose(-1, -2)), ValueError, "unit stride on the head dimension"),
    (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    (dict(topk=1.5), ValueError, r"topk=1.5 must be a number in \[0, 1\]"),
    (dict(negligible=-0.1), ValueError, "negligible=-0.1"),
    (dict(topk=0.7, negligible=0.5), ValueError, "topk \\+ negligible"),
    (dict(block_q=48), ValueError, "block_q=48 is not supported; allowed: 16, 32, 64, 128, 256"),
    (dict(feature_map="hedgehog"), ValueError, "feature_map='hedgehog'"),
    (dict(scope="complement"), ValueError, "scope='complement'"),
    (dict(layout="bld"), ValueError, "layout='bld' is not supported; allowed: bhld, blhd"),
    (dict(backend="cuda"), ValueError, "backend='cuda' is not known"),
    (dict(scale=-1.0), ValueError, "scale=-1.0 must be a positive number"),
    (dict(proj_weight=torch.zeros(8, 8)), ValueError, r"proj_weight must have shape \(16, 16\)"),
    (dict(proj_bias=torch.zeros(16, dtype=torch.int64)), TypeError, "proj_bias must be a floating-point"),
    (dict(proj_weight=torch.zeros(16, 16), feature_map=None), ValueError, "sparse-only"),
    (dict(block_map="nope"), TypeError, "block_map must be a slagen.BlockMap"),
])
def test_attention_rejects(overrides, exc, words):
    with pytest.raises(exc, match=words):
        call(**overrides)


def test_block_map_of_the_wrong_shape_is_rejected():
    q, k, v = qkv()
    bmap = slagen.block_map(q, k, block_q=32, block_k=16)
    with pytest.raises(ValueError, match="block_map was built for blocks 32x16"):
        slagen.attention(q, k, v, block_map=bmap, block_q=16, block_k=16, backend="torch")


def test_mask_values_are_checked():
    with pytest.raises(ValueError, match="mask values must be 1"):
        slagen.BlockMap.from_mask(torch.full((1, 1, 2, 2), 2, dtype=torch.int8), block_q=16, block_k=16)


def test_explicit_backend_never_falls_back():
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises((ValueError, RuntimeError), match="backend='triton' cannot serve this call"):
        slagen.attention(q, k, v, block_q=16, block_k=16, backend="triton")
    with pytest.raises(RuntimeError, match="backend='tilelang' cannot serve this call"):
        slagen.attention(*qkv(), block_q=16, block_k=16, backend="tilelang")


def test_auto_on_cpu_is_the_reference():
    q, k, v = qkv()
    out = slagen.attention(q, k, v, block_q=16, block_k=16)
    assert torch.equal(out, slagen.attention(q, k, v, block_q=16, block_k=16, backend="torch"))
