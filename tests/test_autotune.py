"""Tuning cache, bundles, search spaces and the tuner (with a fake timing backend) on CPU."""

import base64
import hashlib
import json
import multiprocessing
import os
import stat

import pytest
import torch
from click.testing import CliRunner

from slagen.autotune import bundle, cache, records, space, tuner
from slagen.cli import main
from slagen.spec import KernelSpec

SPEC = KernelSpec(arch="sm90", head_dim=128, block_q=128, block_k=64).canonical


def rec(time_ms=1.0, gpu="NVIDIA H100 80GB HBM3", bucket="L32768_d5", created=1.0, meta=None, **config):
    return {"spec": SPEC, "backend": "triton", "gpu": gpu, "arch": "sm90", "bucket": bucket,
            "config": config or {"num_warps": 8}, "time_ms": time_ms, "default_ms": 2.0, "created": created,
            "meta": meta or records.stack_meta()}


@pytest.fixture
def user(tmp_path, monkeypatch):
    monkeypatch.setenv("SLAGEN_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.delenv("SLAGEN_CACHE_PATH", raising=False)
    return tmp_path / "user"


def find(**overrides):
    key = dict(spec=SPEC, backend="triton", gpu="NVIDIA H100 80GB HBM3", arch="sm90", bucket="L32768_d5")
    key.update(overrides)
    return cache.lookup(**key)


def test_shape_bucket():
    assert records.shape_bucket(32760, 25 / 512) == "L32768_d5"
    assert records.shape_bucket(75600, 0.12) == "L131072_d20"
    assert records.shape_bucket(1, 1.0) == "L1_d100"


def test_save_lookup_and_faster_wins(user):
    cache.save([rec(1.0, num_warps=4)])
    cache.save([rec(0.5, num_warps=8), rec(0.7, bucket="L8192_d5")])
    cache.save([rec(0.9, num_warps=2)])                          # slower: does not replace
    hit, source = find()
    assert hit["config"] == {"num_warps": 8} and source == "user"
    assert find(bucket="L8192_d5")[0]["time_ms"] == 0.7
    assert find(gpu="NVIDIA A100-SXM4-80GB") is None             # another GPU's record is not used


def test_record_of_another_stack_is_kept_but_not_used(user):
    old = dict(records.stack_meta(), triton="2.0.0")
    cache.save([rec(0.1, meta=old)])
    assert find() is None
    assert len(cache.read_records(cache.records_path())) == 1


@pytest.mark.parametrize("text", ["{not json", '{"format": "slagen-tuning", "records": [', '[]',
                                  '{"format": "other", "records": []}'])
def test_corrupt_or_truncated_file_is_skipped_with_a_warning(user, text):
    path = cache.records_path()
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.warns(RuntimeWarning, match="skipping"):
        assert find() is None


def test_invalid_record_is_skipped_and_the_rest_used(user):
    path = cache.records_path()
    path.parent.mkdir(parents=True)
    bad = dict(rec(), time_ms="fast")
    path.write_text(cache.dump([bad, rec(0.3)]))
    with pytest.warns(RuntimeWarning, match="time_ms"):
        assert find()[0]["time_ms"] == 0.3


@pytest.mark.parametrize("field,value", [("spec", "forward_sm90_d96_b64x64_softmax_marginal_nonegl_bf16"),
                                         ("config", {"temp_budget": float("nan")}), ("config", {"x": [1]}),
                                         ("meta", {"slagen": "1"}), ("created", float("nan"))])
def test_schema_rejects(field, value):
    with pytest.raises(records.RecordError):
        records.validate(dict(rec(), **{field: value}))


def test_schema_takes_boolean_knobs():
    """TileLang's forward config has warp_specialized: True; its tuning record must store and load."""
    r = dict(rec(), config={"tile_m": 128, "warp_specialized": True, "dq": {"flag": False}})
    assert records.validate(r)["config"] == r["config"]


def _writer(args):
    root, worker = args
    os.environ["SLAGEN_CACHE_DIR"] = root
    for i in range(10):
        cache.save([rec(1.0 + i, bucket=f"L{worker}_{i}", num_warps=worker)])


def test_concurrent_writers_lose_nothing(user):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pool.map(_writer, [(str(user), w) for w in range(3)])
    assert len(cache.read_records(cache.records_path())) == 30


def test_shared_read_only_cache_is_consulted_after_the_user_cache(user, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    cache.save([rec(0.4, num_warps=16), rec(0.4, bucket="L4096_d5")], root=shared)
    os.chmod(cache.records_path(shared), stat.S_IRUSR)
    os.chmod(cache.records_path(shared).parent, stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.setenv("SLAGEN_CACHE_PATH", str(shared))
    assert find()[1] == f"shared:{shared}"
    cache.save([rec(0.9, num_warps=4)])                          # the user's own record comes first
    assert find()[0]["config"] == {"num_warps": 4}
    assert find(bucket="L4096_d5")[1].startswith("shared:")
    os.chmod(cache.records_path(shared).parent, stat.S_IRWXU)


def test_export_import_round_trip(user, tmp_path, monkeypatch):
    cache.save([rec(0.5), rec(0.6, bucket="L8192_d5"), rec(0.1, meta=dict(records.stack_meta(), torch="1.0"))])
    (user / "generated" / "triton").mkdir(parents=True)
    (user / "generated" / "triton" / "k.py").write_text("X = 1\n")
    out = tmp_path / "bundle.json"
    assert bundle.export(out, with_artifacts=True) == {"records": 3, "artifacts": 1}
    monkeypatch.setenv("SLAGEN_CACHE_DIR", str(tmp_path / "other"))
    report = bundle.import_bundle(out)
    assert report.taken == 3 and len(report.unusable) == 1 and "torch 1.0" in report.unusable[0]
    assert report.artifacts_written == 0 and "trust" in report.artifacts_skipped[0]
    assert find()[0]["time_ms"] == 0.5 and find(bucket="L8192_d5")[0]["time_ms"] == 0.6
    report = bundle.import_bundle(out, trust_artifacts=True)
    assert report.artifacts_written == 1
    assert (tmp_path / "other" / "generated" / "triton" / "k.py").read_text() == "X = 1\n"


def _bundle_with(tmp_path, artifact):
    path = tmp_path / "evil.json"
    path.write_text(json.dumps({"format": "slagen-bundle", "version": 1, "meta": {}, "records": [],
                                "artifacts": [artifact]}))
    return path


@pytest.mark.parametrize("rel", ["../escape.py", "/etc/passwd", "generated/../../x", "tuning/records.json"])
def test_bundle_paths_cannot_escape(user, tmp_path, rel):
    data = b"print('pwned')\n"
    art = {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "data": base64.b64encode(data).decode()}
    report = bundle.import_bundle(_bundle_with(tmp_path, art), trust_artifacts=True)
    assert report.artifacts_written == 0 and "escapes" in report.artifacts_skipped[0]
    assert not (tmp_path / "escape.py").exists()


def test_bundle_hash_mismatch_is_refused(user, tmp_path):
    art = {"path": "generated/triton/k.py", "sha256": "0" * 64, "data": base64.b64encode(b"X = 2\n").decode()}
    report = bundle.import_bundle(_bundle_with(tmp_path, art), trust_artifacts=True)
    assert report.artifacts_written == 0 and "SHA-256" in report.artifacts_skipped[0]


def test_not_a_bundle(user, tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(bundle.BundleError, match="not a slagen bundle"):
        bundle.import_bundle(path)


def test_merge_bundles(user, tmp_path, monkeypatch):
    cache.save([rec(0.9, num_warps=4), rec(0.5, bucket="L8192_d5")])
    bundle.export(tmp_path / "a.json")
    monkeypatch.setenv("SLAGEN_CACHE_DIR", str(tmp_path / "b"))
    cache.save([rec(0.3, num_warps=8)])
    bundle.export(tmp_path / "b.json")
    assert bundle.merge_bundles([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "m.json")["records"] == 2
    merged = {r["bucket"]: r for r in bundle.read(tmp_path / "m.json")["records"]}
    assert merged["L32768_d5"]["config"] == {"num_warps": 8} and merged["L8192_d5"]["time_ms"] == 0.5


@pytest.mark.parametrize("arch,dtype", [("sm80", "bf16"), ("sm86", "bf16"), ("sm89", "fp16"), ("sm90", "bf16")])
def test_search_space_is_pruned_by_shared_memory(arch, dtype):
    spec = KernelSpec(arch=arch, head_dim=128, block_q=128, block_k=128, dtype=dtype)
    default = {"tile_m": 64, "tile_n": 64, "num_warps": 4, "num_stages": 2, "other": "x"}

    def check(cfg, spec):
        if cfg["tile_m"] > spec.block_q:
            raise ValueError("tile_m")
    got = space.candidates(spec, default, check)
    assert got[0] == default and all(c["other"] == "x" for c in got)
    assert all(space.shared_bytes(c, spec) <= space.SHARED_MEMORY[arch] for c in got)
    assert len({json.dumps(c, sort_keys=True) for c in got}) == len(got)
    biggest = {**default, "tile_m": 128, "tile_n": 128, "num_stages": 4}
    assert (biggest in got) == (space.shared_bytes(biggest, spec) <= space.SHARED_MEMORY[arch])
    if arch in ("sm86", "sm89"):
        assert biggest not in got


def test_tuner_skips_failures_and_wrong_results_and_keeps_the_fastest():
    configs = [{"w": 1}, {"w": 2}, {"w": 3}, {"w": 4}]
    fake_ms = {1: 2.0, 2: 1.0, 3: 0.1, 4: 0.5}

    def run(cfg):
        if cfg["w"] == 2:
            raise RuntimeError("out of resources")
        return "wrong" if cfg["w"] == 3 else "right"

    def check(out):
        if out != "right":
            raise AssertionError("mismatch vs reference")

    seen = []
    result = tuner.tune(configs, run, check, time_ms=lambda fn: fake_ms[fn.__defaults__[0]["w"]],
                        progress=lambda i, o: seen.append(i))
    assert result.best == {"w": 4} and result.best_ms == 0.5 and result.default_ms == 2.0
    assert result.speedup == 4.0 and seen == [0, 1, 2, 3]
    errors = {o.config["w"]: o.error for o in result.failures}
    assert "out of resources" in errors[2] and "mismatch" in errors[3]
    with pytest.raises(RuntimeError, match="default config"):
        tuner.tune([{"w": 2}], run, check, time_ms=lambda fn: 1.0)


def test_tuner_times_candidates_in_rounds_and_keeps_medians():
    """rounds=3: after the first pass (run, check, time) the correct candidates are timed twice more, in turn
    (a failed one never again), each round starting one candidate further on, and each keeps its median — a
    candidate fast only in the first pass does not win."""
    configs = [{"w": 1}, {"w": 2}, {"w": 3}]
    series = {1: [1.0, 2.0, 2.1], 2: [1.5, 1.6, 1.4], 3: [0.5]}
    order = []

    def run(cfg):
        if cfg["w"] == 3:
            raise RuntimeError("out of resources")
        return "right"

    def time_ms(fn):
        w = fn.__defaults__[0]["w"]
        order.append(w)
        return series[w][sum(x == w for x in order) - 1]
    result = tuner.tune(configs, run, lambda out: None, time_ms, rounds=3)
    assert order == [1, 2, 2, 1, 1, 2]      # the first pass, then rounds starting one candidate further on
    assert result.best == {"w": 2} and result.best_ms == 1.5 and result.default_ms == 2.0


def test_rotation_starts_each_round_one_item_further_on():
    assert tuner.rotation("abc", 0) == list("abc") and tuner.rotation("abc", 1) == list("bca")
    assert tuner.rotation("abc", 5) == list("cab") and tuner.rotation([], 3) == []


def test_tuner_compiles_candidates_on_threads_first():
    """With a compile-only callable and jobs > 1 every candidate compiles on a thread pool before the serial
    runs; only failures of the serial run count (w=2 fails to compile on the pool only, w=5 fails to run);
    the result equals the serial tuner's."""
    import threading
    import time as _time
    configs = [{"w": w} for w in range(1, 7)]
    compiled, threads, lock = [], set(), threading.Lock()

    def compile_only(cfg):
        _time.sleep(0.05)              # long enough for the pool to use several threads
        with lock:
            compiled.append(cfg["w"])
            threads.add(threading.get_ident())
        if cfg["w"] == 2:
            raise RuntimeError("a transient failure")

    def run(cfg):
        if cfg["w"] == 5:
            raise RuntimeError("ptxas: too many resources")
        return "right"

    timed = []

    def time_ms(fn):
        timed.append(fn.__defaults__[0]["w"])
        return {1: 3.0, 2: 2.0, 3: 1.5, 4: 1.0, 6: 4.0}[fn.__defaults__[0]["w"]]
    result = tuner.tune(configs, run, lambda out: None, time_ms, compile=compile_only, jobs=3)
    assert sorted(compiled) == [1, 2, 3, 4, 5, 6] and len(threads) > 1
    assert timed == [1, 2, 3, 4, 6] and result.best == {"w": 4}
    assert [o.config["w"] for o in result.failures] == [5] and "too many resources" in result.failures[0].error
    compiled.clear()
    assert tuner.tune(configs, run, lambda out: None, time_ms, compile=compile_only, jobs=1).best == result.best
    assert compiled == []               # one thread: nothing is compiled ahead


def test_compile_threads():
    from slagen import codegen
    assert codegen.compile_threads(3) == 3 and 1 <= codegen.compile_threads() <= 8


def test_cli_cache_commands(user, tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["cache", "path"]).output.strip() == str(user)
    assert "no tuning records" in runner.invoke(main, ["cache", "ls"]).output
    cache.save([rec(0.5)])
    listing = runner.invoke(main, ["cache", "ls"]).output
    assert SPEC in listing and "4.00x default" in listing and "usable" in listing
    assert json.loads(runner.invoke(main, ["cache", "show", "H100"]).output)[0]["time_ms"] == 0.5
    assert runner.invoke(main, ["cache", "show", "nothing-like-this"]).exit_code == 1
    out = tmp_path / "b.json"
    assert "exported 1 records" in runner.invoke(main, ["cache", "export", str(out)]).output
    assert "deleted 1 records" in runner.invoke(main, ["cache", "clear", "--yes"]).output
    result = runner.invoke(main, ["cache", "import", str(out)])
    assert "took 1 records" in result.output and find() is not None
    merged = tmp_path / "m.json"
    assert "1 records" in runner.invoke(main, ["cache", "merge", str(out), str(out), "-o", str(merged)]).output
    bad = tmp_path / "bad.json"
    bad.write_text("nope")
    result = runner.invoke(main, ["cache", "import", str(bad)])
    assert result.exit_code == 1 and "cannot read bundle" in result.output


def test_runtime_lookup_uses_the_tuned_record_and_memoises(user, monkeypatch):
    from slagen.autotune import select
    spec = KernelSpec(arch="sm90", head_dim=128, block_q=128, block_k=64)
    monkeypatch.setattr(select, "gpu_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("SLAGEN_AUTOTUNE", raising=False)
    select.forget()
    device = torch.device("cuda", 0)          # never touched: the GPU name is patched above
    assert select.config_for(spec, "triton", device, 32760, 25 / 512) is None
    cache.save([rec(0.5, num_warps=4)])
    select.forget()
    assert select.config_for(spec, "triton", device, 32760, 25 / 512) == {"num_warps": 4}
    assert select.config_for(spec, "triton", device, 8000, 25 / 512) is None        # another bucket
    assert select.config_for(spec, "triton", torch.device("cpu"), 32760, 0.05) is None
    select.forget()

    def check(cfg, spec_):
        if cfg.get("num_warps") == 4:
            raise ValueError("config has unknown keys")
    assert select.config_for(spec, "triton", device, 32760, 25 / 512, check=check) is None   # stale: not used
    select.forget()


def test_slagen_autotune_tunes_once_on_first_use(user, monkeypatch):
    from slagen.autotune import problems, select
    spec = KernelSpec(arch="sm90", head_dim=128, block_q=128, block_k=64)
    monkeypatch.setattr(select, "gpu_name", lambda device: "NVIDIA H100 80GB HBM3")
    calls = []

    def fake_tune(spec_, backend, device, seq_len, density):
        calls.append((spec_, backend, seq_len))
        return tuner.TuneResult(best={"num_warps": 8}, best_ms=1.0, default_ms=2.0, outcomes=[])
    monkeypatch.setattr(problems, "tune_and_store", fake_tune)
    select.forget()
    monkeypatch.setenv("SLAGEN_AUTOTUNE", "1")
    for _ in range(3):
        assert select.config_for(spec, "triton", torch.device("cuda", 0), 32760, 0.05) == {"num_warps": 8}
    assert calls == [(spec, "triton", 32760)]
    select.forget()


@pytest.mark.parametrize("role", ["block_map", "forward", "backward"])
def test_tuning_problem_checks_candidates_against_the_reference(role):
    """The real problem builder on CPU (Triton interpreter): the default passes its reference check, a
    corrupted output is rejected, and the tuner keeps the correct candidate."""
    from slagen.autotune import problems
    spec = KernelSpec(arch="sm80", head_dim=16, block_q=16, block_k=16, dtype="fp32", role=role,
                      has_negligible=True, feature_map=None if role == "block_map" else "softmax")
    problem = problems.make_problem(spec, "triton", torch.device("cpu"), heads=1, seq_len=70, density=0.3,
                                    negligible=0.2)
    good = problem.run(problem.default)
    problem.check(good)
    bad = tuple(t.clone() for t in good)
    if role == "block_map":
        bad[0].neg_()
    else:
        bad[0].add_(1.0)
    with pytest.raises(AssertionError):
        problem.check(bad)
    configs = space.candidates(spec, problem.default, problem.module.check_config)[:2]
    result = tuner.tune(configs, problem.run, problem.check, time_ms=lambda fn: 1.0)
    assert not result.failures and result.best == problem.default


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the TileLang backward runs on a Hopper (sm90) GPU only")
def test_tilelang_backward_problem_runs_the_path_an_autograd_call_runs(monkeypatch):
    """The TileLang backward is tuned as autograd calls it: given the forward's kept H_i, Z_i (no O^l or den
    saved), so den and D^l come from the query-state kernel (the default there), not the Triton _lin_rows; the
    default config passes the reference check."""
    pytest.importorskip("tilelang", reason="the TileLang backend needs tilelang installed")
    from slagen.autotune import problems
    from slagen.backends import tilelang as tl_backend
    from slagen.backends.triton import bwd
    spec = KernelSpec(arch="sm90", head_dim=128, block_q=128, block_k=64, dtype="bf16", role="backward",
                      has_negligible=False, feature_map="softmax", scope="marginal")
    problem = problems.make_problem(spec, "tilelang", torch.device("cuda"), heads=2, seq_len=1000, density=0.1)
    kernels = []
    real = tl_backend.backward_kernel
    monkeypatch.setattr(tl_backend, "backward_kernel",
                        lambda spec, cfg, kernel, **kw: (kernels.append(kernel), real(spec, cfg, kernel, **kw))[1])
    monkeypatch.setattr(bwd, "_lin_rows", lambda c, dl: pytest.fail("_lin_rows ran where the forward kept H_i, Z_i"))
    out = problem.run(problem.default)
    torch.cuda.synchronize()
    problem.check(out)
    assert kernels == ["query_state", "dq", "dkdv"]


def test_search_space_varies_the_marginal_mode_only_where_it_matters():
    from slagen.backends.triton import fwd
    for scope, fmap, want in (("marginal", "softmax", {"gemm", "onchip"}), ("all", "softmax", {"gemm"}),
                              ("marginal", None, {"gemm"})):
        spec = KernelSpec(arch="sm90", head_dim=128, block_q=128, block_k=64, scope=scope, feature_map=fmap)
        got = space.candidates(spec, fwd.default_config(spec), fwd.check_config)
        assert {c["marginal"] for c in got} == want


@pytest.mark.parametrize("limit", [None, 1, 2, 5, 9, 10, 50])
def test_spread_keeps_the_default_and_samples_the_rest_evenly(limit):
    configs = [{"i": i} for i in range(10)]
    got = space.spread(configs, limit)
    assert got[0] == {"i": 0}
    assert len(got) == (10 if limit is None else min(limit, 10))
    assert len({c["i"] for c in got}) == len(got)  # no config twice
    if limit == 5:
        assert [c["i"] for c in got] == [0, 1, 3, 5, 7]


def test_tilelang_backward_space_times_both_implementations():
    pytest.importorskip("tilelang", reason="the TileLang backend's config module needs tilelang installed")
    from slagen.autotune import problems
    from slagen.backends import tilelang as tl_backend
    assert problems.role_module("tilelang", "backward") is tl_backend
    spec = KernelSpec(arch="sm90", head_dim=128, block_q=128, block_k=64, role="backward")
    got = space.candidates(spec, tl_backend.default_config(spec), tl_backend.check_config)
    assert got[0] == tl_backend.default_config(spec)
    # the query-state kernel or the Triton _lin_rows + _query_state, under either backward (scope marginal)
    assert [(c["backward"], c["query_state"]) for c in got] == [
        ("tilelang", "tilelang"), ("triton", "tilelang"), ("triton", "triton"), ("tilelang", "triton")]
    sparse_only = spec.replace(feature_map=None)
    assert [c["backward"] for c in space.candidates(sparse_only, tl_backend.default_config(sparse_only),
                                                     tl_backend.check_config)] == ["tilelang", "triton"]


@pytest.mark.parametrize("backend,role", [("triton", "forward"), ("triton", "backward"), ("tilelang", "forward"),
                                          ("tilelang", "backward")])
def test_every_candidate_config_is_storable_as_a_record(backend, role):
    """What `slagen tune` stores (a candidate, default included) must pass the record schema: the TileLang
    backward's config nests its Triton linear part's configs one level deeper (config["linear"]["dq"])."""
    if backend == "tilelang":
        pytest.importorskip("tilelang", reason="the TileLang backend's config module needs tilelang installed")
    from slagen.autotune import problems
    module = problems.role_module(backend, role)
    spec = KernelSpec(arch="sm90", head_dim=128, block_q=128, block_k=64, role=role)
    configs = space.candidates(spec, module.default_config(spec), module.check_config)
    assert configs and configs[0] == module.default_config(spec)
    for config in configs:
        assert records.validate(dict(rec(), backend=backend, spec=spec.canonical, config=config))["config"] == config


def test_schema_rejects_configs_nested_too_deep():
    with pytest.raises(records.RecordError, match="nested at most 2 levels"):
        records.validate(dict(rec(), config={"linear": {"dq": {"block_m": {"x": 1}}}}))


def test_copy_config_shares_no_dict_at_any_depth():
    config = {"backward": "tilelang", "dq": {"tile_m": 128}, "linear": {"dq": {"block_m": 64}}}
    copied = space.copy_config(config)
    copied["dq"]["tile_m"], copied["linear"]["dq"]["block_m"] = 64, 128
    assert config == {"backward": "tilelang", "dq": {"tile_m": 128}, "linear": {"dq": {"block_m": 64}}}
