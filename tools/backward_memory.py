"""Peak memory and time of SLA forward+backward per head-group budget of the backward (prep.temp_budget).

    python tools/backward_memory.py                                   # headline shape, both backends
    python tools/backward_memory.py --budgets 0,0.5,1.25,2 --backend triton --seq-len 75600 --heads 40
    python tools/backward_memory.py --budgets 0 --at-peak 12          # what is alive at the peak
    python tools/backward_memory.py --backend tilelang --budgets 0 --at-peak 12 --stacks all   # + C++ sites

The backward forms its linear-branch temporaries head group by head group (slagen.backends.triton.bwd,
_head_groups); the budget is a multiple of q's bytes, 0 = all heads at once. Each budget is set as the
default config's value (bwd.TEMP_BUDGET; a tuned backward record would override it, so run with an empty
SLAGEN_CACHE_DIR, and without SLAGEN_BACKWARD_TEMP_BUDGET, which overrides both). Per backend and budget:
f+b through slagen.attention as `slagen bench` times it (median ms, peak MiB above the inputs) and dense
SDPA (cuDNN) for reference, in one process. With --trace N: the N host-side operations (aten ops, CUDA
runtime calls) with the most own CPU time over 3 calls — where a synchronisation or an allocation hides
(session 7: budget 1.25 made the call host-bound). With --at-peak N: the N largest allocations alive at the
f+b peak and the slagen line that made each (slagen.bench.peak_allocations, the allocator's history).
"""

from __future__ import annotations

import argparse
import os

import torch
from triton.testing import do_bench

import slagen
from slagen.backends.triton import bwd
from slagen.bench import peak_allocations, peak_mib
from profile_sla import add_shape_args, shape_inputs


def host_trace(fn, top: int) -> str:
    """Table of the ``top`` host operations of 3 calls of ``fn`` by own CPU time (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def at_peak(fn, top: int, stacks: str) -> str:
    """The ``top`` largest allocations alive at the peak of one call of ``fn``, with their sites."""
    peak, alive = peak_allocations(fn, stacks)
    lines = [f"    peak {peak:.0f} MiB; alive then ({len(alive)} allocations, largest first):"]
    lines += [f"    {mib:9.1f} MiB  {site}" for mib, site in alive[:top]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="triton,tilelang")
    ap.add_argument("--budgets", default="0,1.25")
    ap.add_argument("--trace", type=int, default=0, help="print the N costliest host operations per budget")
    ap.add_argument("--at-peak", type=int, default=0, help="print the N largest allocations alive at the peak")
    ap.add_argument("--stacks", choices=("python", "all"), default="python",
                    help="frames --at-peak records: 'all' adds C++ frames, naming allocations no Python code made")
    add_shape_args(ap)
    args = ap.parse_args()
    if os.environ.get(bwd.TEMP_BUDGET_ENV, "").strip():
        ap.error(f"{bwd.TEMP_BUDGET_ENV} is set: it would override every budget this tool sets; unset it")
    bq, bk, (q, k, v, do) = shape_inputs(args)
    for t in (q, k, v):
        t.requires_grad_(True)

    def dense():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)

    rows = [("dense SDPA cuDNN", "", do_bench(dense, warmup=5, rep=20, return_mode="median"), peak_mib(dense))]
    for name in args.backend.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            bwd.TEMP_BUDGET = budget

            def fwd_bwd(name=name):
                out = slagen.attention(q, k, v, topk=args.topk, block_q=bq, block_k=bk, backend=name)
                torch.autograd.grad(out, (q, k, v), do)
            rows.append((f"slagen-{name} SLA marginal", budget, do_bench(fwd_bwd, warmup=10, rep=50,
                                                                         return_mode="median"), peak_mib(fwd_bwd)))
            print(f"  {name} temp_budget {budget}: done", flush=True)
            if args.trace:
                print(host_trace(fwd_bwd, args.trace), flush=True)
            if args.at_peak:
                print(at_peak(fwd_bwd, args.at_peak, args.stacks), flush=True)
    print(f"\n{torch.cuda.get_device_name()} | B=1 H={args.heads} L={args.seq_len} D={args.head_dim} bf16 "
          f"topk={args.topk} block {args.block}\n")
    print("| what | temp_budget | fwd+bwd ms | peak MiB | peak × cuDNN |\n|---|---|---|---|---|")
    base = rows[0][3]
    for what, budget, ms, mib in rows:
        print(f"| {what} | {budget} | {ms:.3f} | {mib:.0f} | {mib / base:.2f} |")


if __name__ == "__main__":
    main()
