"""Benchmark slagen against dense SDPA (cuDNN, flash) and FlexAttention on one GPU (`slagen bench`).

Every row is measured in one process on the same inputs, so ratios are fair: to dense SDPA-cuDNN and to
FlexAttention given slagen's own critical-block list (sparse branch only: Flex has no linear branch).
SLA rows include the block map and the linear branch; the "sparse-only, map given" rows are given the block
map, as Flex is (the sparse kernels alone: the like-for-like comparison with Flex). Every row's forward is also replayed from a CUDA graph
("fwd GPU ms"): its GPU time without the host's per-call work, which bounds eager calls at short lengths (an
SLA forward costs ~1 ms of host time on an H200 box, tools/host_overhead.py); "GPU ×cuDNN" compares those.
The forward+backward is replayed from a CUDA graph too ("f+b GPU ms"; blank where it cannot be captured).
Dense-equivalent TFLOP/s = 4·B·H·L²·D / t (×3.5 for forward+backward, eager times); the sparse part's achieved
TFLOP/s counts only the critical blocks.
Times are medians over ``rounds``: every row is measured once as it is built (compiling what it needs), then
``rounds`` - 1 more times, all rows in turn, each round starting one row further on (autotune.tuner.rotation).
On an H200 the same kernel measured up to 9–12 % apart depending on its place in the order (sessions 12–13;
the SM clock read 1980 MHz throughout session 13's samples, so not the boost clock alone): timing rows one
after the other, or always in the same order, would favour some rows (dense cuDNN first). Peak memory is
measured once.
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import subprocess
import sys
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import slagen
from slagen.autotune.tuner import rotation

SLA_VARIANTS = (("softmax", "marginal", "SLA marginal"), ("softmax", "all", "SLA all"),
                (None, "marginal", "sparse-only"))
# the slagen rows per block size and backend, by the short names `slagen bench --rows` takes
SLAGEN_ROWS = {"blockmap": "block map", "marginal": "SLA marginal", "all": "SLA all", "sparse": "sparse-only",
               "given": "sparse-only, map given"}


def dense_flops(header: dict) -> int:
    """4·B·H·L²·D: the FLOPs of a dense attention forward at a run's shape."""
    return 4 * header["B"] * header["H"] * header["L"] ** 2 * header["D"]


def sparse_flops(bmap, B: int, H: int, L: int, D: int) -> int:
    """4·B·H·L·(keys of the critical blocks per query)·D: the FLOPs of the sparse part at a block map."""
    return 4 * B * H * L * min(bmap.crit_lut.shape[-1] * bmap.block_k, L) * D


def median_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn) -> Optional[float]:
    """Median ms of ``fn`` replayed from a CUDA graph: its GPU time without the host's per-call work (None
    when it cannot be captured)."""
    from triton.testing import do_bench_cudagraph
    try:
        return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))
    except Exception:  # noqa: BLE001 - an uncapturable call has no GPU-only time; the eager one stands
        return None


TIMES = ("fwd_ms", "gpu_ms", "fwd_bwd_ms", "fwd_bwd_gpu_ms")


def measure_times(fwd_fn, fb_fn=None) -> dict:
    """One measurement of a row: eager and CUDA-graph medians of the forward (and of forward+backward when
    ``fb_fn`` is given); a graph that cannot be captured gives None."""
    times = dict(fwd_ms=median_ms(fwd_fn), gpu_ms=graph_ms(fwd_fn), fwd_bwd_ms=None, fwd_bwd_gpu_ms=None)
    if fb_fn is not None:
        times["fwd_bwd_ms"] = median_ms(fb_fn)
        times["fwd_bwd_gpu_ms"] = graph_ms(fb_fn)
    return times


STALL_EXIT = 3          # `slagen bench`'s exit status when it ends a run that made no progress (StallGuard)
STALL_BACKSTOP_S = 60   # after the guard's own limit: faulthandler's C watchdog, should the GIL never come back


