"""The Triton SLA backward (backends/triton/bwd.py) against autograd of the torch reference.

CPU tests run the kernels under the Triton interpreter (fp32, tiny odd shapes); ``gpu`` tests run them at
realistic shapes in bf16/fp16 against an fp32 reference computed from the same (upcast) inputs. The saved
forward tensors (o, lse, o_lin, den) always come from the reference forward, so only the backward is tested.
"""

import math
import weakref

import pytest
import torch

from slagen import reference
from slagen.backends import reference as torch_backend
from slagen.backends.triton import bwd
from slagen.blockmap import BlockMap

GRADS = ("dq", "dk", "dv", "dw", "db")
NAMES = ("do", "q", "k", "v", "o", "lse", "o_lin", "den", "maps", "proj_weight", "proj_bias")   # backward's args
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu)")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randn(shape, layout, dtype, device, gen):
    """A (B, H, L, D) view of a tensor stored as (B, H, L, D) ('bhld') or (B, L, H, D) ('blhd')."""
    B, H, L, D = shape
    if layout == "bhld":
        return torch.randn(shape, generator=gen, device=device).to(dtype)
    return torch.randn((B, L, H, D), generator=gen, device=device).to(dtype).transpose(1, 2)


def make_problem(B=2, H=2, Lq=77, Lk=130, D=32, block_q=32, block_k=16, feature_map="softmax",
                 scope="marginal", topk=0.3, negligible=0.0, weight=False, bias=False, layout="bhld",
                 dtype=torch.float32, device="cpu", mask=None, seed=0):
    """Inputs, block map, reference forward outputs and dO of one backward call."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (randn((B, H, L, D), layout, dtype, device, gen) for L in (Lq, Lk, Lk))
    do = randn((B, H, Lq, D), layout, dtype, device, gen)
    w = torch.randn((D, D), generator=gen, device=device) * 0.5 if weight else None
    b = torch.randn((D,), generator=gen, device=device) * 0.5 if bias else None
    if mask is None:
        n_crit, n_negl = reference.block_counts(reference.num_blocks(Lk, block_k), topk, negligible)
        maps = list(torch_backend.block_map(q, k, n_crit, n_negl, block_q, block_k))
    else:
        maps = list(BlockMap.from_mask(mask.to(device), block_q=block_q, block_k=block_k).tensors())
    cfg = dict(block_q=block_q, block_k=block_k, scale=D ** -0.5, feature_map=feature_map, scope=scope,
               eps=reference.EPS)
    o, lse, o_lin, den = torch_backend.forward(q, k, v, maps, w, b, True, **cfg)
    return dict(do=do, q=q, k=k, v=v, o=o, lse=lse, o_lin=o_lin, den=den, maps=maps, proj_weight=w,
                proj_bias=b), cfg


def reference_grads(p, cfg):
    """Autograd of the reference in fp32, from the same inputs upcast."""
    up = {name: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
          for name, t in p.items()}
    return torch_backend.backward(up["do"], up["q"], up["k"], up["v"], up["o"], up["lse"], up["o_lin"], up["den"],
                                  p["maps"], p["proj_weight"], p["proj_bias"], **cfg)


def triton_grads(p, cfg, config=None):
    return bwd.backward(p["do"], p["q"], p["k"], p["v"], p["o"], p["lse"], p["o_lin"], p["den"], p["maps"],
                        p["proj_weight"], p["proj_bias"], **cfg, config=config)


def check(p, cfg, tol, config=None):
    got = triton_grads(p, cfg, config)
    want = reference_grads(p, cfg)
    for name, g, w, x in zip(GRADS, got, want, (p["q"], p["k"], p["v"], p["proj_weight"], p["proj_bias"])):
        if x is None:
            assert g.numel() == 0 and g.dtype == torch.float32, name
            continue
        assert g.shape == x.shape and g.dtype == x.dtype and g.stride() == x.stride(), name
        err = rel(g, w)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"
    return got


# ------------------------------------------------------------------------------------------------ CPU tests

CPU_CASES = [
    # scope, feature_map, negligible, weight, bias, Lq, Lk, block_q, block_k, D, layout
    ("marginal", "softmax", 0.0, True, True, 77, 130, 32, 16, 32, "bhld"),
    ("marginal", "elu", 0.25, True, False, 130, 77, 16, 32, 16, "blhd"),
    ("marginal", "relu", 0.25, False, True, 77, 77, 32, 32, 32, "bhld"),
    ("marginal", "softmax", 0.25, False, False, 130, 130, 16, 16, 16, "blhd"),
    ("all", "softmax", 0.25, True, True, 130, 77, 16, 32, 16, "blhd"),
    ("all", "elu", 0.0, False, False, 77, 130, 32, 16, 32, "bhld"),
    ("all", "relu", 0.0, True, True, 130, 130, 32, 32, 16, "bhld"),
    ("marginal", "none", 0.0, False, False, 77, 130, 32, 16, 32, "bhld"),
    ("all", "none", 0.25, False, False, 130, 77, 16, 32, 16, "blhd"),
]


@pytest.mark.parametrize("scope,fmap,negl,weight,bias,lq,lk,bq,bk,d,layout", CPU_CASES)
def test_matches_reference(scope, fmap, negl, weight, bias, lq, lk, bq, bk, d, layout):
    p, cfg = make_problem(Lq=lq, Lk=lk, D=d, block_q=bq, block_k=bk, feature_map=fmap, scope=scope,
                          negligible=negl, weight=weight, bias=bias, layout=layout, seed=lq + lk + d)
    check(p, cfg, 1e-4)


@pytest.mark.parametrize("scope", ["marginal", "all"])
def test_linear_branch_alone(scope):
    """The linear branch's share of the gradients (full minus sparse-only) matches on its own."""
    args = dict(scope=scope, negligible=0.25, seed=5)
    p, cfg = make_problem(feature_map="elu", weight=True, **args)
    sparse_p, sparse_cfg = make_problem(feature_map="none", **args)     # same q, k, v, dO and block map
    full = zip(triton_grads(p, cfg)[:3], reference_grads(p, cfg)[:3])
    sparse = zip(triton_grads(sparse_p, sparse_cfg)[:3], reference_grads(sparse_p, sparse_cfg)[:3])
    for name, (got, want), (sgot, swant) in zip(GRADS, full, sparse):
        assert rel(got - sgot, want - swant) < 1e-4, name


