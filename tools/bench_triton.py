"""Benchmark slagen's Triton backend against dense SDPA (cuDNN, flash) and FlexAttention on one GPU.

All rows are measured in the same process on the same inputs; ratios are to dense SDPA-cuDNN and to
FlexAttention given slagen's own block list (sparse branch only — Flex has no linear branch). SLA's time
includes the block map and the linear branch. Dense-equivalent TFLOP/s = 4·B·H·L²·D / t (×3.5 for
forward+backward).

    python tools/bench_triton.py --seq-len 32760 --heads 12 --head-dim 128 --blocks 64x64,128x64 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import slagen


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def inference(f, q, k, v):
    def run():
        with torch.no_grad():
            return f(q, k, v)
    return run


def fwd_bwd(f, q, k, v, do):
    def run():
        out = f(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)
    return run


def flex_block_mask(bmap, lq, lk, block_q, block_k):
    """FlexAttention BlockMask holding slagen's critical blocks as full blocks."""
    from torch.nn.attention.flex_attention import BlockMask
    B, H, tm, tn = bmap.mask.shape
    idx = torch.zeros(B, H, tm, tn, dtype=torch.int32, device=bmap.mask.device)
    idx[..., :bmap.crit_lut.shape[-1]] = bmap.crit_lut.clamp_min(0)
    zeros_cnt = torch.zeros_like(bmap.crit_count)
    return BlockMask.from_kv_blocks(zeros_cnt, torch.zeros_like(idx), bmap.crit_count.contiguous(), idx,
                                    BLOCK_SIZE=(block_q, block_k), seq_lengths=(lq, lk))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=32760)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--blocks", default="64x64,128x64")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    B, H, L, D = args.batch, args.heads, args.seq_len, args.head_dim
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
               for _ in range(3))
    do = torch.randn(B, H, L, D, device=dev, dtype=dtype, generator=gen)
    flops = 4 * B * H * L * L * D
    rows = []

    def record(name, fwd=None, fb=None, mem=None, note=""):
        rows.append(dict(name=name, fwd_ms=fwd, fwd_bwd_ms=fb, peak_mib=mem, note=note))
        print(f"  {name}: fwd {fwd} ms, fwd+bwd {fb} ms, peak {mem} MiB {note}", flush=True)

    def attempt(name, fwd_fn, fb_fn=None, note=""):
        try:
            f = median_ms(fwd_fn)
            fb = median_ms(fb_fn) if fb_fn else None
            mem = peak_mib(fb_fn or fwd_fn)
            record(name, f, fb, mem, note)
        except Exception as err:  # a failing baseline is reported, the run goes on
            record(name, note=f"FAILED: {type(err).__name__}: {str(err)[:200]}")

    for backend, label in ((SDPBackend.CUDNN_ATTENTION, "dense SDPA cuDNN"),
                           (SDPBackend.FLASH_ATTENTION, "dense SDPA flash")):
        def sdpa(q_, k_, v_, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q_, k_, v_)
        attempt(label, inference(sdpa, q, k, v), fwd_bwd(sdpa, q, k, v, do))

    for block in args.blocks.split(","):
        bq, bk = map(int, block.split("x"))
        cfg = dict(topk=args.topk, block_q=bq, block_k=bk, backend="triton")
        bmap = slagen.block_map(q, k, **cfg)
        n_crit = bmap.crit_lut.shape[-1]
        tn = bmap.mask.shape[-1]
        tag = f"{bq}x{bk}, {n_crit}/{tn} blocks"
        attempt(f"slagen block map [{tag}]", lambda: slagen.block_map(q, k, **cfg))  # noqa: B023
        for fmap, scope, what in (("softmax", "marginal", "SLA marginal"), ("softmax", "all", "SLA all"),
                                  (None, "marginal", "sparse-only")):
            f = lambda q_, k_, v_, fmap=fmap, scope=scope: slagen.attention(  # noqa: E731
                q_, k_, v_, feature_map=fmap, scope=scope, **cfg)
            attempt(f"slagen-triton {what} [{tag}]", inference(f, q, k, v), fwd_bwd(f, q, k, v, do))
        if not args.no_flex:
            try:
                from torch.nn.attention.flex_attention import flex_attention
                mask = flex_block_mask(bmap, L, L, bq, bk)
                compiled = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")
                flex = lambda q_, k_, v_: compiled(q_, k_, v_, block_mask=mask)  # noqa: E731
                attempt(f"FlexAttention same blocks [{tag}]", inference(flex, q, k, v), fwd_bwd(flex, q, k, v, do))
            except Exception as err:
                record(f"FlexAttention same blocks [{tag}]", note=f"FAILED: {type(err).__name__}: {str(err)[:200]}")

    cudnn = next(r for r in rows if r["name"] == "dense SDPA cuDNN")
    print(f"\n{torch.cuda.get_device_name()} | B={B} H={H} L={L} D={D} {args.dtype} topk={args.topk} | "
          f"torch {torch.__version__}")
    print("| what | fwd ms | fwd+bwd ms | fwd × cuDNN | f+b × cuDNN | fwd × Flex | f+b × Flex | "
          "dense-eq TFLOP/s fwd | peak MiB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        block = r["name"].split("[")[-1] if "[" in r["name"] else None
        flex = next((x for x in rows if x["name"].startswith("FlexAttention") and block and x["name"].endswith(block)),
                    None)

        def ratio(base, key):
            return f"{base[key] / r[key]:.2f}" if base and base.get(key) and r.get(key) else ""

        def fmt(x):
            return f"{x:.3f}" if isinstance(x, float) else ""
        tflops = f"{flops / (r['fwd_ms'] * 1e-3) / 1e12:.0f}" if r["fwd_ms"] else ""
        print(f"| {r['name']} | {fmt(r['fwd_ms'])} | {fmt(r['fwd_bwd_ms'])} | {ratio(cudnn, 'fwd_ms')} | "
              f"{ratio(cudnn, 'fwd_bwd_ms')} | {ratio(flex, 'fwd_ms')} | {ratio(flex, 'fwd_bwd_ms')} | {tflops} | "
              f"{fmt(r['peak_mib'])} | {r['note']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), B=B, H=H, L=L, D=D, dtype=args.dtype,
                           topk=args.topk, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
