"""Kernel by kernel, the backward's linear part (the Triton state and linear-term kernels the TileLang backward
runs, slagen.backends.triton.bwd.linear_part) under launch-config variants.

    python tools/sweep_linear_part.py                    # headline shape, 128x64, SLA marginal
    python tools/sweep_linear_part.py --seq-len 75600 --heads 40

The sparse callbacks are no-ops, so the times are the linear part's alone, given the forward's H_i, Z_i as the
TileLang backward is (no key-state kernel, no H_i GEMM). One knob group at a time is varied from the config the
TileLang backward gives its linear part by default (tilelang.linear_config; prep: rows, num_warps, num_stages,
chunk; dq: block_m, num_warps; dkdv: block_n, num_warps) or, for `_lin_rows` (group lin: rows, num_warps,
num_stages), from its entry of bwd._LIN_LAUNCH, which this tool replaces while it runs; --groups picks the groups.
For each variant it prints the total and the per-kernel GPU ms (torch.profiler, averaged over 5 calls), then the
best variant per kernel and the total with each kernel's best together (checked against the default's gradients:
relative difference of dq, dk, dv).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from profile_sla import add_shape_args, kernel_times, map_inputs  # noqa: E402

from slagen import reference  # noqa: E402
from slagen.backends import tilelang as tl_backend  # noqa: E402
from slagen.backends.triton import bwd  # noqa: E402

GROUPS = {
    "prep": [dict(rows=r, num_warps=w, num_stages=s, chunk=c)
             for r, w, s, c in itertools.product((32, 64), (4, 8), (1, 2), (1, 2, 8))],
    "dq": [dict(block_m=m, num_warps=w) for m, w in itertools.product((64, 128), (4, 8))],
    "dkdv": [dict(block_n=n, num_warps=w) for n, w in itertools.product((32, 64), (4, 8))],
    "lin": [dict(rows=r, num_warps=w, num_stages=s) for r, w, s in itertools.product((64, 128), (4, 8), (1, 2, 3))],
}
KERNEL_OF = {"prep": ("_query_state", "_key_state"), "dq": ("_dq_kernel",), "dkdv": ("_dkdv_kernel",),
             "lin": ("_lin_rows",)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated groups of {sorted(GROUPS)}")
    args = ap.parse_args()
    groups = [g for g in args.groups.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        ap.error(f"--groups: unknown {unknown}; allowed: {sorted(GROUPS)}")
    bq, bk, (q, k, v, do), maps = map_inputs(args)
    cfg = dict(block_q=bq, block_k=bk, scale=q.shape[-1] ** -0.5, feature_map="softmax", scope="marginal",
               eps=reference.EPS)
    *saved, h_lin, z_lin = tl_backend.forward(q, k, v, maps, None, None, True, states=True, **cfg)
    spec = bwd.kernel_spec(q, block_q=bq, block_k=bk, feature_map="softmax", scope="marginal", has_negligible=False)
    base = tl_backend.linear_config(spec, tl_backend.default_config(spec)["linear"])
    lin_base = dict(bwd._LIN_LAUNCH.get((spec.arch, spec.head_dim), bwd._LIN_DEFAULT))

    def configure(choice: dict):
        """The Triton config and _lin_rows launch of ``choice`` ({group: variant}) over the defaults."""
        config = copy.deepcopy(base)
        for group, variant in choice.items():
            if group != "lin":
                config[group].update(variant)
        bwd._LIN_LAUNCH[(spec.arch, spec.head_dim)] = {**lin_base, **choice.get("lin", {})}
        bwd.check_config(config, spec)
        return config

    def run(config):
        return bwd.linear_part(do, q, k, v, *saved, maps, None, None, sparse_dq=lambda *a: None,
                               sparse_dkdv=lambda *a: None, config=config, lin_sums=(h_lin, z_lin), **cfg)[:3]

    def measure(config):
        kt = kernel_times(lambda: run(config))
        return sum(t for _, t in kt), dict(kt)

    ref = [g.float() for g in run(base)]
    total, kt = measure(base)
    print(f"default {base}, _lin_rows {lin_base}\n  total {total:.3f} ms: "
          + "; ".join(f"{n[:30]} {t:.3f}" for n, t in kt.items()))
    best = {}
    for group in groups:
        for variant in GROUPS[group]:
            try:
                total, kt = measure(configure({group: variant}))
            except Exception as err:      # a variant that does not compile or fit: reported, not fatal
                print(f"  {group} {variant}: failed ({type(err).__name__}: {str(err)[:120]})")
                continue
            mine = {n: t for n, t in kt.items() if any(n.startswith(x) for x in KERNEL_OF[group])}
            print(f"  {group} {variant}: total {total:.3f}; " + "; ".join(f"{n} {t:.3f}" for n, t in mine.items()),
                  flush=True)
            score = sum(mine.values())
            if group not in best or score < best[group][0]:
                best[group] = (score, variant)
    config = configure({group: variant for group, (_, variant) in best.items()})
    total, kt = measure(config)
    diffs = [float((a.float() - b).norm() / b.norm()) for a, b in zip(run(config), ref)]
    print(f"\n{torch.cuda.get_device_name()} | B=1 H={args.heads} L={args.seq_len} D={args.head_dim} bf16 "
          f"topk={args.topk} block {args.block} | linear part alone")
    print(f"best per group: { {g: v for g, (_, v) in best.items()} }")
    print(f"best together: total {total:.3f} ms; " + "; ".join(f"{n[:30]} {t:.3f}" for n, t in kt.items()))
    print(f"rel. diff vs default: dq {diffs[0]:.2e} dk {diffs[1]:.2e} dv {diffs[2]:.2e}")


if __name__ == "__main__":
    main()
