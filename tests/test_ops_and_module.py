"""torch.library registration (opcheck, fullgraph compile) and the nn.Module."""

import copy

import pytest
import torch

import slagen
from slagen import ops


def inputs(lq=45, lk=70, d=8, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, d, generator=g, requires_grad=requires_grad) for n in (lq, lk, lk))
    return q, k, v


def test_opcheck_block_map():
    q, k, _ = inputs()
    torch.library.opcheck(ops.block_map_op, (q, k, 0.3, 0.2, 16, 16, "torch"))


@pytest.mark.parametrize("fmap,proj", [("softmax", True), ("relu", False), ("none", False)])
def test_opcheck_forward_and_backward(fmap, proj):
    q, k, v = inputs(requires_grad=True)
    maps = list(slagen.block_map(q, k, topk=0.3, negligible=0.2, block_q=16, block_k=16).tensors())
    w = torch.randn(8, 8, requires_grad=True) if proj else None
    b = torch.randn(8, requires_grad=True) if proj else None
    torch.library.opcheck(ops.sla_fwd, (q, k, v, maps, w, b, 16, 16, 0.3, fmap, "marginal", 1e-5, True, "torch"))


@pytest.mark.parametrize("backend,scope", [("tilelang", "marginal"), ("tilelang", "all"), ("triton", "marginal")])
def test_forward_fake_saves_o_lin_or_the_sums(backend, scope):
    """The operator's fake forward (the shapes torch.compile traces with) saves what the backend's forward saves:
    a forward that keeps H_i, Z_i (slagen.backends.keeps_linear_sums) saves no O^l or den, the others O^l and
    den and no sums."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = inputs()
    maps = list(slagen.block_map(q, k, topk=0.3, block_q=16, block_k=16).tensors())
    with FakeTensorMode(allow_non_fake_inputs=True):
        o, lse, o_lin, den, h_lin, z_lin = ops.sla_fwd(q, k, v, maps, None, None, 16, 16, 0.3, "softmax", scope,
                                                       1e-5, True, backend)
    kept = backend == "tilelang" and scope == "marginal"
    assert o.shape == q.shape and lse.shape == q.shape[:-1]
    assert tuple(o_lin.shape) == ((0,) if kept else tuple(q.shape))
    assert tuple(den.shape) == ((0,) if kept else tuple(q.shape[:-1]))
    assert tuple(h_lin.shape) == ((2, 2, 3, 8, 8) if kept else (0,))       # T_m = ceil(45 / 16) = 3
    assert tuple(z_lin.shape) == ((2, 2, 3, 8) if kept else (0,)) and z_lin.dtype == torch.float32


@pytest.mark.parametrize("backend,d", [("torch", 8), ("triton", 16)])
def test_fullgraph_compile_has_no_graph_break(backend, d):
    model = slagen.SparseLinearAttention(d, topk=0.3, block_q=16, block_k=16, backend=backend)
    torch.nn.init.normal_(model.proj_l.weight)
    q, k, v = inputs(d=d, requires_grad=True)
    if backend != "torch":      # resolved on an eager call first: resolving a kernel backend imports it, which
        model(q, k, v)          # Dynamo cannot trace (a graph break on a first call that is compiled)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    assert torch.allclose(out, model(q, k, v), atol=1e-6)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and model.proj_l.weight.grad.abs().sum() > 0


def test_module_zero_init_is_pure_sparse_attention():
    model = slagen.SparseLinearAttention(8, topk=0.3, block_q=16, block_k=16)
    assert model.proj_l.weight.dtype == torch.float32
    assert torch.all(model.proj_l.weight == 0) and torch.all(model.proj_l.bias == 0)
    q, k, v = inputs()
    sparse = slagen.attention(q, k, v, topk=0.3, feature_map=None, block_q=16, block_k=16)
    assert torch.allclose(model(q, k, v), sparse, atol=1e-6)


def test_module_loads_a_thu_ml_state_dict_and_uses_it():
    model = slagen.SparseLinearAttention(8, topk=0.3, block_q=16, block_k=16, layout="blhd")
    state = {"proj_l.weight": torch.randn(8, 8), "proj_l.bias": torch.randn(8)}
    model.load_state_dict(state)
    assert set(model.state_dict()) == {"proj_l.weight", "proj_l.bias"}
    q, k, v = (t.transpose(1, 2) for t in inputs())          # (B, L, H, D)
    out = model(q, k, v)
    want = slagen.attention(q, k, v, topk=0.3, block_q=16, block_k=16, layout="blhd",
                            proj_weight=state["proj_l.weight"], proj_bias=state["proj_l.bias"])
    assert out.shape == q.shape and torch.allclose(out, want)


def test_sparse_only_module_has_no_parameters():
    assert list(slagen.SparseLinearAttention(8, feature_map=None).parameters()) == []


@pytest.mark.parametrize("fmap,proj,scope,backend", [("softmax", True, "marginal", "torch"),
                                                     ("elu", False, "all", "torch"),
                                                     ("none", False, "marginal", "torch"),
                                                     ("softmax", True, "marginal", "triton")])
def test_eager_path_equals_the_operator_path(fmap, proj, scope, backend):
    """ops.forward / ops.block_map skip the operator dispatch in eager mode: same outputs and gradients,
    bitwise, as the torch.library operators and their autograd formula (Triton: under its interpreter)."""
    q, k, v = inputs(d=16, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(16, 16, generator=g)) if proj else None
    b = torch.nn.Parameter(torch.randn(16, generator=g)) if proj else None
    maps = ops.block_map(q.detach(), k.detach(), 0.3, 0.2, 16, 16, backend)
    for got, want in zip(maps, ops.block_map_op(q.detach(), k.detach(), 0.3, 0.2, 16, 16, backend)):
        assert torch.equal(got, want)
    args = (list(maps), w, b, 16, 16, 0.3, fmap, scope, 1e-5, True, backend)
    do = torch.randn(q.shape, generator=g)
    leaves = [t for t in (q, k, v, w, b) if t is not None]
    out = ops.forward(q, k, v, *args)
    grads = torch.autograd.grad(out, leaves, do)
    out_op = ops.sla_fwd(q, k, v, *args)[0]
    grads_op = torch.autograd.grad(out_op, leaves, do)
    assert torch.equal(out, out_op)
    for got, want in zip(grads, grads_op):
        assert torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(ops.forward(q, k, v, *args[:-2], False, backend), out_op)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_call_that_is_not_differentiated_builds_no_column_tables(monkeypatch, backend):
    """The column tables serve only the backward: attention builds its map without them when it saves
    nothing (no grad), with them when it does, and gives the same output as with a full map; a forward that
    saves refuses a map without them."""
    from slagen import blockmap
    seen = []
    block_map = ops.block_map

    def spy(q, k, topk, negligible, block_q, block_k, backend, columns=True, pooled=None):
        seen.append(columns)
        return block_map(q, k, topk, negligible, block_q, block_k, backend, columns, pooled)
    monkeypatch.setattr(ops, "block_map", spy)
    q, k, v = inputs(d=16)
    cfg = dict(topk=0.3, negligible=0.2, block_q=16, block_k=16, backend=backend)
    full = slagen.block_map(q, k, **cfg)
    assert full.has_columns
    got = slagen.attention(q, k, v, **cfg)
    assert torch.equal(got, slagen.attention(q, k, v, block_map=full, **cfg))
    qg = q.clone().requires_grad_(True)
    slagen.attention(qg, k, v, **cfg).sum().backward()
    assert seen[1:] == [False, True] and qg.grad.abs().sum() > 0      # (seen[0]: the public block_map)
    lean = blockmap.BlockMap(*ops.block_map(q, k, 0.3, 0.2, 16, 16, backend, False), block_q=16, block_k=16)
    assert not lean.has_columns
    with pytest.raises(ValueError, match="column tables"):
        ops.forward(qg, k, v, list(lean.tensors()), None, None, 16, 16, 0.25, "softmax", "marginal", 1e-5, True,
                    backend)


def test_a_broadcast_output_gradient_is_accepted():
    """out.sum().backward() hands the backward a dO with zero strides: the same gradients as an explicit ones."""
    q, k, v = inputs(d=16, requires_grad=True)
    cfg = dict(topk=0.3, block_q=16, block_k=16, backend="triton")
    slagen.attention(q, k, v, **cfg).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out = slagen.attention(q, k, v, **cfg)
    out.backward(torch.ones_like(out))
    for g, t in zip(got, (q, k, v)):
        assert torch.equal(g, t.grad) and g.abs().sum() > 0


def test_the_backward_gets_no_zero_gradients_of_the_saved_outputs(monkeypatch):
    """Only O is differentiated: the eager path's backward is handed None, not materialised zero tensors, for
    the other outputs (lse, O^l, den, H_i, Z_i — at the headline shape O^l's and H_i's zeros were 2 × 96 MiB of
    the f+b peak); the operator's (which does the same) gives the same gradients."""
    seen = []
    original = ops._Forward.backward

    def spy(ctx, do, *rest):
        seen.append(rest)
        return original(ctx, do, *rest)
    monkeypatch.setattr(ops._Forward, "backward", staticmethod(spy))
    q, k, v = inputs(d=16, requires_grad=True)
    cfg = dict(topk=0.3, block_q=16, block_k=16, backend="torch")
    slagen.attention(q, k, v, **cfg).square().sum().backward()
    assert len(seen) == 1 and len(seen[0]) == 5 and all(g is None for g in seen[0]), seen
    eager = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    maps = list(ops.block_map(q.detach(), k.detach(), 0.3, 0.0, 16, 16, "torch"))
    out = ops.sla_fwd(q, k, v, maps, None, None, 16, 16, 0.25, "softmax", "marginal", 1e-5, True, "torch")
    out[0].square().sum().backward()
    for g, t in zip(eager, (q, k, v)):
        assert torch.allclose(g, t.grad, rtol=1e-5, atol=1e-6) and g.abs().sum() > 0


