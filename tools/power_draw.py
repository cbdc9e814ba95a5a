"""Each workload's time per call when the card is cool and when it runs sustained at its power limit, with the
SM clock and board power nvidia-smi samples meanwhile (every 50 ms, in the background).

    python tools/power_draw.py                        # headline shape: SLA marginal, sparse-only, cuDNN, a copy
    python tools/power_draw.py --seq-len 16384 --seconds 3

For every workload, captured as a CUDA graph of ``--calls`` calls:
  cool ms       one replay right after an idle second (the first ~20 ms of load: boost clock)
  sustained ms  replays back to back for ``--seconds``, timed over the last part (after 1 s of load)
  SM MHz, W     means of nvidia-smi's samples over that timed part (min clock in brackets)

Why (docs/perf-notes.md, session 22): an H200 running SLA or dense attention back to back reaches its 700 W
limit within ~0.1 s and lowers the SM clock (1980 -> ~1700 MHz); a compute-bound kernel then runs that much
slower, a memory-bound one does not. slagen bench's GPU column (do_bench_cudagraph: ~0.5 s of replays) and
tools/forward_configs.py's rounds measure that sustained state; a short burst after idle measures the boost clock.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import time

import torch

import slagen


def graph_of(fn, calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` back-to-back calls of ``fn`` (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return graph


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """ms of ``replays`` back-to-back replays (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def sustained(graph: torch.cuda.CUDAGraph, seconds: float, warm: float = 1.0):
    """(ms per replay over the timed part, its wall-clock start and end): replays back to back for ``seconds``,
    the first ``warm`` seconds untimed."""
    t0 = time.time()
    while time.time() - t0 < warm:
        graph.replay()
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin, n = time.time(), 0
    start.record()
    while time.time() - t0 < seconds:
        graph.replay()
        n += 1
        if n % 4 == 0:        # keep the host within a few replays of the GPU, so wall time tracks GPU time
            torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n, begin, time.time()


def parse_samples(text: str):
    """[(unix time, SM MHz, W)] from nvidia-smi's csv lines (its timestamps are local time, as time.time())."""
    rows = []
    for line in text.strip().splitlines():
        stamp, clock, power = (x.strip() for x in line.split(","))
        when = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
        rows.append((when, float(clock), float(power)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--calls", type=int, default=10, help="calls per graph")
    ap.add_argument("--seconds", type=float, default=2.2, help="sustained load per workload (the first 1 s untimed)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("power_draw.py needs a CUDA GPU (and nvidia-smi)")
    dev = torch.device("cuda")
    torch.set_grad_enabled(False)
    q, k, v = (torch.randn(1, args.heads, args.seq_len, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    api = dict(topk=0.05, block_q=128, block_k=64, backend="tilelang")
    bmap = slagen.block_map(q, k, **api)
    src, dst = (torch.empty(2 * q.numel(), device=dev, dtype=q.dtype) for _ in range(2))
    workloads = {
        "SLA marginal forward (block map built)": lambda: slagen.attention(q, k, v, **api),
        "sparse-only forward (map given)": lambda: slagen.attention(q, k, v, block_map=bmap, feature_map=None, **api),
        "dense SDPA (cuDNN)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        f"copy ({src.numel() * 2 / 2**20:.0f} MiB each way)": lambda: dst.copy_(src),
    }
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "50"], stdout=subprocess.PIPE, text=True)
    results = []
    try:
        for name, fn in workloads.items():
            graph = graph_of(fn, args.calls)
            time.sleep(1.0)                                  # idle: the clock back at boost
            cool = replay_ms(graph, 1) / args.calls
            ms, begin, end = sustained(graph, args.seconds)
            results.append((name, cool, ms / args.calls, begin, end))
            print(f"  {name}: done", flush=True)
    finally:
        smi.terminate()
    samples = parse_samples(smi.communicate()[0])
    print(f"\n{torch.cuda.get_device_name()} | B=1 H={args.heads} L={args.seq_len} D=128 bf16 | graphs of {args.calls} "
          f"calls; sustained: {args.seconds - 1:.1f} s timed after 1 s of load\n")
    print("| workload | cool ms | sustained ms | slower | SM MHz (min) | W |\n|---|---|---|---|---|---|")
    for name, cool, ms, begin, end in results:
        part = [s for s in samples if begin <= s[0] <= end]
        clock = f"{statistics.mean(s[1] for s in part):.0f} ({min(s[1] for s in part):.0f})" if part else "n/a"
        power = f"{statistics.mean(s[2] for s in part):.0f}" if part else "n/a"
        print(f"| {name} | {cool:.4f} | {ms:.4f} | {ms / cool - 1:+.1%} | {clock} | {power} |")


if __name__ == "__main__":
    main()
