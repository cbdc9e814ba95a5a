"""Where the time of one slagen call goes on a GPU: host (Python + launches) versus device (kernels).

    python tools/profile_sla.py                                  # headline shape, triton and tilelang
    python tools/profile_sla.py --backend triton --seq-len 32760 --block 128x64 --cprofile 25
    python tools/profile_sla.py --only "marginal fwd,block map"          # a subset of the cases

For each backend and variant (block map alone; forward of SLA marginal / all / sparse-only, with the
block map and given a precomputed one; forward+backward) it prints:
  eager ms   triton.testing.do_bench median of the call as a user makes it (what `slagen bench` reports)
  host ms    wall time per call while the GPU is held busy by a sleep kernel (the Python + launch cost;
             when it exceeds the GPU time, the call is host-bound and the GPU idles)
  gpu ms     sum of the call's kernel times from torch.profiler (averaged over 5 calls)
  kernels    the kernels, longest first, with their ms per call
With --cprofile N: the N functions with the most own (and cumulative) host time for one case, the sparse-only
forward or --cprofile-case (e.g. 'SLA marginal fwd+bwd').
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import slagen


def host_ms(fn, n: int = 20) -> float:
    """Host wall time per call of ``fn`` while the GPU is still busy with a long sleep kernel."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s at 1.98 GHz: the GPU never catches up with the host
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return dt * 1e3


def kernel_times(fn, calls: int = 5) -> list:
    """[(kernel name, ms per call)] of ``fn``'s device kernels, longest first."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name] = totals.get(ev.name, 0.0) + ev.device_time / 1e3 / calls
    return sorted(totals.items(), key=lambda kv: -kv[1])


def cprofile_report(fn, title: str, top: int, keys=("tottime",), calls: int = 50) -> str:
    """cProfile of ``calls`` calls of ``fn``: the ``top`` functions sorted by each of ``keys``."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    parts = []
    for key in keys:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(top)
        parts.append(f"\n== cProfile {title}, {calls} calls, by {key}\n" + s.getvalue()[-7000:])
    return "".join(parts)


def add_shape_args(ap: argparse.ArgumentParser, seq_len: int = 32760) -> None:
    """The shape options the profiling tools share (B = 1, bf16)."""
    ap.add_argument("--seq-len", type=int, default=seq_len)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    ap.add_argument("--block", default="128x64")
    ap.add_argument("--topk", type=float, default=0.05)


def shape_inputs(args, n: int = 4):
    """(block_q, block_k, [n random (1, heads, seq_len, head_dim) bf16 CUDA tensors]) of the parsed shape args."""
    bq, bk = (int(x) for x in args.block.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, args.heads, args.seq_len, args.head_dim)
    return bq, bk, [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(n)]


def map_inputs(args):
    """(block_q, block_k, [q, k, v, dO], the 9 BlockMap tensors): :func:`shape_inputs` and the Triton block map
    of q, k at ``args.topk`` (no negligible blocks)."""
    from slagen import reference
    from slagen.backends.triton import selection
    bq, bk, (q, k, v, do) = shape_inputs(args)
    n_crit, _ = reference.block_counts(reference.num_blocks(args.seq_len, bk), args.topk, 0.0)
    return bq, bk, (q, k, v, do), list(selection.block_map(q, k, n_crit, 0, bq, bk))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="triton,tilelang")
    add_shape_args(ap)
    ap.add_argument("--cprofile", type=int, default=0)
    ap.add_argument("--cprofile-case", default="sparse-only fwd", help="the case --cprofile profiles")
    ap.add_argument("--only", default="", help="comma-separated substrings: profile only the cases whose name "
                                               "contains one (e.g. 'marginal fwd,block map')")
    args = ap.parse_args()
    only = [part for part in args.only.split(",") if part]
    from triton.testing import do_bench

    bq, bk, (q, k, v, do) = shape_inputs(args)
    for t in (q, k, v):
        t.requires_grad_(True)
    rows = []
    for name in args.backend.split(","):
        cfg = dict(topk=args.topk, block_q=bq, block_k=bk, backend=name)
        bmap = slagen.block_map(q, k, **cfg)
        cases = [("block map", lambda cfg=cfg: slagen.block_map(q, k, **cfg))]
        for fmap, scope, what in (("softmax", "marginal", "SLA marginal"), ("softmax", "all", "SLA all"),
                                  (None, "marginal", "sparse-only")):
            def fwd(fmap=fmap, scope=scope, cfg=cfg, given=None):
                with torch.no_grad():
                    return slagen.attention(q, k, v, feature_map=fmap, scope=scope, block_map=given, **cfg)

            def fwd_bwd(fmap=fmap, scope=scope, cfg=cfg):
                out = slagen.attention(q, k, v, feature_map=fmap, scope=scope, **cfg)
                torch.autograd.grad(out, (q, k, v), do)
            cases += [(f"{what} fwd", fwd), (f"{what} fwd, map given", lambda f=fwd: f(given=bmap)),
                      (f"{what} fwd+bwd", fwd_bwd)]
        for what, fn in cases:
            if only and not any(part in what for part in only):
                continue
            kt = kernel_times(fn)
            rows.append((name, what, do_bench(fn, warmup=25, rep=100, return_mode="median"), host_ms(fn),
                         sum(t for _, t in kt), kt))
            print(f"  {name} {what}: done", flush=True)
        if args.cprofile:
            fn = dict(cases)[args.cprofile_case]   # (whatever --only says)
            print(cprofile_report(fn, f"{name} {args.cprofile_case}", args.cprofile, keys=("tottime", "cumtime")))

    print(f"\n{torch.cuda.get_device_name()} | B=1 H={args.heads} L={args.seq_len} D={args.head_dim} bf16 "
          f"topk={args.topk} block {args.block}\n")
    print("| backend | what | eager ms | host ms | gpu ms | kernels (ms per call) |\n|---|---|---|---|---|---|")
    for name, what, eager, host, gpu, kt in rows:
        ks = "; ".join(f"{n[:40]} {t:.3f}" for n, t in kt[:10])
        print(f"| {name} | {what} | {eager:.3f} | {host:.3f} | {gpu:.3f} | {ks} |")


if __name__ == "__main__":
    main()
