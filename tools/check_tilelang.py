"""Check and time slagen's TileLang forward on a Hopper GPU (H100/H200), in one process.

1. Correctness: the GPU cases of tests/test_tilelang.py — the TileLang forward vs the torch reference
   (fp32, same inputs) over sequence lengths 77 / 4096 / 32760 / 75600, head dims, scopes, feature maps,
   negligible on/off, critical counts 1 / 2 / all / top-k / mixed (with empty rows), layouts (bhld, blhd,
   a slice of a fused qkv tensor), tunables; outputs poisoned with NaN first. Kernels are compiled first
   in parallel threads. Each case prints one line; a failing case is reported and the run goes on.
2. Timing (median ms, triton.testing.do_bench) at B=1, H=12, L=32760, D=128, bf16, top-k 5 %, 128×64:
   TileLang sparse-only, SLA 'all' and 'marginal' (given the same BlockMap: block map excluded; Proj
   weight and bias on), the linear pre-pass and excluded-block GEMMs alone, slagen.attention with its own
   (Triton) block map, beside dense SDPA (cuDNN, flash) and FlexAttention on the same critical blocks
   (full blocks, BlockMask.from_kv_blocks), all in the same process.
A short table comes last.

    python tools/check_tilelang.py                 # ~3-5 min on an H100/H200 (compiles included)
    python tools/check_tilelang.py --quick         # fewer correctness cases
    python tools/check_tilelang.py --no-check      # timing only;  --no-bench: correctness only
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root: tests/

from slagen import reference  # noqa: E402
from slagen.backends import tilelang as tl_backend  # noqa: E402
from slagen.blockmap import BlockMap  # noqa: E402
from slagen.spec import KernelSpec  # noqa: E402
from tests.test_tilelang import DT, GPU_CASES, TOL, precompile, run_case  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def correctness_cases(quick: bool):
    """tests/test_tilelang.py's GPU cases; --quick keeps the 128-dim, negligible-on half of the main grid."""
    if not quick:
        return list(GPU_CASES)
    return [c for c in GPU_CASES if not (c.get("d") == 64 and c.get("negl") == 0.0)
            and not (c.get("L") == 75600 and c.get("fmap") == "none")]


def check(quick: bool, workers: int) -> tuple:
    cases = correctness_cases(quick)
    log(f"== correctness: {len(cases)} cases vs the torch reference (fp32), rel. err < {TOL:g}")
    t0 = time.time()
    failures = precompile(cases, workers)
    for what, err in failures:
        log(f"  COMPILE FAILED {what}: {type(err).__name__}: {str(err)[:300]}")
    log(f"  compiled the kernels in {time.time() - t0:.0f} s")
    passed = failed = 0
    for c in cases:
        label = " ".join(f"{k}={v}" for k, v in c.items())
        t0 = time.time()
        try:
            errs = run_case(**c)
            worst = max(errs.values())
            ok = worst < TOL
            detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        except Exception as err:
            ok, detail = False, f"{type(err).__name__}: {str(err)[:300]}"
            traceback.print_exc(limit=3)
        passed, failed = passed + ok, failed + (not ok)
        log(f"  {'ok  ' if ok else 'FAIL'} {label}: {detail} ({time.time() - t0:.1f} s)")
        torch.cuda.empty_cache()
    log(f"== correctness: {passed} passed, {failed} failed")
    return passed, failed