class SparseLoops:
    """Stand-in for a backend's sparse loops in bwd.linear_part: records, per head group, D^s and what the
    gradient views hold on entry (the linear terms), then overwrites the views with the group's first head
    index + 1."""

    def __init__(self):
        self.calls, self.parts = [], {}

    def _keep(self, name, heads, term):
        self.parts.setdefault(name, []).append((heads, term.clone()))

    def dq(self, heads, ds, dq):
        self.calls.append(("dq", heads))
        self._keep("ds", heads, ds)
        self._keep("dq", heads, dq)
        dq.fill_(heads.start + 1)

    def dkdv(self, heads, ds, dk, dv):
        self.calls.append(("dkdv", heads))
        self._keep("dk", heads, dk)
        self._keep("dv", heads, dv)
        dk.fill_(heads.start + 1)
        dv.fill_(heads.start + 1)

    def term(self, name):
        """The recorded tensor over all heads (the groups' parts in head order)."""
        parts = self.parts[name]
        assert [h.start for h, _ in parts] == sorted(h.start for h, _ in parts)
        return torch.cat([t for _, t in parts], 1)


@pytest.mark.parametrize("scope,negl,budget", [("marginal", 0.25, 0.0), ("marginal", 0.25, 0.01), ("all", 0.0, 0.0),
                                               ("all", 0.0, 0.01)])
def test_linear_part_is_the_backward_without_its_sparse_loops(scope, negl, budget):
    """bwd.linear_part (the TileLang backward's first half): D^s and the linear branch's dq/dk/dv (full minus
    sparse-only gradients) written into the gradients' own views, handed to the caller's sparse loops head
    group by head group (all heads at once with temp_budget 0, the default; one head per group at these sizes
    with 0.01 in scope 'marginal'), dq first, each group writing its own heads of the gradients returned; and the very dW, db of
    the full backward. Sparse-only: the same two calls, D^s alone."""
    args = dict(scope=scope, negligible=negl, seed=7, H=3)
    p, cfg = make_problem(feature_map="elu", weight=True, bias=True, **args)
    sparse_p, sparse_cfg = make_problem(feature_map="none", **args)     # same q, k, v, dO and block map
    config = bwd.default_config(bwd.kernel_spec(p["q"], feature_map="elu", scope=scope, has_negligible=negl > 0,
                                                block_q=cfg["block_q"], block_k=cfg["block_k"]))
    config["prep"]["temp_budget"] = budget
    groups = 3 if budget and scope == "marginal" else 1     # scope 'all' has no per-head temporaries
    loops = SparseLoops()
    got = bwd.linear_part(*(p[name] for name in NAMES), sparse_dq=loops.dq, sparse_dkdv=loops.dkdv,
                          config=config, **cfg)
    heads = [h for kind, h in loops.calls if kind == "dq"]
    assert len(heads) == groups and loops.calls == [(kind, h) for h in heads for kind in ("dq", "dkdv")]
    for grad, x in zip(got[:3], (p["q"], p["k"], p["v"])):        # each group filled its own heads
        assert grad.dtype == x.dtype and grad.shape == x.shape
        for h in heads:
            assert torch.all(grad[:, h] == h.start + 1)
    full, sparse = triton_grads(p, cfg), triton_grads(sparse_p, sparse_cfg)
    for name, f, s, x in zip(GRADS, full, sparse, (p["q"], p["k"], p["v"])):
        term = loops.term(name)
        assert term.dtype == x.dtype and term.shape == x.shape, name
        assert rel(term, f - s) < 1e-4, name
    assert torch.allclose(got[3], full[3], rtol=1e-6, atol=1e-6) and torch.allclose(got[4], full[4], rtol=1e-6,
                                                                                     atol=1e-6)
    want_ds = (sparse_p["do"] * sparse_p["o"]).sum(-1)                 # rowsum(dO ⊙ O^s)
    assert loops.term("ds").shape == p["lse"].shape and rel(loops.term("ds"), want_ds) < 1e-5
    sparse_loops = SparseLoops()
    bwd.linear_part(*(sparse_p[name] for name in NAMES), sparse_dq=sparse_loops.dq, sparse_dkdv=sparse_loops.dkdv,
                    **sparse_cfg)
    assert [kind for kind, _ in sparse_loops.calls] == ["dq", "dkdv"]
    assert rel(sparse_loops.term("ds"), want_ds) < 1e-5


