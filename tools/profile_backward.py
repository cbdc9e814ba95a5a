"""Kernel by kernel, the TileLang backend's backward with each implementation its config can pick.

    python tools/profile_backward.py                       # headline shape, marginal and sparse-only
    python tools/profile_backward.py --seq-len 75600 --heads 40 --block 64x64

For each scope variant (SLA marginal, sparse-only) and each ``config["backward"]`` ('triton': the Triton
backward; 'tilelang': Triton's state kernels for D^s and the linear terms, then the TileLang dq / dkdv
sparse loops) it prints the median time of the backward alone (the forward's saved tensors given), its
GPU time and its kernels, longest first, and the relative difference of the two implementations' dq, dk,
dv (they compute the same gradients).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from profile_sla import add_shape_args, kernel_times, map_inputs  # noqa: E402

from slagen import reference  # noqa: E402
from slagen.backends import tilelang as tl_backend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    args = ap.parse_args()
    from triton.testing import do_bench

    bq, bk, (q, k, v, do), maps = map_inputs(args)
    rows = []
    for fmap, what in (("softmax", "SLA marginal"), ("none", "sparse-only")):
        cfg = dict(block_q=bq, block_k=bk, scale=128 ** -0.5, feature_map=fmap, scope="marginal",
                   eps=reference.EPS)
        *saved, h_lin, z_lin = tl_backend.forward(q, k, v, maps, None, None, True, states=True, **cfg)
        sums = dict(lin_sums=(h_lin, z_lin)) if h_lin.numel() else {}
        grads = {}
        for impl in ("triton", "tilelang"):
            def fn(impl=impl, cfg=cfg, saved=saved, sums=sums):
                return tl_backend.backward(do, q, k, v, *saved, maps, None, None, config={"backward": impl}, **cfg,
                                           **sums)
            grads[impl] = fn()[:3]
            kt = kernel_times(fn)
            rows.append((what, impl, do_bench(fn, warmup=25, rep=100, return_mode="median"),
                         sum(t for _, t in kt), kt))
            print(f"  {_row(*rows[-1])}", flush=True)   # as it finishes: a cut-off run keeps its rows
        diffs = [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(*grads.values())]
        print(f"  {what}: tilelang vs triton rel. diff dq {diffs[0]:.2e} dk {diffs[1]:.2e} dv {diffs[2]:.2e}")

    print(f"\n{torch.cuda.get_device_name()} | B=1 H={args.heads} L={args.seq_len} D=128 bf16 topk={args.topk} "
          f"block {args.block} | backward alone\n")
    print("| what | backward | ms | gpu ms | kernels (ms per call) |\n|---|---|---|---|---|")
    for row in rows:
        print(_row(*row))


def _row(what: str, impl: str, ms: float, gpu: float, kt: list) -> str:
    ks = "; ".join(f"{n[:40]} {t:.3f}" for n, t in kt[:8])
    return f"| {what} | {impl} | {ms:.3f} | {gpu:.3f} | {ks} |"


if __name__ == "__main__":
    main()