class StallGuard:
    """Ends a process that makes no progress for ``seconds``: each :meth:`kick` (a finished row or round) restarts
    the clock. A kernel that never finishes blocks its CUDA call for good, and neither Ctrl-C nor `timeout`'s
    SIGTERM reaches Python then (session 32's scaling run stalled that way for ~460 s). On expiry a timer thread
    runs ``on_stall`` (say what was last done, save the rows so far), prints every thread's Python stack and
    leaves with exit status :data:`STALL_EXIT`; should the stuck call hold the GIL, faulthandler's own watchdog
    prints the stacks and exits (status 1) :data:`STALL_BACKSTOP_S` later. ``seconds`` <= 0: no guard."""

    def __init__(self, seconds: float, on_stall: Callable[[], None]):
        self.seconds, self.on_stall = float(seconds), on_stall
        self._timer: Optional[threading.Timer] = None
        self.kick()

    def kick(self) -> None:
        """Progress: restart both clocks."""
        if self.seconds <= 0:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()
        faulthandler.dump_traceback_later(self.seconds + STALL_BACKSTOP_S, exit=True, file=sys.__stderr__)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            faulthandler.cancel_dump_traceback_later()

    def _expire(self) -> None:
        try:
            self.on_stall()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
            os._exit(STALL_EXIT)


# Where a stack inside one of these files is compiling (inductor's FlexAttention, Triton, TileLang's lowering and
# nvcc), not waiting for a GPU: inductor's runtime and autotuning, which launch kernels, are not among them.
COMPILER_FILES = ("torch/_inductor/compile_fx.py", "torch/_inductor/async_compile.py", "triton/compiler/compiler.py",
                  "tilelang/engine/lower.py", "tilelang/contrib/nvcc.py")


def compiling(frame) -> Optional[str]:
    """'file:line in function' of the innermost frame of ``frame``'s stack (a frame object, innermost first via
    f_back) that is inside a compiler (COMPILER_FILES), or None."""
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if any(path.endswith(name) for name in COMPILER_FILES):
            return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return None


def interleave(entries: Sequence[Tuple[dict, Callable[[], dict]]], rounds: int,
               echo: Callable[[str], None] = print) -> None:
    """Measure each (row, measure) entry ``rounds`` more times, all rows in turn per round (round r in
    ``rotation(entries, r)`` order, r = 1, 2, ...: the build order was round 0), and set each row's
    TIMES to the median of its samples (the row's first measurement, already in it, included; None samples —
    a graph that could not be captured — are left out). A row whose re-measurement fails keeps what it has and
    says so in its note."""
    samples = {id(row): {key: [row[key]] for key in TIMES} for row, _ in entries}
    for r in range(rounds):
        for row, measure in rotation(entries, r + 1):
            try:
                for key, value in measure().items():
                    samples[id(row)][key].append(value)
            except Exception as err:  # noqa: BLE001 - the first round's numbers stand
                row["note"] = (row.get("note", "") + f" round {r + 2} failed: {type(err).__name__}").strip()
        echo(f"  round {r + 2} of {rounds + 1} done")
    for row, _ in entries:
        for key, values in samples[id(row)].items():
            values = [v for v in values if v is not None]
            row[key] = statistics.median(values) if values else None
        row["rounds"] = len(samples[id(row)]["fwd_ms"])


def peak_mib(fn) -> float:
    """Peak device memory that ``fn`` allocates beyond what was already allocated, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def live_at_peak(events: Sequence[dict]) -> Tuple[int, List[dict]]:
    """(peak bytes, the allocations alive at that peak, largest first) from a CUDA caching-allocator trace
    (the ``device_traces`` entries of torch.cuda.memory._snapshot(): 'alloc' / 'free_completed' events with
    'addr', 'size' and 'frames'); only what the traced span allocated counts, as in :func:`peak_mib`."""
    live, total, peak, at_peak = {}, 0, 0, []
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, list(live.values())
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    return peak, sorted(at_peak, key=lambda e: -e["size"])


# allocator, dispatch and the history's own frames: not a site
_CPP_PLUMBING = ("c10::", "at::", "std::", "torch::unwind", "torch::CapturedTraceback", "??")


def allocation_site(event: dict) -> str:
    """'file:line function' of the innermost Python frame of an allocation in slagen's code (its kernels'
    glue), else the innermost Python frame; for an allocation without one (made from C++: the autograd engine,
    a kernel library's own allocation), 'C++ a < b < c' of its three innermost frames that are not the
    allocator's, ATen's dispatch or the history's (those C++ frames are recorded with ``stacks='all'``), else
    '?:0 ?'."""
    frames = event.get("frames", ())
    python = [f for f in frames if f.get("filename", "").endswith(".py")]
    ours = [f for f in python if "slagen" in f["filename"] or "/backends/" in f["filename"]]
    if ours or python:
        f = (ours or python)[0]
        return f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}"
    cpp = [f["name"] for f in frames if f.get("name") and not f["name"].startswith(_CPP_PLUMBING)]
    return f"C++ {' < '.join(cpp[:3])}" if cpp else "?:0 ?"


def peak_allocations(fn, stacks: str = "python") -> Tuple[float, List[Tuple[float, str]]]:
    """Run ``fn`` once with the CUDA allocator's history on: (peak MiB it allocated, [(MiB, allocation site)]
    of what was alive at that peak, largest first). ``stacks``: 'python', or 'all' to record C++ frames too
    (slower; names the allocations no Python frame made)."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks=stacks)
    try:
        fn()
        torch.cuda.synchronize()
        events = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, alive = live_at_peak(events)
    return peak / 2**20, [(e["size"] / 2**20, allocation_site(e)) for e in alive]


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


