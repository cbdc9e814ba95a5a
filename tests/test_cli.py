"""The click CLI through CliRunner."""

from click.testing import CliRunner
import torch

import slagen
from slagen.cli import main
from slagen.spec import KernelSpec


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and slagen.__version__ in result.output


def test_info_lists_versions_backends_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLAGEN_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    picks = "backend='auto' picks: " + ("" if torch.cuda.is_available() else "torch")  # CUDA: triton or tilelang
    for words in ("slagen", "torch", "triton", "torch: yes", f"cache dir   {tmp_path}", "SLAGEN_CACHE_DIR=", picks):
        assert words in result.output


def test_build_renders_the_grid_and_emits_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("SLAGEN_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["build", "--arch", "9.0a", "--head-dim", "64,128", "--scope", "marginal,all",
                                       "--backend", "triton", "--emit", str(tmp_path / "out"), "--jobs", "3"])
    assert result.exit_code == 0, result.output
    emitted = sorted(p.name for p in (tmp_path / "out").iterdir())
    # 2 head dims x (1 block map + 2 scopes x (forward + backward))
    assert len(emitted) == 2 * (1 + 2 * 2)
    assert "triton_block_map_sm90_d64_b64x64_none_marginal_nonegl_bf16.py" in emitted
    assert all((tmp_path / "cache" / "generated" / "triton" / name).exists() for name in emitted)


def test_build_rejects_bad_arguments():
    runner = CliRunner()
    bad_arch = runner.invoke(main, ["build", "--arch", "sm75"])
    assert bad_arch.exit_code == 2 and "allowed: sm80, sm86, sm89, sm90" in bad_arch.output
    bad_block = runner.invoke(main, ["build", "--arch", "sm90", "--block", "64"])
    assert bad_block.exit_code == 2 and "must look like 64x64" in bad_block.output
    bad_dim = runner.invoke(main, ["build", "--arch", "sm90", "--head-dim", "96"])
    assert bad_dim.exit_code == 2 and "head_dim=96" in bad_dim.output
    tune = runner.invoke(main, ["build", "--arch", "sm90", "--tune"])
    assert tune.exit_code == 2 and "slagen tune" in tune.output
    not_hopper = runner.invoke(main, ["build", "--arch", "sm80", "--backend", "tilelang"])
    assert not_hopper.exit_code == 2 and "TileLang kernels target sm90 only" in not_hopper.output


def test_build_compiles_tilelang_for_sm90a_without_a_gpu(tmp_path, monkeypatch):
    import shutil

    import pytest
    from slagen.backends import tilelang as tl_backend
    if shutil.which("nvcc") is None or tl_backend.tilelang_import_error():
        pytest.skip("needs nvcc and tilelang to compile sm_90a kernels")
    monkeypatch.setenv("SLAGEN_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["build", "--arch", "sm90", "--head-dim", "128", "--feature-map", "none",
                                       "--backend", "tilelang", "--emit", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "tilelang_backward_sm90_d128_b64x64_none_marginal_nonegl_bf16.py",
        "tilelang_block_map_sm90_d128_b64x64_none_marginal_nonegl_bf16.py",
        "tilelang_forward_sm90_d128_b64x64_none_marginal_nonegl_bf16.py"]
    assert any((tmp_path / "cache" / "tilelang").rglob("*")), "TileLang's kernel cache should live in slagen's"
    spec = KernelSpec(arch="sm90", head_dim=128, block_q=64, block_k=64, feature_map=None, role="backward")
    built = tl_backend.build(spec)      # memoised: the kernels the build compiled, dq and dk/dv
    assert len(built) == 2 and all("wgmma" in k.get_kernel_source() for k in built)
    assert tl_backend.build(spec, {"backward": "triton"}) == []


def test_tune_config_overrides_are_checked_before_any_gpu_work():
    runner = CliRunner()
    bad = runner.invoke(main, ["tune", "--config", "{not json"])
    assert bad.exit_code == 2 and "is not JSON" in bad.output
    bad = runner.invoke(main, ["tune", "--config", "[1, 2]"])
    assert bad.exit_code == 2 and "must be a JSON object" in bad.output


def test_tune_config_override_merges_into_the_default():
    from slagen.backends.triton import bwd, fwd
    from slagen.cli import _override
    spec = KernelSpec(arch="sm90", head_dim=128, block_q=128, block_k=64, role="forward")
    default = fwd.default_config(spec)
    got = _override(default, {"epilogue": "split", "pre_per_sm": 4}, fwd.check_config, spec)
    assert got == {**default, "epilogue": "split", "pre_per_sm": 4} and default["epilogue"] == "lowp"
    assert _override(default, {"no_such_knob": 1}, fwd.check_config, spec) is None
    assert _override(default, {"tile_m": 48}, fwd.check_config, spec) is None
    bspec = spec.replace(role="backward")
    bdefault = bwd.default_config(bspec)
    got = _override(bdefault, {"dkdv": {"block_m": 32}}, bwd.check_config, bspec)
    assert got["dkdv"] == {**bdefault["dkdv"], "block_m": 32} and got["dq"] == bdefault["dq"]
    assert _override(bdefault, {"dkdv": 32}, bwd.check_config, bspec) is None


def test_check_runs_each_backend_against_the_reference_and_its_own_map(monkeypatch):
    """`slagen check` on the CPU (Triton under its interpreter): every case of each backend within its threshold,
    forward and gradients, and the call that builds its own block map gives the bits of the call given one; a
    row whose own-map output differs fails, and the command then exits non-zero."""
    from slagen import check as check_mod
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = ["check", "--backend", "torch,triton", "--seq-len", "77", "--head-dim", "16", "--heads", "1",
            "--dtype", "fp32", "--block", "16x16", "--topk", "0.3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| torch") or line.startswith("| triton")]
    assert len(rows) == 2 * len(check_mod.CASES) and all(row.endswith("| yes | 0.001 | pass |") for row in rows), rows
    assert f"all {len(rows)} checks passed" in result.output
    differs = check_mod.Row("triton", "softmax/marginal/negl=0.0", {"out": 0.0}, 1e-3, own_map=False)
    assert not differs.ok and "| NO |" in check_mod.table([differs])
    real_attention = slagen.attention

    def own_map_differs(*a, **kw):    # a backend whose own-map call is off by one ulp somewhere
        out = real_attention(*a, **kw)
        return out if "block_map" in kw else out + torch.finfo(out.dtype).eps * out.abs().max()
    monkeypatch.setattr(slagen, "attention", own_map_differs)
    failed = CliRunner().invoke(main, args[:2] + ["torch"] + args[3:])
    assert failed.exit_code != 0 and "checks failed" in failed.output and "| NO |" in failed.output
