"""Time the Triton block map launch by launch on a GPU, beside the prediction below.

    python tools/bench_blockmap.py                          # both shapes, negligible 0.1 and 0
    python tools/bench_blockmap.py --baseline d186c39       # also the block map of an older commit
    python tools/bench_blockmap.py --export-baseline d186c39 tools/blockmap_baseline   # here, then on a
    python tools/bench_blockmap.py --baseline tools/blockmap_baseline                  # GPU box without .git
    python tools/bench_blockmap.py --shape wan480p --json out.json

Per shape: each of the four launches alone (triton.testing.do_bench, median ms; the pool's achieved GB/s),
the whole selection.block_map eager (allocation + 4 launches: what a forward pays) and replayed from a
CUDA graph (GPU time only), the public slagen.block_map(..., backend="triton"), the host time per eager
call, and a check of the map against the fp32 reference (mismatches only at near-ties).

---------------------------------------------------------------------------------------------------------
PREDICTION (written before any GPU run; H200 ~4.0 TB/s achievable HBM read, H100 ~3.0 TB/s; 132 SMs;
registers from ptxas -v of the sm90 d=128 kernels, Triton 3.6 / 3.9)

Headline  B=1 H=12 L=32760 D=128 bf16, blocks 128x64: T_m=256, T_n=512, n_crit=25; n_negl=0 as in the
0.695 ms measurement (`slagen bench`'s default), or 51 with negligible 0.1. q + k = 201 MB: reading them
once is the floor (~0.05 ms H200, ~0.067 ms H100).

Before (0.695 ms on H200):
  pool    grid (32+64, 12) = 1152 programs x 8 warps (62 regs): each pools 8 blocks one after the
          other (q programs 256 KB, k programs 128 KB): 2.2 uneven waves of 528 slots; ~0.08 ms.
  select  grid (16, 12) = 192 programs x 8 warps (143 regs -> 1 CTA/SM): 60 SMs run two programs back
          to back while the other 72 idle half the time. A program re-reads all of k-bar (256 KB) for its
          16-row score strip, then runs the radix select over (8 x 512) tiles: up to 32 passes (the slowest
          of 8 rows) per class and step, each pass two block-wide reductions (bar.sync): ~0.55 ms.
          THE culprit: 192 programs, each a long serial chain.
  column  grid (8, 12) = 96 programs (< 132 SMs), column-strided int32 stores: ~0.04 ms.

After:
  pool    1-D grid (32 + 256) * 12 = 3456 programs x 4 warps (94 / 80 regs, 33 KB smem: 4-5 CTAs/SM). The
          384 key programs first (16 blocks = 256 KB each, 2 blocks in flight through cp.async; their
          group sums give the key mean), then one 128-row query block (32 KB) per program.
          Bandwidth-bound: 0.052 ms H200 / 0.069 ms H100.
  scores  (2 x 4) * 12 = 96 programs x 8 warps (212 regs), one 128x128 tf32x3 wgmma tile each, key mean
          from 32 group sums: 14 MB of L2 reads, 6.3 MB of int32 keys written; one wave: 0.005 ms.
  select  256 * 12 = 3072 one-warp programs (128 / 167 regs: 16 / 12 CTAs per SM): the 512-key row stays
          in registers (16 per lane); ~17 radix passes (<= 32) of ~124 SASS instructions for both
          thresholds (~70 for one), then ~1.3K to classify (one packed prefix scan, list stores):
          ~3.4K warp-instructions a row with the negligible class, ~2.2K without; integer-ALU bound:
          0.020 ms (0.012 ms without the negligible class).
  column  32 * 12 = 384 programs x 4 warps: 12.6 MB of -1 padded column lists written: 0.005 ms.
  total   GPU ~0.077 ms on H200 without the negligible class (0.083 with), ~0.095 ms on H100; ~0.003 ms
          of it the gaps between the 4 launches. The eager call also does ~10 allocations and 4 Triton
          launches on the host (~0.05-0.08 ms, overlapped with the GPU when it runs ahead), so eager
          do_bench should read about the GPU time, at most a little above; the CUDA-graph time is the GPU's.

Large  B=1 H=40 L=75600 D=128 bf16, blocks 64x64: T_m=T_n=1182, n_crit=59, n_negl=118 (0.1).
  pool    (32 + 591) * 40 = 24920 programs; 1.55 GB read: 0.40 ms H200 / 0.53 ms H100.
  scores  (10 x 10) * 40 = 4000 programs, 30 waves of one latency-bound CTA per SM; 224 MB of keys:
          ~0.10 ms.
  select  1182 * 40 = 47280 one-warp programs; a row longer than the 512-key chunk is re-read per pass
          from L1 (3 chunks, ~410 instructions a pass): ~11K warp-instructions a row, 0.52G in all:
          ~0.8 ms (0.5-1.1; ~0.45 without the negligible class). Radix work grows as T_m x T_n x passes:
          the next target at this length (compact the candidates after the first passes; a vectorised
          row-list pass).
  column  ceil(1182/16) * 40 = 2960 programs; 447 MB of column lists written: ~0.12 ms H200 / 0.15 H100.
  total   ~1.4 ms H200 / ~1.6 ms H100 (2.0 GB must move: ~0.5 ms floor).

Note: do_bench clears L2 before each timed call, so the per-launch numbers are cold-L2 (the scores, select
and column launches read what the launch before wrote, an L2 hit inside the whole block map): their sum
can exceed the whole call.
---------------------------------------------------------------------------------------------------------
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

import slagen
from slagen import codegen, reference
from slagen.backends.triton import selection
from slagen.blockmap import LUT_FIELDS, lists_from_mask

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "wan480p": dict(B=1, H=12, L=32760, D=128, block_q=128, block_k=64),
    "75600": dict(B=1, H=40, L=75600, D=128, block_q=64, block_k=64),
}
TOPK = 0.05
# predicted median ms on H200 (H100 in the docstring): (shape, negligible) -> launch -> ms
PREDICTED = {
    ("wan480p", 0.1): dict(pool=0.052, scores=0.005, select=0.020, column=0.005, gpu_total=0.083),
    ("wan480p", 0.0): dict(pool=0.052, scores=0.005, select=0.012, column=0.005, gpu_total=0.077),
    ("75600", 0.1): dict(pool=0.40, scores=0.10, select=0.8, column=0.12, gpu_total=1.4),
    ("75600", 0.0): dict(pool=0.40, scores=0.10, select=0.45, column=0.12, gpu_total=1.1),
}


def median_ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def graph_ms(fn) -> float:
    """Median ms of fn replayed from a CUDA graph (no host work: the GPU time), NaN if capture fails."""
    try:
        return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))
    except Exception as err:  # noqa: BLE001 - report and go on with the other numbers
        print(f"  (CUDA graph timing failed: {type(err).__name__}: {err})", file=sys.stderr)
        return float("nan")


def host_us(fn, calls=200) -> float:
    """Host time per call, launches queued without waiting (the GPU may lag behind)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


