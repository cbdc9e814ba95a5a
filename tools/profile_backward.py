"""Kernel by kernel, the TileLang backend's backward with each implementation its config can pick.

    python tools/profile_backward.py                       # headline shape, marginal and sparse-only
    python tools/profile_backward.py --seq-len 75600 --heads 40 --block 64x64
    python tools/profile_backward.py --config default='{}' \
        --config stages3='{"dkdv": {"num_stages": 3}}' --rounds 5     # an A/B of TileLang backward configs

For each scope variant (SLA marginal, sparse-only) and each ``config["backward"]`` ('triton': the Triton
backward; 'tilelang': Triton's state kernels for D^s and the linear terms, then the TileLang dq / dkdv
sparse loops) it prints the median time of the backward alone (the forward's saved tensors given), its
GPU time and its kernels, longest first, and the relative difference of the two implementations' dq, dk,
dv to the first row's (they compute the same gradients). With ``--config NAME=JSON`` (repeatable) the rows are
those TileLang backward configs instead, timed in ``--rounds`` rounds that each start one row further on
(median and range over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from profile_sla import add_shape_args, kernel_times, map_inputs  # noqa: E402

from slagen import reference  # noqa: E402
from slagen.autotune.tuner import rotation  # noqa: E402
from slagen.backends import tilelang as tl_backend  # noqa: E402


def parse_config(text: str):
    name, _, cfg = text.partition("=")
    return name, {"backward": "tilelang", **json.loads(cfg)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--config", action="append", default=[], type=parse_config,
                    help="NAME=JSON: a TileLang backward config to time (repeatable; default: the two backwards)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    from triton.testing import do_bench

    bq, bk, (q, k, v, do), maps = map_inputs(args)
    variants = args.config or [(impl, {"backward": impl}) for impl in ("triton", "tilelang")]
    rows = []
    for fmap, what in (("softmax", "SLA marginal"), ("none", "sparse-only")):
        cfg = dict(block_q=bq, block_k=bk, scale=q.shape[-1] ** -0.5, feature_map=fmap, scope="marginal",
                   eps=reference.EPS)
        *saved, h_lin, z_lin = tl_backend.forward(q, k, v, maps, None, None, True, states=True, **cfg)
        sums = dict(lin_sums=(h_lin, z_lin)) if h_lin.numel() else {}
        fns, grads, kts = {}, {}, {}
        for name, config in variants:
            def fn(config=config, cfg=cfg, saved=saved, sums=sums):
                return tl_backend.backward(do, q, k, v, *saved, maps, None, None, config=config, **cfg, **sums)
            try:
                grads[name] = fn()[:3]
            except ValueError as err:       # a config that does not apply to this variant (e.g. linear-only knobs)
                print(f"  {what}: {name} skipped: {err}", flush=True)
                continue
            fns[name], kts[name] = fn, kernel_times(fn)
        times = {name: [] for name in fns}
        for r in range(args.rounds):
            for name in rotation(list(fns), r):
                times[name].append(do_bench(fns[name], warmup=25, rep=100, return_mode="median"))
        for name, kt in kts.items():
            rows.append((what, name, times[name], sum(t for _, t in kt), kt))
            print(f"  {_row(*rows[-1])}", flush=True)
        first = next(iter(grads), None)
        for name in list(grads)[1:]:
            diffs = [float((a.float() - b.float()).norm() / b.float().norm())
                     for a, b in zip(grads[name], grads[first])]
            print(f"  {what}: {name} vs {first} rel. diff dq {diffs[0]:.2e} dk {diffs[1]:.2e} dv {diffs[2]:.2e}")

    print(f"\n{torch.cuda.get_device_name()} | B=1 H={args.heads} L={args.seq_len} D={args.head_dim} bf16 "
          f"topk={args.topk} block {args.block} | backward alone\n")
    print(f"{args.rounds} round(s); ms: median over rounds (min–max)\n")
    print("| what | backward | ms | gpu ms | kernels (ms per call) |\n|---|---|---|---|---|")
    for row in rows:
        print(_row(*row))


def _row(what: str, name: str, times: list, gpu: float, kt: list) -> str:
    ks = "; ".join(f"{n[:40]} {t:.3f}" for n, t in kt[:8])
    ms = f"{statistics.median(times):.3f}" + (f" ({min(times):.3f}–{max(times):.3f})" if len(times) > 1 else "")
    return f"| {what} | {name} | {ms} | {gpu:.3f} | {ks} |"


if __name__ == "__main__":
    main()