def unfused_linear_part(fmap, budget, *, block_q, block_k, bias, seed):
    """(problem, cfg, config, the linear part's gradients with its own linear kernels) of a marginal-scope call
    with negligible blocks and Proj, head-group budget ``budget``."""
    p, cfg = make_problem(Lq=130, Lk=77, D=16, block_q=block_q, block_k=block_k, feature_map=fmap,
                          scope="marginal", negligible=0.25, weight=True, bias=bias, seed=seed)
    config = bwd.default_config(bwd.kernel_spec(p["q"], feature_map=fmap, scope="marginal", has_negligible=True,
                                                block_q=block_q, block_k=block_k))
    config["prep"]["temp_budget"] = budget
    want = bwd.linear_part(*(p[n] for n in NAMES), sparse_dq=lambda *a: None, sparse_dkdv=lambda *a: None,
                           config=config, **cfg)
    return p, cfg, config, want


@pytest.mark.parametrize("fmap,budget", [("softmax", 0.0), ("elu", 0.01), ("relu", 0.0)])
def test_linear_part_hands_the_dkdv_terms_to_a_fused_kernel(monkeypatch, fmap, budget):
    """fused_dkdv: the dk / dv linear kernel does not run; the caller's dk / dv callback gets G_j, g_j per key
    block ((B·H_g·T_n', D, D), (B·H_g·T_n', D), T_n' = padded_rows(T_n) per head), from which dV_j = φ(K_j) G_j and
    dK_j = J_φ(K_j)ᵀ (V_j G_jᵀ + 1 g_jᵀ) are the unfused linear part's dk / dv terms (what a fused kernel adds)."""
    p, cfg, config, want = unfused_linear_part(fmap, budget, block_q=16, block_k=32, bias=False, seed=11)
    seen = []

    def fused_dkdv(heads, ds, dk, dv, terms):
        B, H, lk, d = dk.shape
        tn = -(-lk // 32)
        g, gz = (t.view(B, H, -1, *t.shape[1:])[:, :, :tn] for t in terms)
        x = reference.pad_rows(p["k"][:, heads].float(), 32).unflatten(-2, (tn, 32))
        phi = reference.feature_map(x, fmap)
        vb = reference.pad_rows(p["v"][:, heads].float(), 32).unflatten(-2, (tn, 32))
        dphi = vb @ g.float().transpose(-1, -2) + gz[..., None, :]
        if fmap == "softmax":
            dx = phi * (dphi - (dphi * phi).sum(-1, keepdim=True))
        else:
            dx = torch.autograd.functional.vjp(lambda t: reference.feature_map(t, fmap), x, dphi)[1]
        dk.copy_(dx.flatten(2, 3)[:, :, :lk])
        dv.copy_((phi @ g.float()).flatten(2, 3)[:, :, :lk])
        seen.append(heads)

    monkeypatch.setattr(bwd, "_dkdv", lambda *a: pytest.fail("the dk/dv linear kernel ran with fused_dkdv"))
    got = bwd.linear_part(*(p[n] for n in NAMES), sparse_dq=lambda *a: None, sparse_dkdv=fused_dkdv,
                          config=config, fused_dkdv=True, **cfg)
    assert len(seen) == (2 if budget else 1)        # head groups: one per head (H = 2) with the small budget
    for name, g, w in zip(("dk", "dv"), got[1:3], want[1:3]):
        assert rel(g, w) < 1e-5, name
    with pytest.raises(ValueError, match="fused_dq / fused_dkdv need scope 'marginal'"):
        bwd.linear_part(*(p[n] for n in NAMES), sparse_dq=lambda *a: None, sparse_dkdv=fused_dkdv,
                        config={**config, "prep": {**config["prep"], "marginal_states": "gather"}}, fused_dkdv=True,
                        **cfg)


@pytest.mark.parametrize("fmap,budget", [("softmax", 0.0), ("elu", 0.01), ("relu", 0.0)])
def test_linear_part_hands_the_dq_terms_to_a_fused_kernel(monkeypatch, fmap, budget):
    """fused_dq: the dq linear kernel does not run; the caller's dq callback gets H_i Wᵀ, Z_i per query block and
    D^l per row, from which dφ(Q_i) = (dO (H_i Wᵀ)ᵀ − D^l Z_iᵀ) / den and dQ_i = J_φ(Q_i)ᵀ dφ are the unfused
    linear part's dq term (what a fused kernel adds)."""
    p, cfg, config, want = unfused_linear_part(fmap, budget, block_q=32, block_k=16, bias=True, seed=12)
    seen = []

    def fused_dq(heads, ds, dq, terms):
        B, H, lq, d = dq.shape
        tm = -(-lq // 32)
        h, z = (t.view(B, H, -1, *t.shape[1:])[:, :, :tm] for t in terms[:2])
        dl = terms[2].view(B, H, lq)
        x = reference.pad_rows(p["q"][:, heads].float(), 32).unflatten(-2, (tm, 32))
        do = reference.pad_rows(p["do"][:, heads].float(), 32).unflatten(-2, (tm, 32))
        den = reference.pad_rows(p["den"][:, heads, :, None], 32).unflatten(-2, (tm, 32))
        dlb = reference.pad_rows(dl[..., None], 32).unflatten(-2, (tm, 32))
        dphi = (do @ h.float().transpose(-1, -2) - dlb * z[..., None, :]) / den
        dx = torch.autograd.functional.vjp(lambda t: reference.feature_map(t, fmap), x, dphi)[1]
        dq.copy_(dx.flatten(2, 3)[:, :, :lq])
        seen.append(heads)

    monkeypatch.setattr(bwd, "_dq", lambda *a: pytest.fail("the dq linear kernel ran with fused_dq"))
    got = bwd.linear_part(*(p[n] for n in NAMES), sparse_dq=fused_dq, sparse_dkdv=lambda *a: None, config=config,
                          fused_dq=True, **cfg)
    assert len(seen) == (2 if budget else 1)        # head groups: one per head (H = 2) with the small budget
    assert rel(got[0], want[0]) < 1e-5
    for g, w in zip(got[1:], want[1:]):            # dk, dv (linear terms), dW, db: as without fusion
        assert rel(g, w) < 1e-6


@pytest.mark.parametrize("sparse", [True, False], ids=["backward", "linear_part"])
def test_temporaries_are_freed_before_the_gradients_exist(monkeypatch, sparse):
    """The allocation order behind the backward's peak (scope 'marginal', GEMM states): the query state g is
    freed once ΔG is formed, before dk / dv's kernel runs; dk and dv are allocated just before that kernel
    (linear_part's kernels write the linear terms into the gradients: the same order)."""
    events, refs = [], {}
    real_query_state, real_dq, real_dkdv, real_grad = bwd._query_state, bwd._dq, bwd._dkdv, bwd._Grads.__call__

    def query_state(c):
        out = real_query_state(c)
        refs["g"] = weakref.ref(out[2])
        return out

    def dq_kernel(*args):
        events.append("dq kernel")
        return real_dq(*args)

    def dkdv_kernel(*args):
        events.append(("dkdv kernel", "g freed" if refs["g"]() is None else "g alive"))
        return real_dkdv(*args)

    def grad(self, name, heads=None):
        if name not in self._made:
            events.append(f"alloc {name}")
        return real_grad(self, name, heads)
    monkeypatch.setattr(bwd, "_query_state", query_state)
    monkeypatch.setattr(bwd, "_dq", dq_kernel)
    monkeypatch.setattr(bwd, "_dkdv", dkdv_kernel)
    monkeypatch.setattr(bwd._Grads, "__call__", grad)
    p, cfg = make_problem(feature_map="softmax", scope="marginal", negligible=0.2, seed=13)
    if sparse:
        bwd.backward(*(p[name] for name in NAMES), **cfg)
    else:
        loops = SparseLoops()
        bwd.linear_part(*(p[name] for name in NAMES), sparse_dq=loops.dq, sparse_dkdv=loops.dkdv, **cfg)
        assert [kind for kind, _ in loops.calls] == ["dq", "dkdv"]
    assert events == ["alloc dq", "dq kernel", "alloc dk", "alloc dv", ("dkdv kernel", "g freed")]


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_head_groups_give_the_gradients_of_one_group(layout):
    """The same gradients whether all heads run at once (temp_budget 0) or one head per group (the views of
    dq / dk / dv written in place; dW, db summed over the groups): B = 2 and a (B, L, H, D) layout make the
    head slices strided."""
    p, cfg = make_problem(B=2, H=3, feature_map="softmax", scope="marginal", negligible=0.2, weight=True,
                          bias=True, layout=layout, seed=11)
    spec = bwd.kernel_spec(p["q"], feature_map="softmax", scope="marginal", has_negligible=True,
                           block_q=cfg["block_q"], block_k=cfg["block_k"])
    got = {}
    for budget in (0.0, 1e-6):
        config = bwd.default_config(spec)
        config["prep"]["temp_budget"] = budget
        got[budget] = triton_grads(p, cfg, config)
    for name, one, per_head in zip(GRADS, got[0.0], got[1e-6]):
        assert per_head.stride() == one.stride(), name
        if name in ("dw", "db"):     # fp32 sums over the heads, in another order
            assert rel(per_head, one) < 1e-6, name
        else:                        # each head's kernels and sums are the same
            assert torch.equal(per_head, one), name


def test_head_groups_follow_the_temporary_budget():
    """_head_groups: the per-head temporaries of the GEMM states against temp_budget × q's bytes, at the
    headline shape's sizes (no kernel runs; linear_part's terms live in the gradients: no temporaries)."""
    B, H, L, D = 1, 12, 32760, 128
    q = torch.empty((B, H, L, D), dtype=torch.bfloat16, device="meta")
    maps = [torch.empty((B, H, 256, 512), dtype=torch.int8, device="meta")] + [
        torch.empty((B, H, 4), dtype=torch.int32, device="meta")] * 8
    spec = bwd.kernel_spec(q, block_q=128, block_k=64, feature_map="softmax", scope="marginal", has_negligible=False)
    lse = torch.empty((B, H, L), dtype=torch.float32, device="meta")

    def groups(budget, sparse=True, scope="marginal"):
        config = bwd.default_config(spec)
        config["prep"]["temp_budget"] = budget
        c = bwd._Call(spec.replace(scope=scope), config, None, q, q, q, q, q, lse, q, lse, maps, None, None, 1.0,
                      sparse)
        return [(h.start, h.stop) for h in bwd._head_groups(c)]

    # per head: g 8 MiB + h 16 + ΔH 8 = 32 MiB (then ΔG 16 + g 8); q is just under 96 MiB (L = 32760)
    assert groups(1.0) == [(h, h + 2) for h in range(0, 12, 2)]
    assert groups(1.25) == [(h, h + 3) for h in range(0, 12, 3)]
    assert groups(bwd.TEMP_BUDGET) == groups(0.0) == [(0, 12)] and groups(100.0) == [(0, 12)]
    assert groups(0.01) == [(h, h + 1) for h in range(12)]     # at least one head per group
    with pytest.MonkeyPatch.context() as mp:                     # the environment's policy beats the config
        mp.setenv(bwd.TEMP_BUDGET_ENV, "1.25")
        assert groups(0.0) == [(h, h + 3) for h in range(0, 12, 3)]
        mp.setenv(bwd.TEMP_BUDGET_ENV, "lots")
        with pytest.raises(ValueError, match=bwd.TEMP_BUDGET_ENV):
            groups(0.0)
    assert groups(1.0 * 5 / 12) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9),
                                    (9, 10), (10, 11), (11, 12)]
    assert groups(1.25, sparse=False) == groups(1.25)
    assert groups(1.25, scope="all") == groups(0.01, sparse=False, scope="all") == [(0, 12)]  # chunk partials only


