"""Time fwd.mask_operands' launch choices on a GPU (rows and columns per program, warps).

    python tools/sweep_mask_operands.py                   # the headline shapes, every candidate
    python tools/sweep_mask_operands.py --heads 40 --seq-len 75600

mask_operands forms a mask GEMM's 0/1 operand and the z sums of the selected blocks (backends/triton/fwd.py:
one elementwise kernel, then a GEMM of the operand with z split into three planes). Cases: the forward's marginal selection at 64×64 and 128×64 blocks, and the backward's
excluded selection over the transposed mask (strided reads). Each candidate's output is compared with the
default launch's (operand equal, z sums to 1e-6 relative) before it is timed; the table prints µs per call
(triton.testing.do_bench median) and the floor from bytes moved at 4.8 TB/s.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import triton.testing

from slagen import codegen
from slagen.backends import linear_terms
from slagen.backends.triton import fwd
from slagen.spec import KernelSpec

CANDIDATES = [dict(block_m=m, block_j=j, warps=w)
              for m, j, w in itertools.product((16, 32, 64), (32, 64, 128), (4, 8)) if m * j // (32 * w) <= 64]


def cases(heads: int, seq_len: int, d: int):
    """(name, mask (B, H, T_m, T_n) int8 view, excluded) for the forward and the backward's transposed mask."""
    for bq, bk in ((64, 64), (128, 64)):
        tm, tn = math.ceil(seq_len / bq), math.ceil(seq_len / bk)
        mask = (torch.rand(1, heads, tm, tn, device="cuda") < 0.05).to(torch.int8)   # 5 % critical
        yield f"fwd marginal {bq}x{bk}", mask, False
        yield f"bwd excluded, transposed {bq}x{bk}", mask.transpose(-1, -2), True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=32760)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    d = args.head_dim
    mod = codegen.load(KernelSpec(arch="sm90", head_dim=d, block_q=64, block_k=64, feature_map="softmax",
                                  dtype="bf16"), "triton")
    print(f"{torch.cuda.get_device_name()} | H={args.heads} L={args.seq_len} D={d} | default "
          f"{fwd.MASK_OPERANDS_LAUNCH}")
    print("| case | T_m×T_n | floor µs | default µs | best µs | best launch |")
    print("|---|---|---|---|---|---|")
    for name, mask, excluded in cases(args.heads, args.seq_len, d):
        _, H, tm, tn = mask.shape
        k_cols = linear_terms.padded_rows(tn)
        z = torch.rand(1, H, k_cols, d, device="cuda") * 64
        want_a, want_z = fwd.mask_operands(mod, mask, z, k_cols, torch.bfloat16, excluded=excluded)
        # bytes: mask read, the operand three times side by side (bf16) written and read by the GEMM, z read,
        # planes written and read, the GEMM's fp32 result (the z sums) written
        floor_us = H * (tm * (tn + 12 * k_cols + 4 * d) + k_cols * (4 * d + 12 * d)) / 4.8e12 * 1e6
        timed = []
        for launch in [fwd.MASK_OPERANDS_LAUNCH] + [c for c in CANDIDATES if c != fwd.MASK_OPERANDS_LAUNCH]:
            call = lambda: fwd.mask_operands(mod, mask, z, k_cols, torch.bfloat16, excluded=excluded,  # noqa: E731
                                             launch=launch)
            try:
                a, zs = call()
            except Exception as exc:   # a launch the compiler refuses (shared memory, registers): reported
                print(f"  {name} {launch}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            assert torch.equal(a, want_a), (name, launch)
            err = ((zs - want_z).norm() / want_z.norm().clamp_min(1e-30)).item()
            assert err < 1e-6, (name, launch, err)
            timed.append((triton.testing.do_bench(call, warmup=10, rep=50) * 1e3, launch))
        default = timed[0][0]
        best, best_launch = min(timed, key=lambda t: t[0])
        print(f"| {name} | {tm}×{tn} | {floor_us:.1f} | {default:.1f} | {best:.1f} | {best_launch} |")
        for t, launch in sorted(timed, key=lambda t: t[0])[:5]:
            print(f"|   | | | | {t:.1f} | {launch} |")


if __name__ == "__main__":
    main()