def flex_block_mask(bmap, lq: int, lk: int):
    """A FlexAttention BlockMask whose full blocks are slagen's critical blocks."""
    from torch.nn.attention.flex_attention import BlockMask
    B, H, tm, tn = bmap.mask.shape
    idx = torch.zeros(B, H, tm, tn, dtype=torch.int32, device=bmap.mask.device)
    idx[..., :bmap.crit_lut.shape[-1]] = bmap.crit_lut.clamp_min(0)
    none = torch.zeros_like(bmap.crit_count)
    return BlockMask.from_kv_blocks(none, torch.zeros_like(idx), bmap.crit_count.contiguous(), idx,
                                    BLOCK_SIZE=(bmap.block_q, bmap.block_k), seq_lengths=(lq, lk))


def load_reference_sla(path: str):
    """The ``SparseLinearAttention`` class of a copy of thu-ml/SLA at ``path`` (a dir holding the package
    ``sparse_linear_attention``); each path gets its own module objects, so two branches can be compared."""
    import importlib
    import sys
    for name in [m for m in sys.modules if m == "sparse_linear_attention" or m.startswith("sparse_linear_attention.")]:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        return importlib.import_module("sparse_linear_attention").SparseLinearAttention
    finally:
        sys.path.remove(path)


def clocks() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else "clocks unknown"
    except (OSError, subprocess.SubprocessError):
        return "clocks unknown"