def handmade_mask(B, H, tm, tn, negl):
    """A random class mask where query block 0 has no critical block and query block 1 no marginal block;
    with negligible blocks also the last (partial) key block is chosen by no query block."""
    pick = torch.rand((B, H, tm, tn), generator=torch.Generator().manual_seed(3))
    mask = (pick < 0.35).to(torch.int8)
    if negl:
        mask[pick > 0.8] = -1
    mask[..., 0, :].clamp_(max=0)
    mask[..., 1, :] = 1
    if negl:
        mask[..., tn - 1].clamp_(max=0)
        mask[..., 1, tn - 1] = -1
    return mask


@pytest.mark.parametrize("scope,fmap,negl", [("marginal", "softmax", True), ("marginal", "relu", False),
                                             ("all", "softmax", True), ("marginal", "none", True)])
def test_handmade_mask_edge_cases(scope, fmap, negl):
    B, H, lq, lk, bq, bk = 2, 2, 77, 130, 16, 32
    tm, tn = reference.num_blocks(lq, bq), reference.num_blocks(lk, bk)
    mask = handmade_mask(B, H, tm, tn, negl)
    assert (mask[..., 0, :] != 1).all() and (mask[..., 1, :] != 0).all()
    assert not negl or (mask[..., tn - 1] != 1).all()
    p, cfg = make_problem(B=B, H=H, Lq=lq, Lk=lk, D=16, block_q=bq, block_k=bk, feature_map=fmap, scope=scope,
                          weight=fmap != "none", bias=fmap != "none", mask=mask, seed=11)
    assert torch.isinf(p["lse"][:, :, :bq]).all()
    check(p, cfg, 1e-4)


