"""Tuning problems: real inputs for one kernel role at a requested shape, a runner per config, and a
check against the reference that every candidate must pass before it may win.

Inputs are random (never zeros) with a real block map at the requested density (from the backend's
own block-map kernel, never random integer lookup tables). Forward and backward candidates are checked
against the PyTorch reference on the first head (fp32, from the same inputs); block-map candidates must
reproduce the default config's mask exactly.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Callable, Optional

import torch

from slagen import backends, codegen, reference
from slagen.autotune import cache, records, select, space, tuner
from slagen.backends import reference as torch_backend
from slagen.spec import KernelSpec

# The kernels each backend tunes itself (TileLang delegates its block map to Triton, so it is tuned,
# stored and looked up under "triton"; TileLang's backward config picks Triton's backward or its own
# sparse loops, and a Triton backward is tuned under "triton").
ROLE_MODULES = {"triton": {"block_map": "slagen.backends.triton.selection",
                           "forward": "slagen.backends.triton.fwd",
                           "backward": "slagen.backends.triton.bwd"},
                "tilelang": {"forward": "slagen.backends.tilelang", "backward": "slagen.backends.tilelang"}}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {"bf16": 3e-2, "fp16": 1e-2, "fp32": 1e-3}


@dataclasses.dataclass
class Problem:
    """A tuning problem: ``run(config)`` on real inputs, ``check(output)`` against the reference, and, where
    the backend can compile a config without running it on any thread, ``compile(config)`` (TileLang; Triton
    compiles at a kernel's first launch, which is not reliably thread-safe: triton-lang/triton#5933)."""
    spec: KernelSpec
    run: Callable[[dict], object]
    check: Callable[[object], None]
    default: dict
    module: object
    compile: Optional[Callable[[dict], object]] = None


def role_module(backend: str, role: str):
    try:
        return importlib.import_module(ROLE_MODULES[backend][role])
    except KeyError:
        tunable = ", ".join(f"{b}: {'/'.join(r)}" for b, r in ROLE_MODULES.items())
        raise ValueError(f"backend={backend!r} has no tunable kernel for role={role!r} (tunable: {tunable})") from None


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def make_problem(spec: KernelSpec, backend: str, device: torch.device, *, batch: int = 1, heads: int = 12,
                 seq_len: int = 32760, density: float = 0.05, negligible: float = 0.0,
                 seed: int = 0) -> Problem:
    """Inputs, a runner and a reference check for ``spec`` (its role picks the kernel)."""
    mod = role_module(backend, spec.role)
    dtype, tol = DTYPES[spec.dtype], TOLERANCE[spec.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, heads, seq_len, spec.head_dim)
    q, k, v, do = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))
    tn = reference.num_blocks(seq_len, spec.block_k)
    n_crit, n_negl = reference.block_counts(tn, density, negligible if spec.has_negligible else 0.0)
    block_map_mod = role_module("triton", "block_map")
    maps = list(block_map_mod.block_map(q, k, n_crit, n_negl, spec.block_q, spec.block_k))
    if spec.role == "block_map":
        want = maps[0]
        return Problem(spec, lambda cfg: mod.block_map(q, k, n_crit, n_negl, spec.block_q, spec.block_k,
                                                       config=cfg),
                       lambda out: _require(torch.equal(out[0], want), "mask differs from the default config's"),
                       mod.default_config(spec), mod)
    fmap = spec.feature_map or "none"
    cfg_args = dict(block_q=spec.block_q, block_k=spec.block_k, scale=spec.head_dim ** -0.5, feature_map=fmap,
                    scope=spec.scope, eps=reference.EPS)
    weight = bias = None
    if spec.feature_map is not None:
        weight = torch.randn(spec.head_dim, spec.head_dim, device=device, generator=gen) / math.sqrt(spec.head_dim)
        bias = torch.randn(spec.head_dim, device=device, generator=gen) * 0.1
    head0 = [t[:, :1] for t in (q, k, v)]
    maps0 = [m[:, :1] for m in maps]
    if spec.role == "forward":
        want = torch_backend.forward(*[t.float() for t in head0], maps0, weight, bias, False, **cfg_args)[0]

        def check(out):
            err = rel_err(out[0][:, :1], want)
            _require(err < tol, f"forward rel. error {err:.2e} vs the reference (allowed {tol:g})")
        compile_only = None
        if hasattr(mod, "compile_for_call"):
            def compile_only(cfg):
                return mod.compile_for_call(spec, cfg, save=False, has_w=weight is not None, has_bias=bias is not None)
        return Problem(spec, lambda cfg: mod.forward(q, k, v, maps, weight, bias, False, config=cfg, **cfg_args),
                       check, mod.default_config(spec), mod, compile_only)
    # The backward reads what this backend's forward saves, as an autograd call does: where the backend keeps the
    # linear branch's sums (H_i, Z_i) its backward gets them and forms O^l and den again from them.
    fwd_mod = role_module(backend, "forward")
    keep = backends.keeps_linear_sums(backend, True, fmap, spec.scope)
    saved = fwd_mod.forward(q, k, v, maps, weight, bias, True, **cfg_args, **(dict(states=True) if keep else {}))
    o, lse, o_lin, den = saved[:4]
    sums = dict(lin_sums=tuple(saved[4:6])) if keep else {}
    wants = torch_backend.backward(do[:, :1].float(), *[t.float() for t in head0], None, None, None, None, maps0,
                                   weight, bias, **cfg_args)

    def check_bwd(out):
        for name, got, want in zip(("dq", "dk", "dv"), out[:3], wants[:3]):
            err = rel_err(got[:, :1], want)
            _require(err < tol, f"{name} rel. error {err:.2e} vs the reference (allowed {tol:g})")
    return Problem(spec, lambda cfg: mod.backward(do, q, k, v, o, lse, o_lin, den, maps, weight, bias, config=cfg,
                                                  **cfg_args, **sums),
                   check_bwd, mod.default_config(spec), mod)


TUNE_ROUNDS = 3     # timing rounds over the candidates (tuner.tune: drift and order effects)


def time_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def tune_and_store(spec: KernelSpec, backend: str, device: torch.device, *, seq_len: int, density: float,
                   batch: int = 1, heads: int = 12, negligible: float = 0.1,
                   progress: Optional[Callable[[int, tuner.Outcome], None]] = None,
                   configs: Optional[list] = None, jobs: Optional[int] = None) -> tuner.TuneResult:
    """Tune ``spec`` on ``device`` at this shape, store the winner in the user cache, return the result
    (where the problem can compile without running, candidates compile on
    ``slagen.codegen.compile_threads(jobs)`` threads first)."""
    problem = make_problem(spec, backend, device, batch=batch, heads=heads, seq_len=seq_len, density=density,
                           negligible=negligible)
    configs = configs or space.candidates(spec, problem.default, problem.module.check_config)
    result = tuner.tune(configs, problem.run, problem.check, time_ms, progress, compile=problem.compile,
                        jobs=codegen.compile_threads(jobs), rounds=TUNE_ROUNDS)
    bucket = records.shape_bucket(seq_len, density)
    cache.save([tuner.record(spec.canonical, backend, select.gpu_name(device), spec.arch, bucket, result,
                             records.stack_meta())])
    select.forget()
    return result
