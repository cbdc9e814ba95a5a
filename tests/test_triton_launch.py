"""The Triton relaunch path (backends/triton/launch.py): binding, the specialisation key, when it is used.

CPU tests drive FastKernel with a stand-in for Triton's compile-and-launch (no GPU here); the GPU test
(tests/test_triton_blockmap.py, ``-m gpu``) compares the relaunched kernels' outputs with the JIT path's.
"""

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from slagen.backends.triton import launch


def _kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = True):
    pass


class _Compiled:
    """Stands in for a CompiledKernel: records each relaunch (grid, arguments)."""

    def __init__(self, log):
        self.log = log

    def run(self):   # the attribute FastKernel checks for
        raise AssertionError("not called directly")

    def __getitem__(self, grid):
        return lambda *values: self.log.append(("relaunch", grid, values))


class _Jit:
    """Stands in for the JITFunction's own launch: records each call, returns a _Compiled."""

    def __init__(self, fn, log):
        self.params, self.log = fn.params, log

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log)
        return run


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    log = []
    fk = launch.FastKernel(JITFunction(_kernel))
    fk.fn = _Jit(fk.fn, log)
    return fk, log


def test_first_call_goes_through_triton_then_relaunches_with_every_parameter_in_order(kernel):
    fk, log = kernel
    x, y = torch.randn(64), torch.randn(64)
    fk[(4,)](x, y, 64, 0.5, BLOCK=32, num_warps=4)
    fk[(5, 2)](x, y, 64, 0.25, BLOCK=32, num_warps=4)
    assert log[0] == ("jit", (4,), (x, y, 64, 0.5), dict(BLOCK=32, num_warps=4))
    kind, grid, values = log[1]
    assert (kind, grid) == ("relaunch", (5, 2, 1))
    assert values[2:] == (64, 0.25, 32, True) and values[0] is x and values[1] is y   # FLAG's default filled in


@pytest.mark.parametrize("change", ["alignment", "dtype", "int_is_one", "int_multiple_of_16", "int_width",
                                    "constexpr", "option"])
def test_a_different_specialisation_goes_through_triton_again(kernel, change):
    fk, log = kernel
    buf = torch.randn(80)
    base = dict(x=buf[:64], n=64, BLOCK=32, warps=4)
    fk[(1,)](base["x"], buf, base["n"], 1.0, BLOCK=base["BLOCK"], num_warps=base["warps"])
    new = dict(base)
    new.update({"alignment": dict(x=buf[1:65]), "dtype": dict(x=buf[:64].double()), "int_is_one": dict(n=1),
                "int_multiple_of_16": dict(n=65), "int_width": dict(n=2 ** 40), "constexpr": dict(BLOCK=64),
                "option": dict(warps=8)}[change])
    fk[(1,)](new["x"], buf, new["n"], 1.0, BLOCK=new["BLOCK"], num_warps=new["warps"])
    assert [entry[0] for entry in log] == ["jit", "jit"]
    fk[(1,)](new["x"], buf, new["n"], 1.0, BLOCK=new["BLOCK"], num_warps=new["warps"])
    assert log[-1][0] == "relaunch"


def test_same_specialisation_with_other_values_relaunches(kernel):
    fk, log = kernel
    fk[(1,)](torch.randn(64), torch.randn(32), 48, 1.0, BLOCK=32)
    fk[(1,)](torch.randn(128), torch.randn(16), 96, 3.0, BLOCK=32)   # other sizes, same key
    assert [entry[0] for entry in log] == ["jit", "relaunch"]


def test_missing_argument_is_a_clear_error(kernel):
    fk, _ = kernel
    with pytest.raises(TypeError, match="missing argument 'BLOCK'"):
        fk[(1,)](torch.randn(4), torch.randn(4), 4, 1.0)


def test_interpreter_and_opt_out_use_the_plain_launch(monkeypatch):
    fn = JITFunction(_kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch.fast(fn) is fn
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(launch.LAUNCH_ENV, "jit")
    assert launch.fast(fn) is fn
    monkeypatch.delenv(launch.LAUNCH_ENV)
    fast = launch.fast(fn)
    assert isinstance(fast, launch.FastKernel) and launch.fast(fn) is fast
    interpreted = triton.runtime.interpreter.InterpretedFunction(_kernel)
    assert launch.fast(interpreted) is interpreted


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU (run with -m gpu on the device machine)")


def _maps(q, k, monkeypatch, mode):
    from slagen.backends.triton import selection
    monkeypatch.setenv(launch.LAUNCH_ENV, mode)
    return [t.clone() for t in selection.block_map(q, k, 25, 8, 128, 64)]


@pytest.mark.gpu
@requires_cuda
def test_gpu_relaunched_block_map_equals_the_jit_launch(monkeypatch):
    """Relaunched kernels (second and third calls, a second specialisation for a 2-byte-aligned q) give the
    JIT launch's maps bit for bit."""
    from slagen import codegen
    from slagen.backends.triton import selection
    g = torch.Generator(device="cuda").manual_seed(3)
    n = 2 * 8190 * 128
    buf = torch.randn(2 * n + 8, generator=g, device="cuda").to(torch.bfloat16)
    k = buf[n + 8:].view(1, 2, 8190, 128)
    for q in (buf[:n].view(1, 2, 8190, 128), buf[1:n + 1].view(1, 2, 8190, 128)):   # aligned, then not
        want = _maps(q, k, monkeypatch, "jit")
        for _ in range(3):
            got = _maps(q, k, monkeypatch, "fast")
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    mod = codegen.load(selection.kernel_spec(k, 128, 64, True), "triton")
    assert len(launch.fast(mod.pool_kernel).compiled) == 2      # one kernel per alignment of q


@pytest.mark.gpu
@requires_cuda
def test_gpu_relaunched_triton_forward_and_backward_equal_the_jit_launch(monkeypatch):
    import slagen
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, 2, 4099, 128, generator=g, device="cuda").to(torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    results = {}
    for mode in ("jit", "fast", "fast"):
        monkeypatch.setenv(launch.LAUNCH_ENV, mode)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = slagen.attention(*leaves, topk=0.1, block_q=128, block_k=64, backend="triton")
        out.backward(do)
        results.setdefault(mode, []).append([out.detach()] + [t.grad for t in leaves])
    want = results["jit"][0]
    for got in results["fast"]:
        for a, b in zip(got, want):
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-6
