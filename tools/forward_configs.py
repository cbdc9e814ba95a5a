"""Time TileLang forward configs side by side in one process (the kernel launch given a block map: no block map,
no autograd), for the sparse-only and the SLA marginal forward at one shape. `slagen tune` times the SLA forward
with its block map for one spec; this one A/Bs loop variants on both specs, with GPU (CUDA-event) medians.

    python tools/forward_configs.py --config '{}' --config '{"pingpong": true, "overlap": false}'
    python tools/forward_configs.py --seq-len 16384 --block 128x64 --config '{"overlap": false}'

Every distinct kernel compiles first (8 threads; ~10–30 s each on the H200 host, TileLang's lowering holds the
GIL). Then ``--rounds`` rounds time every (variant, config) in turn, ``--reps`` calls each (after warm-up);
a row reports the median of its round medians, the fastest and slowest round, the sparse part's TFLOP/s
(4·B·H·Lq·d per selected key) and the ratio to the first config. Rounds, not one block per config: on the
H200 the same kernel measured 0.638 ms timed first and 0.714 after three others (session 12), so configs timed
one after the other are not comparable; and each round starts one (variant, config) further on than the last
(session 13: a kernel timed first in every round, after the last round's slowest config, ran 9 % faster than
the same kernel timed second).
Two identical configs (e.g. '{}' and '{"overlap": true}' at d 128) show the noise floor.
Each output is first filled with NaN and freed before a second call, whose output (the same allocation)
must come back finite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_sla import add_shape_args, map_inputs  # noqa: E402

from slagen import reference  # noqa: E402
from slagen.autotune.tuner import rotation  # noqa: E402
from slagen.backends import tilelang as tl_backend  # noqa: E402


def median_ms(fn, reps: int) -> float:
    """Median of ``reps`` CUDA-event timings of back-to-back calls of ``fn`` (after 10 warm-up calls; one
    synchronisation at the end, so the GPU time, not the host's launch time, is measured while the host keeps
    ahead of the GPU — true for these kernels: ~0.3 ms of host time per call)."""
    for _ in range(10):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def precompile(q, bq: int, bk: int, variants, configs) -> None:
    """Compile every (variant, config) kernel on 8 threads first (TileLang compiles are single-threaded)."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = []
    for fmap in variants:
        spec = tl_backend.kernel_spec(q, block_q=bq, block_k=bk, feature_map=fmap, scope="marginal",
                                      has_negligible=False)
        jobs += [(spec, cfg) for cfg in configs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda job: tl_backend.compile_for_call(job[0], job[1], save=False, has_w=False,
                                                              has_bias=False), jobs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--config", action="append", default=[], help="a JSON forward config (repeatable); '{}' is "
                                                                   "the default")
    ap.add_argument("--variants", default="sparse-only,marginal", help="comma-separated: sparse-only, marginal")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all configs, interleaved")
    args = ap.parse_args()
    configs = [json.loads(c) for c in (args.config or ["{}"])]
    bq, bk, (q, k, v, _), maps = map_inputs(args)
    # the sparse part's FLOPs: QKᵀ and P·V over every query row's selected keys (mean count × block_k)
    flops = 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * float(maps[2].to(torch.float64).mean()) * bk * q.shape[-1]
    variants = args.variants.split(",")
    fmaps = {variant: None if variant == "sparse-only" else "softmax" for variant in variants}
    precompile(q, bq, bk, list(fmaps.values()), configs)
    calls = {}
    for variant in variants:
        fmap = fmaps[variant]
        for i, cfg in enumerate(configs):
            def call(cfg=cfg, fmap=fmap):
                return tl_backend.forward(q, k, v, maps, None, None, False, block_q=bq, block_k=bk,
                                          scale=q.shape[-1] ** -0.5, feature_map=fmap, scope="marginal",
                                          eps=reference.EPS, config=cfg)
            out = call()[0]
            out.fill_(float("nan"))     # freed and handed out again for the next call's output (same size)
            del out
            out = call()[0]
            torch.cuda.synchronize()
            if not bool(torch.isfinite(out).all()):
                raise SystemExit(f"{variant} {cfg}: non-finite output")
            calls[variant, i] = call
    # Rounds: every (variant, config) timed once per round, in turn, each round starting one further on, so that
    # a drift of the card's speed over the run and the place in the order (session 13: the same kernel 0.639 ms
    # timed first in its rounds, 0.701 second) hit all of them alike.
    times = {key: [] for key in calls}
    for r in range(args.rounds):
        for key, call in rotation(list(calls.items()), r):
            times[key].append(median_ms(call, args.reps))
        print(f"  round {r + 1}: " + ", ".join(f"{v} #{i} {times[v, i][-1]:.3f}" for v, i in calls), flush=True)
    rows = []
    for variant in variants:
        base = None
        for i, cfg in enumerate(configs):
            ts = sorted(times[variant, i])
            ms = ts[len(ts) // 2]
            base = base or ms
            rows.append((variant, json.dumps(cfg), ms, ts[0], ts[-1], flops / ms / 1e9, base / ms))
    print(f"\n{torch.cuda.get_device_name()} | B=1 H={args.heads} L={args.seq_len} D={args.head_dim} bf16 "
          f"topk={args.topk} block {args.block} | forward kernels given the block map, CUDA-event medians\n")
    print(f"median of {args.rounds} rounds (each a median of {args.reps} calls), min and max round\n")
    print("| variant | config | ms | min–max | sparse TFLOP/s | × first |\n|---|---|---|---|---|---|")
    for variant, cfg, ms, lo, hi, tflops, ratio in rows:
        print(f"| {variant} | `{cfg}` | {ms:.3f} | {lo:.3f}–{hi:.3f} | {tflops:.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
