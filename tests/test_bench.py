"""The bench table (ratios, components) from a recorded result, and the GPU-only commands' errors on CPU."""

import json
import os
import signal
import time

import pytest
import torch
from click.testing import CliRunner

from slagen import bench
from slagen.cli import main


def row(name, fwd, fb=None, group="", component=False, sparse_flops=None, gpu=None, fb_gpu=None):
    return dict(name=name, group=group, fwd_ms=fwd, fwd_bwd_ms=fb, peak_mib=100.0, sparse_flops=sparse_flops,
                component=component, note="", gpu_ms=gpu, fwd_bwd_gpu_ms=fb_gpu)


def test_table_ratios_to_cudnn_and_flex_of_the_same_blocks():
    result = {"header": dict(device="GPU", clocks="-", B=1, H=12, L=32760, D=128, dtype="bf16", topk=0.05,
                             torch="x", slagen="y"),
              "rows": [row("dense SDPA cuDNN", 10.0, 40.0, gpu=9.0, fb_gpu=36.0),
                       row("slagen-triton block map [128x64, 25/512]", 0.1, group="128x64", component=True),
                       row("slagen-triton SLA all [128x64]", 1.0, 5.0, "128x64", sparse_flops=322e9, gpu=0.5,
                           fb_gpu=4.5),
                       row("FlexAttention same blocks [128x64]", 2.0, 4.0, "128x64")]}
    lines = bench.table(result).splitlines()
    sla = next(line for line in lines if "SLA all" in line).split("|")
    assert [c.strip() for c in sla[2:12]] == ["1.000", "5.000", "10.00", "8.00", "2.00", "0.80", "0.500", "18.00",
                                              "4.500", "8.00"]
    assert sla[13].strip() == "322"                      # sparse TFLOP/s = 322 GFLOP / 1 ms (eager)
    flex = next(line for line in lines if line.startswith("| FlexAttention")).split("|")
    assert [c.strip() for c in flex[8:12]] == ["", "", "", ""]   # no GPU times: no GPU ratios
    block_map = next(line for line in lines if "block map" in line)
    assert "part of every SLA row" in block_map and "10.00" not in block_map
    result["rows"][1]["gpu_ms"] = 0.0125
    block_map = next(line for line in bench.table(result).splitlines() if "block map" in line).split("|")
    assert block_map[8].strip() == "0.013" and block_map[9].strip() == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without a GPU gets")
def test_gpu_commands_say_they_need_a_gpu():
    for cmd in (["bench"], ["tune"]):
        result = CliRunner().invoke(main, cmd)
        assert result.exit_code == 1 and "needs a CUDA GPU" in result.output