@pytest.mark.parametrize("negl", [0.0, 0.25])
def test_marginal_states_gather_and_gemm_agree_with_the_reference(negl):
    """Both ways of forming the marginal-scope states (prep.marginal_states) give the reference gradients."""
    p, cfg = make_problem(Lq=130, Lk=77, D=16, block_q=16, block_k=32, feature_map="softmax", scope="marginal",
                          negligible=negl, weight=True, bias=False, seed=21)
    spec = bwd.kernel_spec(p["q"], block_q=16, block_k=32, feature_map="softmax", scope="marginal",
                           has_negligible=negl > 0)
    got = {}
    for mode in bwd.MARGINAL_STATES:
        config = bwd.default_config(spec)
        config["prep"]["marginal_states"] = mode
        got[mode] = check(p, cfg, 1e-4, config=config)
    for name, a, b in zip(GRADS[:4], got["gemm"], got["gather"]):   # q, k, v, proj_weight (no bias here)
        assert rel(a, b) < 1e-4, name


def test_marginal_states_relaunch_their_operand_kernel_by_the_mask_layout(monkeypatch):
    """The backward's marginal-state operand kernel went through Triton's per-call argument binding every call
    (~50 µs of host time, session 33): it now has a relaunch key made of the mask's layout and the states' shape
    and dtype — the same for two calls of one shape, different for the query side's mask and its transpose."""
    from slagen.backends.triton import fwd
    keys = []
    real = fwd.mask_operands

    def spy(*args, relaunch_key=None, **kw):
        keys.append(relaunch_key)
        return real(*args, relaunch_key=relaunch_key, **kw)
    monkeypatch.setattr(fwd, "mask_operands", spy)
    p, cfg = make_problem(Lq=130, Lk=77, D=16, block_q=16, block_k=32, feature_map="softmax", scope="marginal",
                          seed=5)
    first = check(p, cfg, 1e-4)
    assert len(keys) == 2 and all(isinstance(key, tuple) and None not in key for key in keys)
    assert keys[0] != keys[1]            # H_i over the mask, G_j over its transpose
    again = triton_grads(p, cfg)
    assert keys[2:] == keys[:2]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def forward_sums(p, cfg):
    """H_i = Σ_{j marginal} φ(K_j)ᵀV_j (B, H, T_m, D, D) and Z_i (B, H, T_m, D) fp32 — what a forward with
    states=True keeps — written out here from the reference's pieces."""
    bk, mask = cfg["block_k"], p["maps"][0]
    tn = mask.shape[-1]
    phi = reference.pad_rows(reference.feature_map(p["k"].float(), cfg["feature_map"]), bk).unflatten(-2, (tn, bk))
    vb = reference.pad_rows(p["v"].float(), bk).unflatten(-2, (tn, bk))
    a = (mask == 0).float()
    h = torch.einsum("bhmn,bhnde->bhmde", a, phi.transpose(-1, -2) @ vb)
    return h.to(p["q"].dtype), torch.einsum("bhmn,bhnd->bhmd", a, phi.sum(-2))


