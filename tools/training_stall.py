"""Bisect a stall of graphed training: each variant in a child process of its own, killed at a time limit, that
graphs a SparseLinearAttention (torch.cuda.make_graphed_callables) and replays it in stages; the report names
the last stage each child reached.

    python tools/training_stall.py                                    # L 4096, H 12, 128x64, TileLang
    python tools/training_stall.py --soak 20000                       # then 20000 more, back to back
    python tools/training_stall.py --variant base='{}' \\
        --variant qs='{"backward": {"query_state": "triton"}}' \\
        --variant fwd1='{"forward": {"overlap": false}}'

It found the stall of sessions 32-34 (H200, session 35; docs/perf-notes.md): the dK/dV kernel with two CTAs per SM
(then the default) hung the GPU at random, graphed or eager, in 11 of 12 soaks of L 4096 forward+backward, most
within 1500 calls; one CTA per SM (now the only choice) ran 41000 calls without one. A variant is a JSON object of
TileLang config overrides per role ("forward", "backward"), returned as the tuned config of that role
(slagen.autotune.select.config_for), so every call of the child runs them. Stages, in order:

    graphed     make_graphed_callables returned (three warm-up calls and the two captures ran)
    fwd         forward replays, each synchronised
    fwd+bwd     forward+backward replays, each synchronised
    unsynced    forward+backward replays back to back, one synchronisation at the end
    cleared     the same with a 256 MiB cache clear before each (what do_bench does)
    do_bench    triton.testing.do_bench of one forward+backward
    soak        --soak N more forward+backward replays back to back (a synchronisation, and a progress line, per
                1000)
A child prints each stage as it completes; one killed at --limit seconds is reported with the last stage it
completed, and Python's stacks of the stuck call (faulthandler, a few seconds before the limit). The exit status
is 1 if any child stalled or failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MARK = "STAGE "


def parse_variant(text: str):
    """'NAME=JSON' -> (name, {role: overrides}); roles 'forward' and 'backward' only."""
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: expected NAME=JSON")
    roles = json.loads(spec or "{}")
    if not isinstance(roles, dict) or set(roles) - {"forward", "backward"} or \
            not all(isinstance(v, dict) for v in roles.values()):
        raise ValueError(f"--variant {text!r}: JSON must map 'forward' / 'backward' to config overrides")
    return name, roles


def last_stage(output: str) -> str:
    """The last stage a child's output marks as completed ('' for none)."""
    done = [line[len(MARK):].split()[0] for line in output.splitlines() if line.startswith(MARK)]
    return done[-1] if done else ""


def run_variant(cmd: list, limit: float) -> tuple:
    """(status 'ok' | 'stalled' | 'failed', last stage completed, seconds, child output) of one child."""
    start = time.monotonic()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        output, status = run.stdout + run.stderr, "ok" if run.returncode == 0 else "failed"
    except subprocess.TimeoutExpired as err:
        output = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (err.stdout, err.stderr))
        status = "stalled"
    return status, last_stage(output), time.monotonic() - start, output


def child(args, roles: dict) -> None:
    import faulthandler

    import torch

    import slagen
    from slagen.autotune import select
    from slagen.bench import median_ms
    faulthandler.dump_traceback_later(max(args.limit - 5, 1), exit=False)
    found = select.config_for
    select.config_for = lambda spec, backend, *a, **kw: (
        roles.get(spec.role) if backend == "tilelang" and spec.role in roles else found(spec, backend, *a, **kw))
    bq, bk = (int(x) for x in args.block.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, args.heads, args.seq_len, args.head_dim)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    module = slagen.SparseLinearAttention(args.head_dim, topk=args.topk, block_q=bq, block_k=bk,
                                          backend=args.backend).cuda()
    graphed = torch.cuda.make_graphed_callables(module, (q, k, v))
    leaves = [q, k, v, *graphed.parameters()]

    def fb():
        torch.autograd.grad(graphed(q, k, v), leaves, do)

    def mark(stage: str, t0: float) -> None:
        torch.cuda.synchronize()
        print(f"{MARK}{stage} {time.monotonic() - t0:.2f} s", flush=True)
    t0 = time.monotonic()
    mark("graphed", t0)
    for _ in range(args.replays):
        graphed(q, k, v)
        torch.cuda.synchronize()
    mark("fwd", t0)
    for _ in range(args.replays):
        fb()
        torch.cuda.synchronize()
    mark("fwd+bwd", t0)
    for _ in range(10 * args.replays):
        fb()
    mark("unsynced", t0)
    cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(10 * args.replays):
        cache.zero_()
        fb()
    mark("cleared", t0)
    print(f"do_bench ms {median_ms(fb):.3f}", flush=True)
    mark("do_bench", t0)
    if args.soak:
        for done in range(1, args.soak + 1):
            fb()
            if done % 1000 == 0 or done == args.soak:
                torch.cuda.synchronize()
                print(f"soak {done} / {args.soak} calls, {time.monotonic() - t0:.1f} s", flush=True)
        mark("soak", t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", default="128x64")
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--backend", default="tilelang")
    ap.add_argument("--replays", type=int, default=30, help="replays of the synchronised stages (10x unsynced)")
    ap.add_argument("--soak", type=int, default=0, help="forward+backward replays after do_bench (default 0: none)")
    ap.add_argument("--limit", type=float, default=120.0, help="seconds before a child is killed")
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON (repeatable; default: base={})")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args, json.loads(args.child))
        return
    variants = [parse_variant(v) for v in args.variant] or [("base", {})]
    shape = [f"--seq-len={args.seq_len}", f"--heads={args.heads}", f"--head-dim={args.head_dim}",
             f"--block={args.block}", f"--topk={args.topk}", f"--backend={args.backend}",
             f"--replays={args.replays}", f"--soak={args.soak}", f"--limit={args.limit}"]
    print(f"L {args.seq_len} H {args.heads} D {args.head_dim} block {args.block} {args.backend}, "
          f"soak {args.soak}, limit {args.limit:.0f} s per variant")
    print("| variant | config | status | last stage completed | s |\n|---|---|---|---|---|")
    stalled = False
    for name, roles in variants:
        status, stage, seconds, output = run_variant(
            [sys.executable, __file__, *shape, f"--child={json.dumps(roles)}"], args.limit)
        stalled |= status != "ok"
        print(f"| {name} | {json.dumps(roles)} | {status} | {stage or '—'} | {seconds:.0f} |", flush=True)
        if status != "ok":
            print("\n".join(f"    {line}" for line in output.splitlines()[-40:]), flush=True)
    raise SystemExit(1 if stalled else 0)


if __name__ == "__main__":
    main()
