"""What bounds each kernel of one call: a workload for Nsight Compute, and the table of its report.

Session 31 found this way that the TileLang dK/dV kernel ran at 43 % SM throughput and 0.83 IPC with nothing near a
peak (one CTA per SM; docs/perf-notes.md). On the GPU, one workload per ncu process:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --csv --page details \\
        python tools/ncu_kernels.py sla > sla.csv
    python tools/ncu_kernels.py --table sla.csv          # anywhere: the markdown table of the report

Workloads (headline shape by default: B=1, H=12, L=32760, D=128, bf16, topk 5 %, 128x64): ``sla`` (SLA marginal,
TileLang, its block map included), ``sparse`` (sparse-only given the block map), ``sparse-map`` (sparse-only with its
block map: the pooling, scores and selection kernels before the sparse one), ``cudnn`` (dense SDPA, cuDNN). Each
runs forward+backward (``--forward``: the forward alone, under no_grad) three times unprofiled, then once between
cudaProfilerStart / Stop. The gradients come from ``torch.autograd.grad``: no accumulation into ``.grad`` (whose add
kernels would show up in the report). ncu replays each kernel alone, so its times are at full clock, not at the
card's power limit (docs/perf-notes.md, session 22).
"""

from __future__ import annotations

import argparse
import csv
import io
from collections import OrderedDict
from typing import Dict, List, Tuple

# ncu metric name -> table column (SpeedOfLight, ComputeWorkloadAnalysis, MemoryWorkloadAnalysis, Occupancy and
# LaunchStats sections; a column a report lacks stays blank)
COLUMNS = OrderedDict([("Duration", "µs"), ("Compute (SM) Throughput", "SM %"), ("DRAM Throughput", "DRAM %"),
                       ("L2 Cache Throughput", "L2 %"), ("L1/TEX Cache Throughput", "L1 %"),
                       ("Executed Ipc Active", "IPC"), ("L2 Hit Rate", "L2 hit %"),
                       ("Achieved Occupancy", "occupancy %"), ("Waves Per SM", "waves")])
_TO_US = {"n": 1e-3, "u": 1.0, "m": 1e3, "s": 1e6}     # the first letter of ncu's time unit (ns / usecond / ...)


def parse_report(text: str) -> List[Tuple[str, Dict[str, str]]]:
    """(kernel name, {column: value}) per profiled kernel launch, in launch order, from ``ncu --csv --page details``
    output (lines that are not CSV rows, such as the workload's own prints, are skipped); durations in µs."""
    rows = [line for line in text.splitlines() if line.startswith('"')]
    out: "OrderedDict[str, Tuple[str, Dict[str, str]]]" = OrderedDict()
    for rec in csv.DictReader(io.StringIO("\n".join(rows))):
        name = rec["Metric Name"]
        if name not in COLUMNS:
            continue
        _, values = out.setdefault(rec["ID"], (rec["Kernel Name"], {}))
        value = rec["Metric Value"]
        if name == "Duration":
            value = f"{float(value.replace(',', '')) * _TO_US[(rec['Metric Unit'] or 'u')[0]]:.1f}"
        values[COLUMNS[name]] = value
    return list(out.values())


def table(kernels: List[Tuple[str, Dict[str, str]]], width: int = 48) -> str:
    """Markdown: one row per kernel launch (its name cut to ``width`` characters), the columns of COLUMNS."""
    lines = ["| kernel | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, values in kernels:
        lines.append(f"| {name[:width]} | " + " | ".join(values.get(c, "") for c in COLUMNS.values()) + " |")
    return "\n".join(lines)


def run(workload: str, args) -> None:
    """Run ``workload`` three times, then once inside cudaProfilerStart / Stop."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import slagen
    bq, bk = (int(x) for x in args.block.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, args.heads, args.seq_len, 128, device="cuda", dtype=torch.bfloat16,
                               generator=gen) for _ in range(4))
    bmap = slagen.block_map(q, k, topk=args.topk, block_q=bq, block_k=bk)

    def attend(q_, k_, v_):
        if workload == "cudnn":
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_)
        extra = (dict(feature_map=None, block_map=bmap) if workload == "sparse" else
                 dict(feature_map=None, topk=args.topk) if workload == "sparse-map" else dict(topk=args.topk))
        return slagen.attention(q_, k_, v_, block_q=bq, block_k=bk, backend="tilelang", **extra)

    def call():
        if args.forward:
            with torch.no_grad():
                attend(q, k, v)
        else:
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            torch.autograd.grad(attend(*leaves), leaves, do)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", nargs="?", choices=("sla", "sparse", "sparse-map", "cudnn"))
    ap.add_argument("--forward", action="store_true", help="the forward alone (no_grad) instead of forward+backward")
    ap.add_argument("--seq-len", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--block", default="128x64")
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--table", nargs="+", metavar="CSV", help="print the table of these ncu reports instead")
    args = ap.parse_args()
    if args.table:
        for path in args.table:
            with open(path) as f:
                print(f"## {path}\n\n{table(parse_report(f.read()))}\n")
    elif args.workload:
        run(args.workload, args)
    else:
        ap.error("give a workload (sla, sparse, sparse-map, cudnn) or --table CSV ...")


if __name__ == "__main__":
    main()