@pytest.mark.parametrize("weight,negl,saved", [(True, 0.25, True), (False, 0.0, True), (True, 0.25, False),
                                                (False, 0.0, False)])
def test_forward_sums_replace_the_key_states(monkeypatch, weight, negl, saved):
    """Given the forward's H_i, Z_i (lin_sums), the backward skips the key-state kernel (and the H_i GEMM) and
    gives the same gradients (Proj's W applied to the given H_i). Without a saved O^l and den (``saved`` False:
    what a forward that keeps the sums saves), the query-state and Proj-grad kernels form them from the sums."""
    p, cfg = make_problem(Lq=130, Lk=77, D=16, block_q=16, block_k=32, feature_map="softmax", scope="marginal",
                          negligible=negl, weight=weight, bias=True, seed=5)
    sums = forward_sums(p, cfg)
    want = triton_grads(p, cfg)
    monkeypatch.setattr(bwd, "_key_state", lambda c: pytest.fail("the key-state kernel ran although H_i was given"))
    given = p if saved else dict(p, o_lin=p["q"].new_empty((0,)), den=p["den"].new_empty((0,)))
    got = bwd.backward(*(given[n] for n in NAMES), **cfg, lin_sums=sums)
    ref = reference_grads(p, cfg)
    for name, g, w, r in zip(GRADS, got, want, ref):
        if r.numel():
            assert rel(g, w) < 1e-5 and rel(g, r) < 1e-4, name
    with pytest.raises(ValueError, match=r"lin_sums\[0\] \(H_i\) must be"):
        bwd.backward(*(p[n] for n in NAMES), **cfg, lin_sums=(sums[0][:, :, :1], sums[1]))