def test_eager_path_is_skipped_for_tensor_subclasses_and_while_compiling(monkeypatch):
    class Sub(torch.Tensor):
        pass
    plain, param = torch.zeros(2), torch.nn.Parameter(torch.zeros(2))
    assert ops.direct(plain, param, None)
    assert not ops.direct(plain, plain.as_subclass(Sub))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not ops.direct(plain)


def test_eager_path_serves_torch_func_grad():
    q, k, v = inputs(d=16)
    def loss(q_):
        return slagen.attention(q_, k, v, topk=0.3, block_q=16, block_k=16, backend="torch").square().sum()
    got = torch.func.grad(loss)(q)
    q_ = q.clone().requires_grad_(True)
    want, = torch.autograd.grad(loss(q_), q_)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6) and got.abs().sum() > 0


def test_kernel_backend_under_torch_func_grad_is_a_clear_error():
    """The kernel backends cannot read functorch's wrapped tensors: a clear error, not a crash inside a kernel
    launch (attention and block_map)."""
    q, k, v = inputs(d=16)
    def loss(q_):
        return slagen.attention(q_, k, v, topk=0.3, block_q=16, block_k=16, backend="triton").square().sum()
    with pytest.raises(ValueError, match=r"backend='triton' \(served by 'triton'\) cannot run under torch.func"):
        torch.func.grad(loss)(q)
    with pytest.raises(ValueError, match="cannot run under torch.func"):
        torch.func.vmap(lambda q_: slagen.block_map(q_, k, topk=0.3, block_q=16, block_k=16,
                                                    backend="triton").mask)(q.unsqueeze(0))


