"""Host (CPU) time per call of each layer of the slagen call stack, on a GPU, at a small shape.

    python tools/host_overhead.py [--backend triton] [--seq-len 8192] [--block 128x64] [--cprofile 30]

Each row is the wall time per call while the GPU is held busy by a sleep kernel (so no call waits for
the GPU): the backend's kernels called directly, the torch.library operator around them, and the public
API (block map + forward, as a user calls it). The differences are what each layer costs. With
``--backend tilelang`` one more row: the host time from the public call's start to its sparse forward
kernel's launch — an eager call timed alone (the bench's eager column) takes about that plus the forward
kernel's GPU time, since the short kernels before it wait for their launches (docs/perf-notes.md, session 16).
Then the cProfile of the public call: the functions with the most own time and the most cumulative time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from profile_sla import add_shape_args, cprofile_report, host_ms, shape_inputs  # noqa: E402

import slagen  # noqa: E402
from slagen import backends, ops, reference  # noqa: E402


def host_ms_to_forward_launch(fn, n: int = 20) -> float:
    """Median host ms from the start of ``fn()`` (a TileLang-backend forward call) to its sparse forward
    kernel's launch — the last TileLang launch of the call (after the linear pre-pass) — timed as host_ms times
    (TileLang's kernel class is wrapped to stamp the time of each launch)."""
    from slagen.backends import tilelang as tl_backend
    fn()
    kernel_class = type(next(iter(tl_backend._KERNELS.values())))
    launch = kernel_class.__call__
    starts, stamps = [], []

    def stamped(self, *args, **kwargs):
        stamps[-1] = time.perf_counter()
        return launch(self, *args, **kwargs)

    def call():
        starts.append(time.perf_counter())
        stamps.append(None)
        fn()

    kernel_class.__call__ = stamped
    try:
        host_ms(call, n)
    finally:
        kernel_class.__call__ = launch
    if None in stamps:
        raise RuntimeError("a call launched no TileLang kernel")
    return statistics.median(t - s for s, t in zip(starts, stamps)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="triton")
    add_shape_args(ap, seq_len=8192)
    ap.add_argument("--cprofile", type=int, default=30)
    args = ap.parse_args()
    bq, bk, (q, k, v) = shape_inputs(args, 3)
    topk = args.topk
    be = backends.get(args.backend)
    n_crit, n_negl = reference.block_counts(reference.num_blocks(args.seq_len, bk), topk, 0.0)
    maps = list(be.block_map(q, k, n_crit, n_negl, bq, bk))
    cfg = dict(block_q=bq, block_k=bk, scale=q.shape[-1] ** -0.5, feature_map="softmax", scope="marginal",
               eps=reference.EPS)
    api = dict(topk=topk, block_q=bq, block_k=bk, backend=args.backend)
    bmap = slagen.block_map(q, k, **api)

    def public():
        with torch.no_grad():
            return slagen.attention(q, k, v, **api)

    def public_grad():
        return slagen.attention(q.requires_grad_(True), k, v, **api)

    rows = [
        ("backend block_map (direct)", lambda: be.block_map(q, k, n_crit, n_negl, bq, bk)),
        ("slagen::block_map op", lambda: ops.block_map_op(q, k, topk, 0.0, bq, bk, args.backend)),
        ("slagen.block_map (public)", lambda: slagen.block_map(q, k, **api)),
        ("backend forward (direct, map given)", lambda: be.forward(q, k, v, maps, None, None, False, **cfg)),
        ("slagen::sla_fwd op (map given)", lambda: ops.sla_fwd(q, k, v, maps, None, None, bq, bk, cfg["scale"],
                                                                "softmax", "marginal", reference.EPS, False,
                                                                args.backend)),
        ("slagen.attention no_grad (map given)", lambda: slagen.attention(q, k, v, block_map=bmap, **api)),
        ("slagen.attention no_grad", public),
        ("slagen.attention, q requires grad", public_grad),
    ]
    out = [(name, host_ms(fn) * 1e3) for name, fn in rows]
    if args.backend == "tilelang":
        out.append(("slagen.attention no_grad: start to the sparse forward's launch",
                    host_ms_to_forward_launch(public) * 1e3))
    # what the layers are made of: primitives each call repeats (µs per call, 200 calls)
    dev = q.device
    fields = dict(block_q=bq, block_k=bk, feature_map="softmax", scope="marginal", has_negligible=False,
                  role="forward")
    prims = [
        ("torch.cuda.get_device_capability", lambda: torch.cuda.get_device_capability(dev)),
        ("torch.cuda.get_device_properties", lambda: torch.cuda.get_device_properties(dev)),
        ("torch.empty (CUDA, 1 MiB)", lambda: torch.empty(1 << 19, dtype=torch.bfloat16, device=dev)),
        ("api._resolve_backend (forward spec)", lambda: slagen.api._resolve_backend(args.backend, q, **fields)),
        ("ops.direct", lambda: ops.direct(q, k, v, None, None)),
        ("backend block_map (direct, 4 Triton launches)", lambda: be.block_map(q, k, n_crit, n_negl, bq, bk)),
    ]
    out += [(f"primitive: {name}", host_ms(fn, n=200) * 1e3) for name, fn in prims]
    print(cprofile_report(public, "slagen.attention no_grad", args.cprofile, keys=("tottime", "cumulative")))
    print(f"\n{torch.cuda.get_device_name()} | {args.backend} | B=1 H={args.heads} L={args.seq_len} "
          f"D={args.head_dim} bf16 | torch {torch.__version__}\n")
    print("| layer | host µs per call |\n|---|---|")
    for name, us in out:
        print(f"| {name} | {us:.0f} |")


if __name__ == "__main__":
    main()
