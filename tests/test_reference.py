"""The torch reference (backend='torch') against the independent dense float64 formula of SLA.md."""

import itertools

import pytest
import torch

import slagen
from slagen import reference
from tests.dense import dense_sla


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(b, h, lq, lk, d, dtype=torch.float64, seed=0, layout="bhld"):
    g = torch.Generator().manual_seed(seed)
    shape = lambda length: (b, h, length, d) if layout == "bhld" else (b, length, h, d)  # noqa: E731
    q = torch.randn(shape(lq), generator=g, dtype=dtype)
    k = torch.randn(shape(lk), generator=g, dtype=dtype)
    v = torch.randn(shape(lk), generator=g, dtype=dtype)
    return q, k, v


CASES = list(itertools.product(["marginal", "all"], ["softmax", "elu", "relu"], [0.0, 0.25]))


@pytest.mark.parametrize("scope,fmap,negl", CASES)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_forward_and_grads_match_dense(scope, fmap, negl, layout):
    b, h, lq, lk, d, bq, bk = 2, 2, 77, 100, 8, 16, 16
    q, k, v = make(b, h, lq, lk, d, layout=layout, seed=hash((scope, fmap, negl, layout)) % 1000)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    for t in (q, k, v, w, bias):
        t.requires_grad_(True)
    bmap = slagen.block_map(q, k, topk=0.3, negligible=negl, block_q=bq, block_k=bk, layout=layout)
    out = slagen.attention(q, k, v, topk=0.3, negligible=negl, feature_map=fmap, scope=scope, block_q=bq,
                           block_k=bk, proj_weight=w, proj_bias=bias, layout=layout, backend="torch")
    to_bhld = (lambda x: x) if layout == "bhld" else (lambda x: x.transpose(1, 2))
    ref = dense_sla(to_bhld(q), to_bhld(k), to_bhld(v), bmap.mask, block_q=bq, block_k=bk, scale=d ** -0.5,
                    feature_map=fmap, scope=scope, weight=w, bias=bias)
    assert out.shape == q.shape
    assert rel(to_bhld(out), ref) < 1e-12
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, w, bias), do)
    grads_ref = torch.autograd.grad(ref, (q, k, v, w, bias), to_bhld(do))
    for name, got, want in zip("q k v weight bias".split(), grads, grads_ref):
        assert rel(got, want) < 1e-10, name


def test_sparse_only_matches_dense_and_ignores_linear():
    q, k, v = make(1, 3, 130, 130, 16, seed=3)
    q.requires_grad_(True)
    bmap = slagen.block_map(q, k, topk=0.2, block_q=32, block_k=16)
    out = slagen.attention(q, k, v, topk=0.2, feature_map=None, block_q=32, block_k=16, backend="torch")
    ref = dense_sla(q, k, v, bmap.mask, block_q=32, block_k=16, scale=0.25, feature_map=None, scope="marginal")
    assert rel(out, ref) < 1e-12
    gq = torch.autograd.grad(out.sum(), q)[0]
    gq_ref = torch.autograd.grad(ref.sum(), q)[0]
    assert rel(gq, gq_ref) < 1e-10


def test_identity_projection_and_custom_scale():
    q, k, v = make(1, 2, 64, 96, 8, seed=4)
    bmap = slagen.block_map(q, k, topk=0.4, block_q=16, block_k=32)
    out = slagen.attention(q, k, v, block_map=bmap, block_q=16, block_k=32, scale=0.7, backend="torch")
    ref = dense_sla(q, k, v, bmap.mask, block_q=16, block_k=32, scale=0.7, feature_map="softmax",
                    scope="marginal")
    assert rel(out, ref) < 1e-12


def test_gradcheck_through_the_custom_op():
    q, k, v = make(1, 1, 19, 21, 4, seed=5)
    w = torch.randn(4, 4, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v, w, bias))
    bmap = slagen.block_map(q, k, topk=0.4, negligible=0.3, block_q=16, block_k=16)

    def fn(q, k, v, w, bias):
        return slagen.attention(q, k, v, block_map=bmap, block_q=16, block_k=16, proj_weight=w,
                                proj_bias=bias, backend="torch")

    assert torch.autograd.gradcheck(fn, inputs)