def test_overlap_of_the_block_map_is_opt_in_and_cuda_only(monkeypatch):
    """SLAGEN_OVERLAP_BLOCK_MAP=1 puts the block map on a side stream only for CUDA eager calls with a linear
    branch on a kernel backend; elsewhere (here: CPU) the call runs as without it, bitwise, and a maps_ready
    event is refused on the operator path."""
    from slagen import api
    q, k, v = inputs(d=16)
    want = slagen.attention(q, k, v, topk=0.3, block_q=16, block_k=16, backend="triton")
    monkeypatch.setenv(api.OVERLAP_ENV, "1")
    assert not api._overlaps_block_map("triton", "softmax", q, k, v, None, None)       # CPU tensors
    assert torch.equal(slagen.attention(q, k, v, topk=0.3, block_q=16, block_k=16, backend="triton"), want)
    class Sub(torch.Tensor):
        pass
    maps = list(ops.block_map(q, k, 0.3, 0.0, 16, 16, "torch"))
    with pytest.raises(ValueError, match="maps_ready"):
        ops.forward(q.as_subclass(Sub), k, v, maps, None, None, 16, 16, 0.25, "softmax", "marginal", 1e-5, False,
                    "torch", maps_ready=object())


def test_side_streams_are_made_once_per_device_and_role(monkeypatch):
    """backends.side_stream: one stream per (device, role), made at first use and handed out again after (the
    block map's overlap and the TileLang pooling each keep their own); torch.cuda.Stream stubbed (no GPU here)."""
    from slagen import backends
    made = []
    monkeypatch.setattr(backends, "_SIDE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(device) or object())
    a, b = torch.device("cuda", 0), torch.device("cuda", 1)
    first = backends.side_stream(a, "pool")
    assert backends.side_stream(a, "pool") is first
    assert backends.side_stream(a, "block_map") is not first
    assert backends.side_stream(b, "pool") is not first
    assert made == [a, a, b]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on the device)")
