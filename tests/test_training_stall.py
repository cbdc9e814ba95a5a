"""tools/training_stall.py's orchestration (CPU): variants, the last stage a child reached, a child killed at its
limit reported as stalled with its output."""

import sys

import pytest

from tests.tool_module import load_tool


def _tool():
    return load_tool("training_stall")


def test_variants_map_roles_to_config_overrides():
    tool = _tool()
    assert tool.parse_variant("base=") == ("base", {})
    assert tool.parse_variant('kv1={"backward": {"dkdv": {"ctas_per_sm": 1}}}') == (
        "kv1", {"backward": {"dkdv": {"ctas_per_sm": 1}}})
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