def test_scaling_table_normalises_time_by_work():
    def result(L, sla_ms, dense_ms):
        header = dict(device="GPU", clocks="-", B=1, H=1, L=L, D=128, dtype="bf16", topk=0.05, torch="x", slagen="y")
        flops = 4 * L * (L // 20) * 128                    # the critical blocks' work, ∝ L·(density·L)
        return {"header": header,
                "rows": [row("dense SDPA cuDNN", 2 * dense_ms, gpu=dense_ms),
                         row("slagen-triton block map [128x64, 25/512]", 0.1, group="128x64", component=True),
                         row("slagen-triton SLA marginal [128x64]", 9.0, group="128x64", sparse_flops=flops,
                             gpu=sla_ms)]}
    # dense time ×4 for L ×2 (linear in L²: 1.00); SLA time ×2 for its work ×4 (0.50)
    text = bench.scaling_table([result(8000, 1.0, 1.0), result(16000, 2.0, 4.0)])
    lines = text.splitlines()
    assert lines[0].startswith("| what | L=8000 GPU ms | L=16000 GPU ms | per work L=16000 |")
    dense = next(line for line in lines if "cuDNN" in line).split("|")
    sla = next(line for line in lines if "SLA marginal" in line).split("|")
    assert [c.strip() for c in dense[2:5]] == ["1.000", "4.000", "1.00"]
    assert [c.strip() for c in sla[2:5]] == ["1.000", "2.000", "0.50"]
    assert "block map" not in text


def test_interrupted_bench_prints_and_saves_the_rows_measured_so_far(monkeypatch, tmp_path):
    """A bench cut short (Ctrl-C, or `timeout`'s SIGTERM, which the command turns into the same) prints the
    table of the rows it has and writes them to the JSON file, then exits 130."""
    header = dict(device="GPU", clocks="-", B=1, H=1, L=4096, D=128, dtype="bf16", topk=0.05, torch="x", slagen="y")

    def cut_short(*, into, **kwargs):
        into.update(header=header, rows=[row("dense SDPA cuDNN", 10.0, 40.0, gpu=9.0)])
        os.kill(os.getpid(), signal.SIGTERM)      # what `timeout` sends
        time.sleep(5)                             # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the bench")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", cut_short)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--seq-len", "4096", "--json", str(out)])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "| dense SDPA cuDNN | 10.000" in result.output
    saved = json.loads(out.read_text())
    assert saved[0]["rows"][0]["name"] == "dense SDPA cuDNN" and saved[0]["header"]["L"] == 4096


def test_bench_rows_option_selects_the_slagen_rows_and_rejects_unknown_names(monkeypatch):
    """`--rows marginal,given` reaches bench.run as the slagen rows to time; an unknown name is a usage error
    naming the option and the allowed names (checked before the GPU is looked for)."""
    seen = {}

    def record(*, into, slagen_rows, **kwargs):
        seen["rows"] = slagen_rows
        into.update(header=dict(device="GPU", clocks="-", B=1, H=1, L=4096, D=128, dtype="bf16", topk=0.05,
                                torch="x", slagen="y"), rows=[row("dense SDPA cuDNN", 10.0, 40.0, gpu=9.0)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", record)
    result = CliRunner().invoke(main, ["bench", "--seq-len", "4096", "--rows", "marginal, given"])
    assert result.exit_code == 0, result.output
    assert seen["rows"] == ["marginal", "given"]
    result = CliRunner().invoke(main, ["bench", "--rows", "marginal,fast"])
    assert result.exit_code == 2 and "--rows" in result.output and "'fast'" in result.output
    assert "blockmap, marginal, all, sparse, given" in result.output
    default = CliRunner().invoke(main, ["bench", "--seq-len", "4096"])
    assert default.exit_code == 0 and seen["rows"] == list(bench.SLAGEN_ROWS)


def test_live_at_peak_replays_an_allocator_trace():
    """The allocations alive at the peak of a trace, largest first, named by their innermost slagen frame (or
    Python frame, or C++ frame past the allocator); frees of blocks allocated before the trace are ignored
    (only the traced span counts)."""
    def frame(path, line, name):
        return dict(filename=path, line=line, name=name)
    glue = [frame("/x/site-packages/torch/functional.py", 10, "empty"),
            frame("/r/backends/triton/bwd.py", 455, "_run_heads"), frame("/r/slagen/api.py", 3, "attention")]
    events = [dict(action="alloc", addr=1, size=100, frames=glue),
              dict(action="alloc", addr=2, size=300, frames=[frame("/x/torch/y.py", 1, "f")]),
              dict(action="free_completed", addr=99, size=5000),          # allocated before the trace
              dict(action="free_completed", addr=2, size=300),
              dict(action="alloc", addr=3, size=250, frames=[]),
              dict(action="alloc", addr=4, size=10, frames=glue),
              dict(action="free_completed", addr=3, size=250)]
    peak, alive = bench.live_at_peak(events)
    assert peak == 400 and [e["addr"] for e in alive] == [2, 1]      # 100 + 300 beats 100 + 250 + 10
    assert bench.allocation_site(alive[1]) == "triton/bwd.py:455 _run_heads"
    assert bench.allocation_site(alive[0]) == "torch/y.py:1 f"
    assert bench.allocation_site(dict(frames=[])) == "?:0 ?"
    assert bench.live_at_peak([]) == (0, [])
    # stacks='all': an allocation no Python code made is named by its innermost C++ frame past the allocator's
    # and ATen's dispatch; C++ frames never stand for a Python site
    cpp = [frame("??", 0, "torch::CapturedTraceback::gather(bool, bool, bool)"),
           frame("??", 0, "c10::cuda::CUDACachingAllocator::Native::malloc"), frame("??", 0, "at::native::empty_cuda"),
           frame("/s/engine.cpp", 7, "torch::autograd::Engine::evaluate_function"), frame("??", 0, "start_thread")]
    assert bench.allocation_site(dict(frames=cpp)) == \
        "C++ torch::autograd::Engine::evaluate_function < start_thread"
    assert bench.allocation_site(dict(frames=cpp[:3] + glue)) == "triton/bwd.py:455 _run_heads"
    assert bench.allocation_site(dict(frames=cpp[:3])) == "?:0 ?"


def test_interleave_retimes_rows_in_turn_and_keeps_medians():
    """interleave: every row is measured once more per round, all rows in turn, each round starting one row
    further on (a drifting GPU clock and the place in the order hit all alike), and each time becomes the
    median of the row's samples, its first measurement included; a graph that could not be captured (None) is
    left out of its median; a failing re-measurement keeps the row's numbers and is noted."""
    order = []
    first = dict(name="a", fwd_ms=1.0, gpu_ms=0.9, fwd_bwd_ms=4.0, fwd_bwd_gpu_ms=None, note="")
    second = dict(name="b", fwd_ms=2.0, gpu_ms=2.0, fwd_bwd_ms=None, fwd_bwd_gpu_ms=None, note="")
    third = dict(name="c", fwd_ms=3.0, gpu_ms=3.0, fwd_bwd_ms=None, fwd_bwd_gpu_ms=None, note="")
    later = {"a": iter([dict(fwd_ms=1.4, gpu_ms=1.1, fwd_bwd_ms=5.0, fwd_bwd_gpu_ms=3.9),
                        dict(fwd_ms=1.2, gpu_ms=1.0, fwd_bwd_ms=4.6, fwd_bwd_gpu_ms=None)]),
             "b": iter([dict(fwd_ms=2.6, gpu_ms=2.2, fwd_bwd_ms=None, fwd_bwd_gpu_ms=None)] * 2)}

    def measure(name):
        def run():
            order.append(name)
            if name == "c":
                raise RuntimeError("out of memory")
            return next(later[name])
        return run
    log = []
    bench.interleave([(first, measure("a")), (second, measure("b")), (third, measure("c"))], 2, log.append)
    assert order == ["b", "c", "a", "c", "a", "b"] and len(log) == 2     # each round starts one row on
    assert (first["fwd_ms"], first["gpu_ms"], first["fwd_bwd_ms"], first["fwd_bwd_gpu_ms"]) == (1.2, 1.0, 4.6, 3.9)
    assert first["rounds"] == 3 and second["fwd_ms"] == 2.6 and second["fwd_bwd_ms"] is None
    assert third["fwd_ms"] == 3.0 and "round 2 failed: RuntimeError" in third["note"]


def test_bench_rounds_option_reaches_the_run_and_is_shown(monkeypatch):
    """`--rounds 5` reaches bench.run; the table's header says the times are medians of that many rounds;
    0 rounds is a usage error naming the option."""
    seen = {}

    def record(*, into, rounds, **kwargs):
        seen["rounds"] = rounds
        into.update(header=dict(device="GPU", clocks="-", B=1, H=1, L=4096, D=128, dtype="bf16", topk=0.05,
                                torch="x", slagen="y", rounds=rounds), rows=[row("dense SDPA cuDNN", 10.0, 40.0, gpu=9.0)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", record)
    result = CliRunner().invoke(main, ["bench", "--seq-len", "4096", "--rounds", "5"])
    assert result.exit_code == 0, result.output
    assert seen["rounds"] == 5 and "medians of 5 rounds" in result.output
    assert CliRunner().invoke(main, ["bench", "--seq-len", "4096"]).exit_code == 0 and seen["rounds"] == 3
    bad = CliRunner().invoke(main, ["bench", "--rounds", "0"])
    assert bad.exit_code == 2 and "--rounds" in bad.output


STALLING_BENCH = """
import sys, time, torch
from slagen import bench
from slagen.cli import main
header = dict(device="GPU", clocks="-", B=1, H=1, L=4096, D=128, dtype="bf16", topk=0.05, torch="x", slagen="y")

def stuck_in_a_kernel(*, into, echo, **kwargs):
    into.update(header=header, rows=[dict(name="dense SDPA cuDNN", group="", fwd_ms=10.0, fwd_bwd_ms=None,
                                          peak_mib=1.0, sparse_flops=None, component=False, note="", gpu_ms=9.0,
                                          fwd_bwd_gpu_ms=None)])
    echo("  dense SDPA cuDNN: fwd 10.0 ms")
    time.sleep(120)          # a CUDA call that never returns (the GIL released, as torch's waits do)

torch.cuda.is_available = lambda: True
bench.run = stuck_in_a_kernel
main(["bench", "--seq-len", "4096", "--stall-timeout", sys.argv[2], "--json", sys.argv[1]])
"""


def test_a_bench_that_makes_no_progress_ends_with_its_rows_saved_and_the_stacks_shown(tmp_path):
    """A kernel that never finishes blocks its CUDA call, and Ctrl-C / SIGTERM never reach Python (session 32's
    scaling run). --stall-timeout ends such a run: it names the last progress, saves the rows measured so far (the
    JSON is rewritten after every row), prints the Python stacks (the stuck frame among them) and exits with
    status 3 — within a few seconds of the limit, not at the sleep's end."""
    import subprocess
    import sys
    script, out = tmp_path / "stall.py", tmp_path / "bench.json"
    script.write_text(STALLING_BENCH)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(out), "1.5"], capture_output=True, text=True, timeout=90)
    assert proc.returncode == bench.STALL_EXIT, (proc.returncode, proc.stdout, proc.stderr)
    assert time.monotonic() - t0 < 60
    assert "no progress for 1.5 s since 'dense SDPA cuDNN: fwd 10.0 ms'" in proc.stderr, proc.stderr
    assert "stuck_in_a_kernel" in proc.stderr and "most recent call first" in proc.stderr
    saved = json.loads(out.read_text())
    assert saved[0]["rows"][0]["name"] == "dense SDPA cuDNN"


def test_a_stall_inside_a_compiler_is_reported_as_a_compile():
    """The stall guard tells a compile that outlasts --stall-timeout (session 35: FlexAttention's backward, 60 s)
    from a stuck kernel: a stack with a frame in one of bench.COMPILER_FILES names that frame; others give None."""
    import sys
    scope = {"sys": sys}
    exec(compile("def lower():\n    return sys._getframe()\n", "/site/tilelang/engine/lower.py", "exec"), scope)
    exec(compile("def launch(f):\n    return f()\n", "/site/torch/_inductor/runtime/triton_heuristics.py", "exec"),
         scope)
    frame = scope["launch"](scope["lower"])
    assert bench.compiling(frame) == "/site/tilelang/engine/lower.py:2 in lower"
    assert bench.compiling(frame.f_back) is None        # inductor's runtime launches kernels: not a compile
    assert bench.compiling(sys._getframe()) is None and bench.compiling(None) is None


def test_a_bench_that_progresses_keeps_running_past_the_stall_timeout(monkeypatch, tmp_path):
    """Each finished row restarts the stall clock: rows 0.5 s apart never trip a 2 s limit over 4 s; the guard is
    disarmed when the command ends (no exit afterwards)."""
    header = dict(device="GPU", clocks="-", B=1, H=1, L=4096, D=128, dtype="bf16", topk=0.05, torch="x", slagen="y")
    saved_counts = []

    def steady(*, into, echo, **kwargs):
        into.update(header=header, rows=[])
        for i in range(8):
            time.sleep(0.5)
            into["rows"].append(row(f"row {i}", 1.0, gpu=1.0))
            echo(f"  row {i}: fwd 1.0 ms")
            saved_counts.append(len(json.loads(out.read_text())[0]["rows"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", steady)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--seq-len", "4096", "--stall-timeout", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert saved_counts == list(range(1, 9))        # the JSON follows every row
    time.sleep(2.5)                                  # a guard left armed would end this process here