def run(*, batch: int = 1, heads: int = 12, seq_len: int = 32760, head_dim: int = 128, topk: float = 0.05,
        blocks: Sequence[Tuple[int, int]] = ((128, 64), (64, 64)), dtype: str = "bf16",
        backends: Sequence[str] = ("triton",), flex: bool = True, backward: bool = True,
        reference_sla: Sequence[Tuple[str, str]] = (), echo: Callable[[str], None] = print,
        into: Optional[dict] = None, slagen_rows: Sequence[str] = tuple(SLAGEN_ROWS), rounds: int = 3) -> dict:
    """Measure every row; returns {"header": {...}, "rows": [...]} (times in ms, memory in MiB; times are
    medians of ``rounds`` measurements, the later ones interleaved across rows: see the module docstring).

    slagen_rows: which slagen rows to time per block size and backend (keys of SLAGEN_ROWS; the dense and
    FlexAttention baselines always run).

    reference_sla: (label, path) pairs of copies of the authors' thu-ml/SLA code to time beside slagen
    (their module with its zero-initialised proj_l, same topk and blocks). ``into``: a dict filled as the run
    goes (header first, then each row as it is measured), so an interrupted run leaves its rows there.
    """
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    B, H, L, D = batch, heads, seq_len, head_dim
    result = into if into is not None else {}
    result.update(header=dict(device=torch.cuda.get_device_name(), clocks=clocks(), B=B, H=H, L=L, D=D, dtype=dtype,
                              topk=topk, torch=torch.__version__, slagen=slagen.__version__), rows=[])
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dt, generator=gen).requires_grad_(True) for _ in range(3))
    do = torch.randn(B, H, L, D, device=dev, dtype=dt, generator=gen)
    rows: List[dict] = result["rows"]
    wanted = {SLAGEN_ROWS[r] for r in slagen_rows}

    measured = []      # (row, measure) of the rows whose first measurement succeeded: re-timed in rounds

    def attempt(name, fwd_fn, fb_fn=None, group="", sparse_flops=None, component=False):
        row = dict(name=name, group=group, fwd_ms=None, fwd_bwd_ms=None, peak_mib=None, sparse_flops=sparse_flops,
                   component=component, note="", gpu_ms=None, fwd_bwd_gpu_ms=None)
        fb = fb_fn if backward else None
        try:
            row.update(measure_times(fwd_fn, fb))      # (a graph that cannot be captured gives None)
            row["peak_mib"] = peak_mib(fb if fb is not None else fwd_fn)
            measured.append((row, lambda: measure_times(fwd_fn, fb)))
        except Exception as err:  # a failing row is reported; the run goes on
            row["note"] = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        rows.append(row)
        echo(f"  {name}: fwd {row['fwd_ms']} ms, fwd+bwd {row['fwd_bwd_ms']} ms {row['note']}")

    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend, label in ((SDPBackend.CUDNN_ATTENTION, "dense SDPA cuDNN"),
                           (SDPBackend.FLASH_ATTENTION, "dense SDPA flash")):
        def sdpa(q_, k_, v_, backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_)
        attempt(label, inference(sdpa, q, k, v), fwd_bwd(sdpa, q, k, v, do))

    for bq, bk in blocks:
        for name in backends:
            cfg = dict(topk=topk, block_q=bq, block_k=bk, backend=name)
            bmap = slagen.block_map(q, k, **cfg)
            n_crit, tn = bmap.crit_lut.shape[-1], bmap.mask.shape[-1]
            group = f"{bq}x{bk}"
            work = sparse_flops(bmap, B, H, L, D)
            if "blockmap" in slagen_rows:
                attempt(f"slagen-{name} block map [{group}, {n_crit}/{tn}]",
                        lambda cfg=cfg: slagen.block_map(q, k, **cfg), group=group, component=True)
            for fmap, scope, what in SLA_VARIANTS:
                if what not in wanted:
                    continue

                def f(q_, k_, v_, fmap=fmap, scope=scope, cfg=cfg):
                    return slagen.attention(q_, k_, v_, feature_map=fmap, scope=scope, **cfg)
                attempt(f"slagen-{name} {what} [{group}]", inference(f, q, k, v), fwd_bwd(f, q, k, v, do), group,
                        work)

            def given(q_, k_, v_, cfg=cfg, bmap=bmap):   # the sparse kernels alone, as Flex is measured
                return slagen.attention(q_, k_, v_, feature_map=None, block_map=bmap, **cfg)
            if "given" in slagen_rows:
                attempt(f"slagen-{name} sparse-only, map given [{group}]", inference(given, q, k, v),
                        fwd_bwd(given, q, k, v, do), group, work)
        for label, path in reference_sla:
            group = f"{bq}x{bk}"
            try:
                ref = load_reference_sla(path)(D, topk, feature_map="softmax", BLKQ=bq, BLKK=bk).to(dev)
                attempt(f"reference SLA {label} [{group}]", inference(ref, q, k, v), fwd_bwd(ref, q, k, v, do), group)
            except Exception as err:
                rows.append(dict(name=f"reference SLA {label} [{group}]", group=group, fwd_ms=None, fwd_bwd_ms=None,
                                 peak_mib=None, sparse_flops=None, component=False,
                                 note=f"FAILED: {type(err).__name__}: {str(err)[:160]}"))
        if flex:
            group = f"{bq}x{bk}"
            try:
                from torch.nn.attention.flex_attention import flex_attention
                bmap_flex = slagen.block_map(q, k, topk=topk, block_q=bq, block_k=bk, backend="triton")
                mask = flex_block_mask(bmap_flex, L, L)
                compiled = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")
                flex_fn = lambda q_, k_, v_, mask=mask: compiled(q_, k_, v_, block_mask=mask)  # noqa: E731
                attempt(f"FlexAttention same blocks [{group}]", inference(flex_fn, q, k, v),
                        fwd_bwd(flex_fn, q, k, v, do), group, sparse_flops(bmap_flex, B, H, L, D))
            except Exception as err:
                rows.append(dict(name=f"FlexAttention same blocks [{group}]", group=group, fwd_ms=None,
                                 fwd_bwd_ms=None, peak_mib=None, sparse_flops=None, component=False,
                                 note=f"FAILED: {type(err).__name__}: {str(err)[:160]}"))
    if rounds > 1:
        echo(f"  timing every row {rounds - 1} more times, in turn")
        interleave(measured, rounds - 1, echo)
    result["header"]["rounds"] = rounds
    return result