@pytest.mark.parametrize("budget", [0.0, 0.001])     # one head group; one head per group
def test_sums_given_as_a_list_are_released_before_the_last_dkdv(monkeypatch, budget):
    """lin_sums as a list (the caller's last references): the backward empties it once the last head group's
    dq has run, so H_i and Z_i are freed (no view left either) when that group's dk / dv kernel starts; the
    gradients are those of the same sums given as a tuple (not released)."""
    p, cfg = make_problem(Lq=130, Lk=77, D=16, block_q=16, block_k=32, feature_map="softmax", scope="marginal",
                          weight=True, bias=False, seed=8)
    given = dict(p, o_lin=p["q"].new_empty((0,)), den=p["den"].new_empty((0,)))
    spec = bwd.kernel_spec(p["q"], block_q=16, block_k=32, feature_map="softmax", scope="marginal",
                           has_negligible=False)
    config = bwd.default_config(spec)
    config["prep"]["temp_budget"] = budget
    want = bwd.backward(*(given[n] for n in NAMES), **cfg, config=config, lin_sums=forward_sums(p, cfg))
    sums = list(forward_sums(p, cfg))
    alive = [weakref.ref(t) for t in sums]
    seen = []
    real = bwd._dkdv
    monkeypatch.setattr(bwd, "_dkdv", lambda *a: (seen.append([r() is not None for r in alive]), real(*a)))
    got = bwd.backward(*(given[n] for n in NAMES), **cfg, config=config, lin_sums=sums)
    assert sums == []
    groups = p["q"].shape[1] if budget else 1
    assert seen == [[True, True]] * (groups - 1) + [[False, False]]
    for name, g, w in zip(GRADS, got, want):
        assert torch.equal(g, w), name


def test_autograd_hands_the_kept_sums_over_and_forms_them_again_for_a_second_backward(monkeypatch):
    """The eager autograd path (slagen.ops) keeps a forward's H_i, Z_i in a list that it hands to the backward
    (which empties it); a second backward of the same graph (retain_graph) runs the forward again for them and
    gets the same gradients. Here the Triton backend stands in for one that keeps the sums (its forward's
    sums written out from the reference, O^l and den not saved)."""
    from slagen import backends, ops
    p, cfg = make_problem(Lq=130, Lk=77, D=16, block_q=16, block_k=32, feature_map="softmax", scope="marginal",
                          seed=9)
    triton = backends.get("triton")
    calls = []

    class KeepsSums:
        @staticmethod
        def forward(q, k, v, maps, w, b, save, states=False, **kw):
            o, lse = triton.forward(q, k, v, maps, w, b, save, **kw)[:2]
            assert states
            calls.append("forward")
            h, z = forward_sums(dict(p, k=k.detach(), v=v.detach()), kw)
            return o, lse, q.new_empty((0,)), lse.new_empty((0,)), h, z

        @staticmethod
        def backward(*args, lin_sums=None, **kw):
            calls.append(type(lin_sums).__name__)
            out = triton.backward(*args, lin_sums=lin_sums, **kw)
            calls.append(len(lin_sums))
            return out
    monkeypatch.setattr(backends, "keeps_linear_sums", lambda name, save, fmap, scope: save)
    monkeypatch.setattr(backends, "get", lambda name: KeepsSums)
    q, k, v = (p[n].clone().requires_grad_(True) for n in "qkv")
    out = ops.forward(q, k, v, p["maps"], None, None, cfg["block_q"], cfg["block_k"], cfg["scale"],
                      cfg["feature_map"], cfg["scope"], cfg["eps"], True, "triton")
    first = torch.autograd.grad(out, (q, k, v), p["do"], retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), p["do"])
    assert calls == ["forward", "list", 0, "forward", "list", 0]
    for name, a, b, r in zip(GRADS, first, second, reference_grads(p, cfg)):
        assert torch.equal(a, b) and rel(a, r) < 1e-4, name


def test_non_default_tiles():
    """Sub-tiled programs and inner steps (tiles smaller than the selection blocks), small prep chunks."""
    p, cfg = make_problem(Lq=130, Lk=77, D=16, block_q=32, block_k=32, feature_map="softmax", scope="marginal",
                          negligible=0.25, weight=True, bias=True, seed=2)
    config = {"dq": dict(block_m=16, block_n=16, num_warps=4, num_stages=1),
              "dkdv": dict(block_m=16, block_n=16, num_warps=4, num_stages=1),
              "prep": dict(rows=16, chunk=3, num_warps=4, num_stages=1, marginal_states="gather")}
    check(p, cfg, 1e-4, config=config)


def test_default_config_per_arch():
    from slagen.spec import ARCHS, KernelSpec
    for arch in ARCHS:
        for d in bwd.HEAD_DIMS:
            spec = KernelSpec(arch=arch, head_dim=d, block_q=128, block_k=64, role="backward")
            cfg = bwd.check_config(bwd.default_config(spec), spec)
            assert cfg["dq"]["block_m"] <= 128 and cfg["dkdv"]["block_n"] <= 64


