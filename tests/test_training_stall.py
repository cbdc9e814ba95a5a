"""tools/training_stall.py's orchestration (CPU): variants, the last stage a child reached, a child killed at its
limit reported as stalled with its output; and (GPU) its soak of graphed training, which stalled with the dK/dV
kernel's two CTAs per SM (session 35)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tool_module import load_tool


def _tool():
    return load_tool("training_stall")


def test_variants_map_roles_to_config_overrides():
    tool = _tool()
    assert tool.parse_variant("base=") == ("base", {})
    assert tool.parse_variant('qs={"backward": {"query_state": "triton"}}') == (
        "qs", {"backward": {"query_state": "triton"}})
    for bad in ("noequals", '=""', 'x={"dq": {}}', 'x={"forward": 3}', "x=[1]"):
        with pytest.raises(ValueError, match="--variant"):
            tool.parse_variant(bad)


def test_a_child_killed_at_its_limit_is_reported_with_the_last_stage_it_completed():
    tool = _tool()
    stuck = ("import sys, time; print('STAGE graphed 1.0 s', flush=True); print('STAGE fwd 2.0 s', flush=True); "
             "print('in the forward+backward', file=sys.stderr, flush=True); time.sleep(60)")
    status, stage, seconds, output = tool.run_variant([sys.executable, "-c", stuck], limit=3)
    assert (status, stage) == ("stalled", "fwd") and seconds < 30 and "in the forward+backward" in output
    done = "print('STAGE graphed 0.1 s'); print('STAGE do_bench 0.2 s')"
    assert tool.run_variant([sys.executable, "-c", done], limit=30)[:2] == ("ok", "do_bench")
    failed = tool.run_variant([sys.executable, "-c", "print('STAGE graphed 0.1 s'); raise SystemExit(2)"], limit=30)
    assert failed[:2] == ("failed", "graphed")
    assert tool.last_stage("no marks\n") == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper GPU (the TileLang backend; run with -m gpu on the device)")
def test_gpu_graphed_training_runs_ten_thousand_replays_without_a_stall():
    """The tool's stages and 10000 more forward+backward replays at L 4096, H 12, 128x64 (~6 s of GPU work) finish
    within 240 s. With two dK/dV CTAs per SM (sessions 31-34) 11 of 12 such runs stalled, most within 1500 calls."""
    from slagen.backends import tilelang
    if tilelang.tilelang_import_error():
        pytest.skip(tilelang.tilelang_import_error())
    tool = Path(__file__).resolve().parents[1] / "tools" / "training_stall.py"
    run = subprocess.run([sys.executable, str(tool), "--soak", "10000", "--limit", "240"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "| base | {} | ok | soak |" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