def table(result: dict) -> str:
    """Markdown table of a run() result, ratios to dense cuDNN and to Flex (same block group)."""
    h, rows = result["header"], result["rows"]
    dense = dense_flops(h)
    cudnn = next((r for r in rows if r["name"] == "dense SDPA cuDNN"), None)
    lines = [f"{h['device']} ({h['clocks']}) | B={h['B']} H={h['H']} L={h['L']} D={h['D']} {h['dtype']} "
             f"topk={h['topk']} | torch {h['torch']}, slagen {h['slagen']}"
             + (f" | medians of {h['rounds']} rounds" if h.get("rounds", 1) > 1 else ""),
             "",
             "| what | fwd ms | fwd+bwd ms | fwd ×cuDNN | f+b ×cuDNN | fwd ×Flex | f+b ×Flex | fwd GPU ms "
             "| GPU ×cuDNN | f+b GPU ms | f+b GPU ×cuDNN | dense-eq TFLOP/s fwd | sparse TFLOP/s fwd | peak MiB "
             "| note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(base: Optional[dict], r: dict, key: str) -> str:
        return f"{base[key] / r[key]:.2f}" if base and base.get(key) and r.get(key) else ""

    def num(x, digits=3) -> str:
        return f"{x:.{digits}f}" if isinstance(x, float) else ""
    for r in rows:
        if r.get("component"):  # a part of SLA's time (the block map): no attention ratios
            lines.append(f"| {r['name']} | {num(r['fwd_ms'])} | | | | | | {num(r.get('gpu_ms'))} | | | | | | "
                         f"{num(r['peak_mib'], 0)} | part of every SLA row {r['note']} |")
            continue
        flex = next((x for x in rows if x["name"].startswith("FlexAttention") and r["group"]
                     and x["group"] == r["group"]), None)
        dense_tf = f"{dense / (r['fwd_ms'] * 1e-3) / 1e12:.0f}" if r["fwd_ms"] else ""
        sparse_tf = (f"{r['sparse_flops'] / (r['fwd_ms'] * 1e-3) / 1e12:.0f}" if r["fwd_ms"] and r["sparse_flops"]
                     else "")
        lines.append(f"| {r['name']} | {num(r['fwd_ms'])} | {num(r['fwd_bwd_ms'])} | {ratio(cudnn, r, 'fwd_ms')} | "
                     f"{ratio(cudnn, r, 'fwd_bwd_ms')} | {ratio(flex, r, 'fwd_ms')} | {ratio(flex, r, 'fwd_bwd_ms')} | "
                     f"{num(r.get('gpu_ms'))} | {ratio(cudnn, r, 'gpu_ms')} | {num(r.get('fwd_bwd_gpu_ms'))} | "
                     f"{ratio(cudnn, r, 'fwd_bwd_gpu_ms')} | {dense_tf} | {sparse_tf} | "
                     f"{num(r['peak_mib'], 0)} | {r['note']} |")
    return "\n".join(lines)



def scaling_table(results: List[dict]) -> str:
    """Markdown: each row's forward GPU time (CUDA graph; eager where it could not be captured) at every
    length of ``results`` (run() results, one per length), and its time per unit of work relative to the
    first length: 1.00 means the time grows exactly like the work — the critical blocks' L·(density·L)
    for the sparse rows (SLA, Flex), L² for dense attention."""
    lengths = [r["header"]["L"] for r in results]
    names = [r["name"] for r in results[0]["rows"] if not r.get("component")]
    lines = ["| what | " + " | ".join(f"L={n} GPU ms" for n in lengths) + " | "
             + " | ".join(f"per work L={n}" for n in lengths[1:]) + " |",
             "|---|" + "---|" * (2 * len(lengths) - 1)]
    for name in names:
        cells, per_work = [], []
        for result in results:
            row = next((r for r in result["rows"] if r["name"] == name), None)
            ms = row and (row.get("gpu_ms") or row.get("fwd_ms"))
            work = row and (row.get("sparse_flops") or dense_flops(result["header"]))
            cells.append(f"{ms:.3f}" if ms else "")
            per_work.append(ms / work if ms else None)
        rel = [f"{x / per_work[0]:.2f}" if x and per_work[0] else "" for x in per_work[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(rel) + " |")
    return "\n".join(lines)
