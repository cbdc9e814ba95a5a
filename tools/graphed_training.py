"""Forward+backward of a SparseLinearAttention eagerly and from CUDA graphs (torch.cuda.make_graphed_callables),
per sequence length: what graphing buys a training step whose attention is host-bound (short sequences).

    python tools/graphed_training.py [--lengths 8192,16384,32760] [--heads 12] [--block 128x64] [--backend auto]

Per length: median ms of one forward+backward (triton.testing.do_bench) of the eager module and of the graphed
one (its input copies included), and their ratio.
"""

from __future__ import annotations

import argparse
import copy

import torch

import slagen
from slagen.bench import median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,16384,32760")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", default="128x64")
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    bq, bk = (int(x) for x in args.block.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  B=1 H={args.heads} D={args.head_dim} block {args.block} topk {args.topk} "
          f"backend {args.backend} (ms per forward+backward)")
    print("| L | eager | graphed | eager / graphed |\n|---|---|---|---|")
    for length in (int(x) for x in args.lengths.split(",")):
        module = slagen.SparseLinearAttention(args.head_dim, topk=args.topk, block_q=bq, block_k=bk,
                                              backend=args.backend).cuda()
        shape = (1, args.heads, length, args.head_dim)
        q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        # (make_graphed_callables graphs a module in place: the eager one stays a copy)
        graphed = torch.cuda.make_graphed_callables(copy.deepcopy(module), (q, k, v))
        times = [median_ms(lambda fn=fn: torch.autograd.grad(fn(q, k, v), [q, k, v, *fn.parameters()], do))
                 for fn in (module, graphed)]
        print(f"| {length} | {times[0]:.3f} | {times[1]:.3f} | {times[0] / times[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