@pytest.mark.parametrize("backend", ["triton", "tilelang"])
def test_gpu_overlapped_block_map_gives_the_same_outputs_and_gradients(monkeypatch, backend):
    """With the block map on a side stream (SLAGEN_OVERLAP_BLOCK_MAP=1) the forward and every gradient equal
    the serial call's, bitwise, at a length where the kernels overlap (L = 32760, H = 12, 128x64 blocks)."""
    from slagen import api
    from slagen.backends import tilelang
    if backend == "tilelang" and (torch.cuda.get_device_capability() != (9, 0) or tilelang.tilelang_import_error()):
        pytest.skip("the TileLang backend needs a Hopper GPU and tilelang installed")
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, do = (torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    results = []
    for overlap in ("0", "1"):
        monkeypatch.setenv(api.OVERLAP_ENV, overlap)
        qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = slagen.attention(qs, ks, vs, topk=0.05, block_q=128, block_k=64, backend=backend)
        results.append((out, *torch.autograd.grad(out, (qs, ks, vs), do)))
    torch.cuda.synchronize()
    for serial, overlapped in zip(*results):
        assert torch.equal(serial, overlapped)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on the device)")
@pytest.mark.parametrize("backend", ["triton", "tilelang"])
def test_gpu_inference_map_without_columns_gives_the_same_output(backend):
    """An attention call without grad builds its map without the column tables; its output equals, bitwise,
    the call given the full map, and a broadcast dO (out.sum().backward()) reaches the kernel backward."""
    from slagen.backends import tilelang
    if backend == "tilelang" and (torch.cuda.get_device_capability() != (9, 0) or tilelang.tilelang_import_error()):
        pytest.skip("the TileLang backend needs a Hopper GPU and tilelang installed")
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, 4, 4099, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    cfg = dict(topk=0.05, block_q=128, block_k=64, backend=backend)
    full = slagen.block_map(q, k, **cfg)
    with torch.no_grad():
        lean = slagen.attention(q, k, v, **cfg)
        given = slagen.attention(q, k, v, block_map=full, **cfg)
    assert torch.equal(lean, given)
    qs = q.clone().requires_grad_(True)
    slagen.attention(qs, k, v, **cfg).sum().backward()
    assert torch.isfinite(qs.grad).all() and qs.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on the device)")
@pytest.mark.parametrize("backend", ["triton", "tilelang"])
def test_gpu_graphed_module_gives_the_eager_outputs_and_gradients(backend):
    """The README's recipe for host-bound training at short lengths: torch.cuda.make_graphed_callables on a
    SparseLinearAttention (block map, forward and backward captured once, replayed on the inputs of each call)
    gives, on new inputs, the eager module's output and gradients of q, k, v and Proj's weight and bias, bitwise."""
    from slagen.backends import tilelang
    if backend == "tilelang" and (torch.cuda.get_device_capability() != (9, 0) or tilelang.tilelang_import_error()):
        pytest.skip("the TileLang backend needs a Hopper GPU and tilelang installed")
    g = torch.Generator(device="cuda").manual_seed(7)
    module = slagen.SparseLinearAttention(128, topk=0.05, block_q=128, block_k=64, backend=backend).cuda()
    with torch.no_grad():      # a trained Proj (the zero init would leave the linear branch out of the output)
        module.proj_l.weight.copy_(torch.randn(128, 128, device="cuda", generator=g) * 0.1)
        module.proj_l.bias.copy_(torch.randn(128, device="cuda", generator=g) * 0.1)

    def qkv():
        return [torch.randn(1, 2, 4099, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
                for _ in range(3)]
    eager = copy.deepcopy(module)          # (make_graphed_callables graphs a module in place)
    graphed = torch.cuda.make_graphed_callables(module, tuple(qkv()))
    for _ in range(2):
        q, k, v = qkv()
        do = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g)
        got_out = graphed(q, k, v)
        got = [got_out.detach().clone()] + [t.clone() for t in torch.autograd.grad(
            got_out, [q, k, v, *graphed.parameters()], do)]
        want_out = eager(q, k, v)
        want = [want_out.detach()] + list(torch.autograd.grad(want_out, [q, k, v, *eager.parameters()], do))
        for name, a, b in zip(("out", "dq", "dk", "dv", "dw", "db"), got, want):
            assert torch.equal(a, b), (name, ((a.float() - b.float()).norm() / b.float().norm()).item())
