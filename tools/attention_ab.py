"""A/B whole ``slagen.attention`` calls (block map + forward, no grad) under environment settings, one process.

    python tools/attention_ab.py --variant base= --variant overlap=SLAGEN_OVERLAP_BLOCK_MAP=1 \
        --variant control= [--seq-len 32760 --block 128x64 --backend tilelang]

Each ``--variant NAME=VAR=VALUE[,VAR=VALUE...]`` sets those environment variables while it is timed (read per
call, as SLAGEN_OVERLAP_BLOCK_MAP is); two identical variants show the noise floor. ``--rounds`` rounds time
every variant in turn, each round starting one variant further on (slagen.autotune.tuner.rotation: a row's place
in the order changes its time); a row reports the median over rounds of the eager time (triton.testing.do_bench:
back-to-back calls, so max(host, GPU) per call) and of the GPU time (the call replayed from a CUDA graph), with
the fastest and slowest round. Every variant's output must equal the first variant's (the knobs change launches
and streams, not results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_sla import add_shape_args, shape_inputs  # noqa: E402

import slagen  # noqa: E402
from slagen.autotune.tuner import rotation  # noqa: E402
from slagen.bench import graph_ms, median_ms  # noqa: E402


def parse_variant(text: str):
    name, _, settings = text.partition("=")
    env = dict(item.split("=", 1) for item in settings.split(",") if item)
    return name, env


@contextmanager
def environment(env: dict):
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, seq_len=32760)
    ap.add_argument("--backend", default="tilelang")
    ap.add_argument("--variant", action="append", default=[], help="NAME=VAR=VALUE[,VAR=VALUE...] (repeatable)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant] or [("base", {})]
    bq, bk, (q, k, v) = shape_inputs(args, 3)

    def call():
        with torch.no_grad():
            return slagen.attention(q, k, v, topk=args.topk, block_q=bq, block_k=bk, backend=args.backend)

    first = None
    for name, env in variants:
        with environment(env):
            out = call()
        torch.cuda.synchronize()
        if first is None:
            first = out
        elif not torch.equal(out, first):
            raise SystemExit(f"variant {name} gives another output than {variants[0][0]}")
    times = {name: ([], []) for name, _ in variants}
    for r in range(args.rounds):
        for name, env in rotation(variants, r):
            with environment(env):
                times[name][0].append(median_ms(call))
                times[name][1].append(graph_ms(call))
    print(f"\n{torch.cuda.get_device_name()}  B=1 H={args.heads} L={args.seq_len} block {bq}x{bk} "
          f"topk {args.topk} {args.backend}, {args.rounds} rounds (ms)")
    print("| variant | env | eager median (min–max) | GPU median (min–max) |\n|---|---|---|---|")
    for name, env in variants:
        cells = []
        for samples in times[name]:
            samples = [s for s in samples if s is not None]
            cells.append(f"{statistics.median(samples):.3f} ({min(samples):.3f}–{max(samples):.3f})"
                         if samples else "—")
        print(f"| {name} | {','.join(f'{k}={v}' for k, v in env.items()) or '—'} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