BASELINE_FILES = {"selection.py": "backends/triton/selection.py", "block_map.py.j2": "templates/triton/block_map.py.j2"}


def export_baseline(rev: str, directory: Path) -> None:
    """Write the block-map glue and template of commit ``rev`` (git show, read-only) into ``directory``, for
    a machine without the repository's .git (pass the directory as --baseline there)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, path in BASELINE_FILES.items():
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout
        (directory / name).write_text(text)


def load_baseline(rev_or_dir: str):
    """The block map of an older commit as a module with the same block_map(q, k, n_crit, n_negl, block_q,
    block_k) entry point: ``rev_or_dir`` is a directory from --export-baseline or a git revision."""
    tmp = Path(tempfile.mkdtemp(prefix="slagen_baseline_"))
    if not Path(rev_or_dir).is_dir():
        export_baseline(rev_or_dir, tmp / "src")
        rev_or_dir = str(tmp / "src")
    src = Path(rev_or_dir)
    (tmp / "triton").mkdir()
    (tmp / "triton" / "block_map.py.j2").write_text((src / "block_map.py.j2").read_text())
    env = codegen.environment([tmp])
    loaded = {}

    class OldCodegen:
        @staticmethod
        def load(spec, backend):
            if spec not in loaded:
                path = tmp / f"{spec.uri(backend)}.py"
                path.write_text(codegen.render(spec, backend, env))
                mod_spec = importlib.util.spec_from_file_location(f"slagen_baseline_{len(loaded)}", path)
                module = importlib.util.module_from_spec(mod_spec)
                mod_spec.loader.exec_module(module)
                loaded[spec] = module
            return loaded[spec]

    glue = types.ModuleType("slagen_baseline_selection")
    glue.__file__ = str(tmp / "selection.py")
    exec(compile((src / "selection.py").read_text(), glue.__file__, "exec"), glue.__dict__)
    glue.codegen = OldCodegen()
    return glue


def check_map(got, q, k, n_crit, n_negl, block_q, block_k, rel_tol=1e-5) -> str:
    """Self-consistency and agreement with the fp32 reference up to near-ties (as tests/ do)."""
    mask = got[0]
    for name, a, b in zip(LUT_FIELDS, got, lists_from_mask(mask, n_crit, n_negl)):
        if not torch.equal(a, b):
            return f"FAIL: {name} is not the list of the returned mask"
    scores = reference.block_scores(q.float(), k.float(), block_q, block_k)
    ref = reference.classify(scores, n_crit, n_negl)
    diff = mask != ref
    if not bool(diff.any()):
        return "ok (identical to the fp32 reference)"
    ordered = scores.sort(-1, descending=True).values
    tol = rel_tol * scores.abs().amax(-1, keepdim=True)
    near = (scores - ordered[..., n_crit - 1:n_crit]).abs() <= tol
    if n_negl:
        near |= (scores - ordered[..., -n_negl:][..., :1]).abs() <= tol
    bad = int((diff & ~near).sum())
    return f"{'FAIL' if bad else 'ok'}: {int(diff.sum())} differences from the fp32 reference, {bad} not near-ties"


def bench_shape(name: str, negligible: float, baseline, check: bool) -> dict:
    s = SHAPES[name]
    torch.manual_seed(0)
    q = torch.randn(s["B"], s["H"], s["L"], s["D"], device="cuda", dtype=torch.bfloat16)
    k = torch.randn(s["B"], s["H"], s["L"], s["D"], device="cuda", dtype=torch.bfloat16)
    bq, bk = s["block_q"], s["block_k"]
    t_m, t_n = reference.num_blocks(s["L"], bq), reference.num_blocks(s["L"], bk)
    n_crit, n_negl = reference.block_counts(t_n, TOPK, negligible)
    out, launches = selection.plan(q, k, n_crit, n_negl, bq, bk)
    for _, launch in launches:  # compile
        launch()
    torch.cuda.synchronize()
    res = dict(shape=name, negligible=negligible, T_m=t_m, T_n=t_n, n_crit=n_crit, n_negl=n_negl,
               device=torch.cuda.get_device_name(), launches={}, predicted=PREDICTED.get((name, negligible), {}))
    for launch_name, launch in launches:
        res["launches"][launch_name] = median_ms(launch)
    pool_bytes = (q.numel() + k.numel()) * q.element_size() + (t_m + t_n) * s["B"] * s["H"] * s["D"] * 4
    res["pool_GBps"] = pool_bytes / (res["launches"]["pool"] * 1e-3) / 1e9
    res["sum_of_launches"] = sum(res["launches"].values())
    whole = lambda: selection.block_map(q, k, n_crit, n_negl, bq, bk)  # noqa: E731
    res["eager"] = median_ms(whole)
    res["graph"] = graph_ms(whole)
    res["host_us_per_call"] = host_us(whole)
    api = lambda: slagen.block_map(q, k, topk=TOPK, negligible=negligible, block_q=bq, block_k=bk,  # noqa: E731
                                   backend="triton")
    res["api_eager"] = median_ms(api)
    if baseline is not None:
        old = lambda: baseline.block_map(q, k, n_crit, n_negl, bq, bk)  # noqa: E731
        old()
        res["baseline_eager"] = median_ms(old)
        res["baseline_graph"] = graph_ms(old)
    if check:
        res["check"] = check_map(whole(), q, k, n_crit, n_negl, bq, bk)
    del q, k, out
    torch.cuda.empty_cache()
    return res


def report(res: dict) -> None:
    pred = res["predicted"]
    print(f"\n== {res['shape']}  negligible={res['negligible']}  T_m={res['T_m']} T_n={res['T_n']} "
          f"n_crit={res['n_crit']} n_negl={res['n_negl']}  [{res['device']}]")
    print(f"  {'launch':<10}{'median ms':>11}{'predicted':>11}")
    for name, ms in res["launches"].items():
        extra = f"   {res['pool_GBps']:.0f} GB/s" if name == "pool" else ""
        print(f"  {name:<10}{ms:>11.4f}{pred.get(name, float('nan')):>11.4f}{extra}")
    print(f"  {'sum':<10}{res['sum_of_launches']:>11.4f}{pred.get('gpu_total', float('nan')):>11.4f}")
    print(f"  whole block_map: eager {res['eager']:.4f} ms, CUDA graph {res['graph']:.4f} ms, "
          f"host {res['host_us_per_call']:.0f} us/call; slagen.block_map API eager {res['api_eager']:.4f} ms")
    if "baseline_eager" in res:
        print(f"  baseline: eager {res['baseline_eager']:.4f} ms, CUDA graph {res['baseline_graph']:.4f} ms")
    if "check" in res:
        print(f"  check: {res['check']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: all")
    parser.add_argument("--negligible", type=float, action="append", help="default: 0.1 and 0.0")
    parser.add_argument("--baseline", metavar="REV|DIR",
                        help="also time the block map of this git commit (or of a directory from --export-baseline)")
    parser.add_argument("--export-baseline", nargs=2, metavar=("REV", "DIR"),
                        help="only write the block map of commit REV into DIR (for a machine without .git)")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the fp32 reference")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.export_baseline:
        export_baseline(args.export_baseline[0], Path(args.export_baseline[1]))
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    baseline = load_baseline(args.baseline) if args.baseline else None
    results = []
    for name in args.shape or list(SHAPES):
        for negligible in args.negligible or [0.1, 0.0]:
            results.append(bench_shape(name, negligible, baseline, not args.no_check))
            report(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