def test_clear_errors():
    p, cfg = make_problem(Lq=40, Lk=40, D=16, block_q=16, block_k=16, weight=True)
    with pytest.raises(ValueError, match="dq.block_m=24"):
        bad = bwd.default_config(bwd.kernel_spec(p["q"], block_q=16, block_k=16, feature_map="softmax",
                                                 scope="marginal", has_negligible=False))
        bad["dq"]["block_m"] = 24
        triton_grads(p, cfg, bad)
    with pytest.raises(ValueError, match="prep.marginal_states='fast'"):
        bad = bwd.default_config(bwd.kernel_spec(p["q"], block_q=16, block_k=16, feature_map="softmax",
                                                 scope="marginal", has_negligible=False))
        bad["prep"]["marginal_states"] = "fast"
        triton_grads(p, cfg, bad)
    with pytest.raises(ValueError, match="o_lin must have shape"):
        triton_grads(dict(p, o_lin=p["q"].new_empty((0,))), cfg)
    with pytest.raises(ValueError, match="feature_map='none' has no linear branch"):
        triton_grads(p, dict(cfg, feature_map="none"))
    with pytest.raises(ValueError, match="head_dim=8"):
        q = torch.randn(1, 1, 16, 8)
        bwd.backward(q, q, q, q, q, torch.zeros(1, 1, 16), q, torch.ones(1, 1, 16),
                     list(BlockMap.from_mask(torch.ones(1, 1, 1, 1), block_q=16, block_k=16).tensors()),
                     None, None, **dict(cfg, scale=0.3))


# ------------------------------------------------------------------------------------------------ GPU tests

def poison_allocator(device):
    """Fill half the free memory with NaN and leave it in PyTorch's cache, so that the buffers the backward
    allocates itself (outputs, states) start as NaN."""
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0]
    junk = torch.empty(int(free * 0.5) // 4, dtype=torch.float32, device=device).fill_(math.nan)
    del junk


GPU_CASES = [
    # L, H, D, dtype, scope, negligible, block_q, block_k, feature_map, weight
    (32760, 2, 128, torch.bfloat16, "marginal", 0.0, 128, 64, "softmax", True),
    (32760, 2, 128, torch.bfloat16, "marginal", 0.1, 128, 64, "softmax", True),
    (32760, 2, 128, torch.bfloat16, "all", 0.0, 128, 64, "softmax", True),
    (32760, 2, 128, torch.bfloat16, "all", 0.1, 64, 64, "elu", False),
    (32760, 2, 64, torch.bfloat16, "marginal", 0.1, 64, 64, "relu", True),
    (32760, 2, 64, torch.float16, "all", 0.0, 128, 64, "softmax", True),
    (32760, 2, 128, torch.float16, "marginal", 0.1, 128, 64, "softmax", False),
    (32760, 2, 128, torch.bfloat16, "marginal", 0.0, 128, 64, "none", False),
    (75600, 1, 128, torch.bfloat16, "marginal", 0.1, 128, 64, "softmax", True),
    (75600, 1, 64, torch.bfloat16, "all", 0.0, 64, 64, "softmax", True),
]


def check_realistic(L, H, D, dtype, scope, negl, bq, bk, fmap, weight, layout, device="cuda", tol=3e-2):
    """Every gradient at B=1 vs the fp32 reference of the same (upcast) inputs, kernel buffers poisoned;
    a second run must give bitwise the same gradients (no atomics)."""
    p, cfg = make_problem(B=1, H=H, Lq=L, Lk=L, D=D, block_q=bq, block_k=bk, feature_map=fmap, scope=scope,
                          topk=0.05, negligible=negl, weight=weight, bias=weight, layout=layout, dtype=dtype,
                          device=device, seed=L + D)
    want = reference_grads(p, cfg)
    if p["q"].is_cuda:
        poison_allocator(p["q"].device)
    got = triton_grads(p, cfg)
    for name, g, w in zip(GRADS, got, want):
        if w.numel():
            assert torch.isfinite(g).all(), name
            assert rel(g, w) < tol, f"{name}: relative error {rel(g, w):.2e}"
    if p["q"].is_cuda:
        poison_allocator(p["q"].device)
    for name, g, again in zip(GRADS, got, triton_grads(p, cfg)):
        assert torch.equal(g, again), f"{name} is not deterministic"


# Both layouts up to L = 32760; the largest length in one layout only, to keep the GPU run short.
GPU_LAYOUT_CASES = [case + (layout,) for case in GPU_CASES for layout in ("bhld", "blhd")
                    if layout == "bhld" or case[0] <= 32760]


@pytest.mark.parametrize("L,H,D,dtype,scope,negl,bq,bk,fmap,weight,layout", GPU_LAYOUT_CASES)
@pytest.mark.gpu
@needs_cuda
def test_gpu_realistic_shapes(L, H, D, dtype, scope, negl, bq, bk, fmap, weight, layout):
    check_realistic(L, H, D, dtype, scope, negl, bq, bk, fmap, weight, layout)
