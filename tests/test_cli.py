"""The click CLI through CliRunner."""

from click.testing import CliRunner

import slagen
from slagen.cli import main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and slagen.__version__ in result.output


def test_info_lists_versions_backends_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLAGEN_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    import torch
    picks = "backend='auto' picks: " + ("" if torch.cuda.is_available() else "torch")  # CUDA: triton or tilelang
    for words in ("slagen", "torch", "triton", "torch: yes", f"cache dir   {tmp_path}", "SLAGEN_CACHE_DIR=", picks):
        assert words in result.output


def test_build_renders_the_grid_and_emits_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("SLAGEN_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["build", "--arch", "9.0a", "--head-dim", "64,128", "--scope", "marginal,all",
                                       "--backend", "triton", "--emit", str(tmp_path / "out")])
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
    assert [p.name for p in (tmp_path / "out").iterdir()] == [
        "tilelang_forward_sm90_d128_b64x64_none_marginal_nonegl_bf16.py"]
    assert any((tmp_path / "cache" / "tilelang").rglob("*")), "TileLang's kernel cache should live in slagen's"