def test_empty_and_full_rows():
    """A row with no critical block gets O^s = 0; a row with every block critical gets O^l = 0 (marginal)."""
    q, k, v = make(1, 1, 40, 48, 8, seed=6)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.int8)
    mask[0, 0, 0] = torch.tensor([1, 1, 1])       # all critical: no marginal block
    mask[0, 0, 1] = torch.tensor([0, 0, -1])      # no critical block
    mask[0, 0, 2] = torch.tensor([0, 1, -1])
    bmap = slagen.BlockMap.from_mask(mask, block_q=16, block_k=16)
    out = slagen.attention(q, k, v, block_map=bmap, block_q=16, block_k=16, backend="torch")
    o_s, lse = reference.sparse_branch(q, k, v, mask, block_q=16, block_k=16, scale=8 ** -0.5)
    assert torch.all(o_s[0, 0, 16:32] == 0) and torch.all(torch.isneginf(lse[0, 0, 16:32]))
    assert rel(out[0, 0, :16], o_s[0, 0, :16]) < 1e-14          # row 0 is pure sparse attention
    ref = dense_sla(q, k, v, mask, block_q=16, block_k=16, scale=8 ** -0.5, feature_map="softmax",
                    scope="marginal")
    assert rel(out, ref) < 1e-12


def test_block_counts():
    assert reference.block_counts(512, 0.05, 0.0) == (25, 0)
    assert reference.block_counts(10, 0.0, 0.0) == (1, 0)            # clamped to at least one
    assert reference.block_counts(10, 1.0, 0.5) == (10, 0)           # negligible never eats critical
    assert reference.block_counts(100, 0.29, 0.1) == (29, 10)        # float error in 0.29*100 forgiven
    assert reference.block_counts(7, 0.5, 0.5) == (3, 3)


def test_pooling_uses_true_row_count_and_smooth_k():
    x = torch.arange(10, dtype=torch.float64).view(1, 1, 10, 1)
    pooled = reference.pool_blocks(x, 4)
    assert pooled.flatten().tolist() == [1.5, 5.5, 8.5]
    q, k, _ = make(1, 1, 33, 45, 4, seed=7)
    shifted = reference.block_scores(q, k + 100.0, 16, 8)     # smooth-K removes a constant key offset
    assert torch.allclose(shifted, reference.block_scores(q, k, 16, 8), atol=1e-9)


def test_classes_counts_and_ties():
    q, k, _ = make(2, 3, 100, 200, 8, seed=8)
    bmap = slagen.block_map(q, k, topk=0.1, negligible=0.2, block_q=16, block_k=16)
    tn = 13
    assert torch.all((bmap.mask == 1).sum(-1) == 1) and torch.all((bmap.mask == -1).sum(-1) == 2)
    scores = reference.block_scores(q, k, 16, 16)
    crit_min = scores.masked_fill(bmap.mask != 1, float("inf")).amin(-1)
    marg_max = scores.masked_fill(bmap.mask != 0, float("-inf")).amax(-1)
    assert torch.all(crit_min >= marg_max)
    assert bmap.crit_col_lut.shape == (2, 3, tn, 7) and bmap.negl_lut.shape == (2, 3, 7, 2)
    # exactly tied scores: the smaller key-block index wins
    scores = torch.zeros(1, 1, 1, 6)
    assert reference.classify(scores, 2, 1).flatten().tolist() == [1, 1, 0, 0, 0, -1]


def test_lookup_tables_agree_with_mask():
    q, k, _ = make(2, 2, 90, 150, 8, seed=9)
    bmap = slagen.block_map(q, k, topk=0.25, negligible=0.25, block_q=16, block_k=32)
    for cls, lut, cnt, col, col_cnt in ((1, bmap.crit_lut, bmap.crit_count, bmap.crit_col_lut, bmap.crit_col_count),
                                        (-1, bmap.negl_lut, bmap.negl_count, bmap.negl_col_lut,
                                         bmap.negl_col_count)):
        hit = bmap.mask == cls
        assert torch.equal(cnt, hit.sum(-1).int()) and torch.equal(col_cnt, hit.sum(-2).int())
        for bb, hh, i in itertools.product(range(2), range(2), range(hit.shape[2])):
            assert lut[bb, hh, i, :cnt[bb, hh, i]].tolist() == hit[bb, hh, i].nonzero().flatten().tolist()
        for bb, hh, j in itertools.product(range(2), range(2), range(hit.shape[3])):
            want = hit[bb, hh, :, j].nonzero().flatten().tolist()
            assert col[bb, hh, j, :col_cnt[bb, hh, j]].tolist() == want
            assert torch.all(col[bb, hh, j, col_cnt[bb, hh, j]:] == -1)
    assert abs(bmap.density - 1 / 5) < 1e-6      # floor(0.25 * 5) = 1 of 5 key blocks per row