def bench(args) -> list:
    from slagen.bench import flex_block_mask, median_ms
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, L, D = args.batch, args.heads, args.seq_len, args.head_dim
    dt = DT[args.dtype]
    bq, bk = args.block
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dt, generator=gen) for _ in range(3))
    mask = reference.block_mask(q, k, topk=args.topk, negligible=0.0, block_q=bq, block_k=bk)
    bmap = BlockMap.from_mask(mask, block_q=bq, block_k=bk)
    maps = list(bmap.tensors())
    w = torch.randn(D, D, device=dev, generator=gen) / math.sqrt(D)
    b = torch.randn(D, device=dev, generator=gen) * 0.1
    rows = []
    log(f"== timing: {torch.cuda.get_device_name()} B={B} H={H} L={L} D={D} {args.dtype} topk={args.topk} "
        f"blocks {bq}x{bk} ({bmap.crit_lut.shape[-1]} of {mask.shape[-1]} key blocks per row)")

    def attempt(name, fn):
        try:
            fn()
            torch.cuda.synchronize()
            ms = median_ms(fn)
            rows.append((name, ms))
            log(f"  {name}: {ms:.3f} ms")
        except Exception as err:
            rows.append((name, None))
            log(f"  {name}: FAILED {type(err).__name__}: {str(err)[:300]}")

    for backend, label in ((SDPBackend.CUDNN_ATTENTION, "dense SDPA cuDNN"),
                           (SDPBackend.FLASH_ATTENTION, "dense SDPA flash")):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        attempt(label, sdpa)
    if args.flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            fmask = flex_block_mask(bmap, L, L)
            compiled = torch.compile(flex_attention, mode=args.flex_mode)
            t0 = time.time()
            attempt(f"FlexAttention same blocks ({args.flex_mode})", lambda: compiled(q, k, v, block_mask=fmask))
            log(f"  (Flex compile + timing {time.time() - t0:.0f} s)")
        except Exception as err:
            log(f"  FlexAttention: FAILED {type(err).__name__}: {str(err)[:300]}")
    cfg = dict(block_q=bq, block_k=bk, scale=D ** -0.5, eps=reference.EPS)
    maps_negl = list(BlockMap.from_mask(reference.block_mask(q, k, topk=args.topk, negligible=0.1, block_q=bq,
                                                             block_k=bk), block_q=bq, block_k=bk).tensors())
    for label, fmap, scope, proj, mp in (
            ("TileLang sparse-only", "none", "marginal", False, maps),
            ("TileLang SLA all (softmax, Proj)", "softmax", "all", True, maps),
            ("TileLang SLA marginal (softmax, Proj)", "softmax", "marginal", True, maps),
            ("TileLang SLA marginal, negligible 10 %", "softmax", "marginal", True, maps_negl)):
        wt, bt = (w, b) if proj else (None, None)
        attempt(label, lambda fmap=fmap, scope=scope, wt=wt, bt=bt, mp=mp: tl_backend.forward(
            q, k, v, mp, wt, bt, False, feature_map=fmap, scope=scope, **cfg))
    for scope in ("all", "marginal"):
        spec = KernelSpec(arch="sm90", head_dim=D, block_q=bq, block_k=bk, feature_map="softmax", scope=scope,
                          dtype=args.dtype)
        kcfg = tl_backend.default_config(spec)
        attempt(f"  part: linear pre-pass, scope {scope}", lambda: tl_backend.linear_terms_of(spec, kcfg, k, v))
    try:
        ht, zt = tl_backend.linear_terms_of(spec, kcfg, k, v)
        attempt("  part: marginal-block GEMMs (marginal)",
                lambda: tl_backend.marginal_sums(spec, kcfg, ht, zt, maps[0]))
    except Exception as err:
        log(f"  marginal-block GEMMs: FAILED {type(err).__name__}: {str(err)[:200]}")
    try:
        import slagen
        attempt("slagen.attention(backend='tilelang'), marginal, with its block map",
                lambda: slagen.attention(q, k, v, topk=args.topk, block_q=bq, block_k=bk, scope="marginal",
                                         proj_weight=w, proj_bias=b, backend="tilelang"))
    except Exception as err:
        log(f"  slagen.attention: FAILED {type(err).__name__}: {str(err)[:200]}")
    try:
        from slagen.backends.triton import fwd as triton_fwd  # noqa: F401
        for label, fmap, scope, proj in (("Triton SLA marginal (softmax, Proj)", "softmax", "marginal", True),):
            attempt(label, lambda: triton_fwd.forward(q, k, v, maps, w, b, False, feature_map=fmap, scope=scope,
                                                      **cfg))
    except Exception as err:
        log(f"  Triton forward not timed: {type(err).__name__}: {str(err)[:200]}")
    return rows


def table(rows) -> str:
    base = dict(rows)
    cudnn = base.get("dense SDPA cuDNN")
    flex = next((ms for name, ms in rows if name.startswith("FlexAttention")), None)
    lines = ["| what | median ms | × vs cuDNN | × vs Flex |", "|---|---|---|---|"]
    for name, ms in rows:
        r1 = f"{cudnn / ms:.2f}" if ms and cudnn else ""
        r2 = f"{flex / ms:.2f}" if ms and flex else ""
        lines.append(f"| {name} | {ms:.3f} | {r1} | {r2} |" if ms else f"| {name} | FAILED | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer correctness cases")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness cases")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the timing")
    p.add_argument("--no-flex", dest="flex", action="store_false", help="do not time FlexAttention")
    p.add_argument("--flex-mode", default="max-autotune-no-cudagraphs",
                   help="torch.compile mode for FlexAttention (default: %(default)s; 'default' compiles faster)")
    p.add_argument("--seq-len", type=int, default=32760)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=sorted(DT))
    p.add_argument("--topk", type=float, default=0.05)
    p.add_argument("--block", default="128x64", type=lambda s: tuple(int(x) for x in s.lower().split("x")))
    p.add_argument("--workers", type=int, default=8, help="parallel kernel compiles")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        log("no CUDA GPU: nothing to check")
        return 2
    reason = tl_backend.unavailable_reason(torch.device("cuda"), KernelSpec(arch="sm90"))
    log(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; TileLang backend: "
        f"{'available' if reason is None else reason}")
    failed = 0
    if args.check:
        _, failed = check(args.quick, args.workers)
    rows = bench(args) if args.bench else []
    if rows:
        log("")
        log(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
