"""Several CUDA graphs of ``slagen.attention`` in one process: capture one per (shape, feature map), then replay
each, with a synchronisation after every replay, and say which replay fails first.

    python tools/graph_replays.py                                  # session 25's failing set (H200)
    python tools/graph_replays.py --shapes 2048x4,4096x2 --fmaps softmax --backend tilelang
    python tools/graph_replays.py --shapes 32760x12 --fmaps softmax,none --keep-outputs

Session 25 (H200, tilelang): a probe captured graphs of the forward given a block map for L×H = 2048×4,
4096×2, 8192×1 and 32760×12 with and without the linear branch (as the README's capture recipe does it,
warm-up calls on a side stream first), then replayed them: the first replay raised "an illegal memory
access"; each setup alone, in its own process, ran. This tool repeats that sequence with switches to narrow
it down: each graph on a stream of its own (``--stream-per-graph``; graphs captured on one stream share its
cuBLAS workspace, pytorch/pytorch#193402), cuBLAS's workspaces cleared before each capture
(``--clear-cublas``), the outputs kept alive, the map given or built in the call, one pool for all graphs.
Session 26 (H200, session 25's final kernels): the default run and nine variants (those switches, all four
feature maps, other shape orders) all replayed without error: the failure is not reproduced.
"""

from __future__ import annotations

import argparse

import torch

import slagen


def capture(call, pool=None, stream=None, clear_cublas=False):
    """A CUDA graph of ``call()`` after three warm-up calls on a side stream, and the output it writes;
    captured on ``stream`` (None: torch.cuda.graph's own, the same for every graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    if clear_cublas:
        torch.cuda.synchronize()
        torch._C._cuda_clearCublasWorkspaces()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = call()
    torch.cuda.synchronize()
    return graph, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="2048x4,4096x2,8192x1,32760x12", help="comma-separated LxH")
    ap.add_argument("--fmaps", default="softmax,none", help="comma-separated feature maps (none: sparse-only)")
    ap.add_argument("--backend", default="tilelang")
    ap.add_argument("--build-map", action="store_true", help="build the block map inside each call")
    ap.add_argument("--keep-outputs", action="store_true", help="keep each graph's output tensor alive")
    ap.add_argument("--shared-pool", action="store_true", help="capture every graph into one memory pool")
    ap.add_argument("--stream-per-graph", action="store_true", help="capture each graph on a stream of its own")
    ap.add_argument("--clear-cublas", action="store_true", help="clear cuBLAS's workspaces before each capture")
    args = ap.parse_args()
    dev = torch.device("cuda")
    pool = torch.cuda.graph_pool_handle() if args.shared_pool else None
    graphs = []
    with torch.no_grad():
        for shape in args.shapes.split(","):
            L, H = map(int, shape.split("x"))
            gen = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(1, H, L, 128, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
            bmap = None if args.build_map else slagen.block_map(q, k, topk=0.05, block_q=128, block_k=64)
            for fmap in args.fmaps.split(","):
                fm = None if fmap == "none" else fmap

                def call(q=q, k=k, v=v, bmap=bmap, fm=fm):
                    return slagen.attention(q, k, v, topk=0.05, feature_map=fm, block_map=bmap, block_q=128,
                                            block_k=64, backend=args.backend)
                stream = torch.cuda.Stream() if args.stream_per_graph else None
                graph, out = capture(call, pool, stream, args.clear_cublas)
                graphs.append((f"L{L} H{H} {fmap}", graph, out if args.keep_outputs else None,
                               (q, k, v, bmap, stream)))
                print(f"captured {graphs[-1][0]}", flush=True)
        for name, graph, out, _ in graphs:
            try:
                graph.replay()
                torch.cuda.synchronize()
            except Exception as err:      # the context is lost after an illegal address: stop at the first
                print(f"replay {name}: FAILED ({type(err).__name__}: {str(err).splitlines()[0]})", flush=True)
                raise SystemExit(1)
            finite = "" if out is None else f", output finite: {bool(out.isfinite().all())}"
            print(f"replay {name}: ok{finite}", flush=True)


if __name__ == "__main__":
    main()
