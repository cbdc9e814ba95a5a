"""The ``slagen`` command line (click): info, build."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import logging
import os
import platform
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, List

import click

from slagen import codegen
from slagen.bench import SLAGEN_ROWS
from slagen.paths import cache_dir, shared_cache_dirs
from slagen.spec import ROLES, KernelSpec, parse_arch, parse_dtype, parse_feature_map, parse_scope

# The kernel roles each backend renders from its own templates (TileLang's block map template pools Q and K;
# its scores and selection are Triton's kernels, and so are its backward's state kernels).
TEMPLATE_ROLES = {"triton": ROLES, "tilelang": ("forward", "backward", "block_map")}


def _version() -> str:
    from slagen import __version__
    return __version__


def _csv(parse: Callable[[str], object]):
    """A click callback turning 'a,b' into [parse('a'), parse('b')], as a BadParameter on error."""
    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return [parse(part.strip()) for part in value.split(",") if part.strip()]
        except ValueError as err:
            raise click.BadParameter(str(err)) from None
    return callback


def _block(text: str):
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"block={text!r} must look like 64x64 (block_q x block_k)")
    return int(parts[0]), int(parts[1])


def _negligible(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError(f"negligible={text!r}; allowed: on, off")
    return text == "on"


def _role(text: str) -> str:
    if text not in ROLES:
        raise ValueError(f"role={text!r}; allowed: {', '.join(ROLES)}")
    return text


def _module_version(name: str) -> str:
    """Installed version of a distribution, without importing it (importing tilelang takes seconds)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="slagen")
def main():
    """slagen: generated Sparse-Linear Attention kernels (TileLang on Hopper, Triton elsewhere)."""


@main.command()
def info():
    """Versions, GPUs, backends, cache location and SLAGEN_* settings in force."""
    import torch

    from slagen import backends
    from slagen.dispatch import device_arch, resolve, spec_for

    click.echo(f"slagen      {_version()}")
    click.echo(f"python      {platform.python_version()} ({sys.executable})")
    for name in ("torch", "triton", "tilelang", "jinja2", "click"):
        click.echo(f"{name:<11} {_module_version(name)}")
    click.echo(f"cuda        {torch.version.cuda or 'none (CPU build of torch)'}")
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [torch.device("cpu")]
    for dev in devices:
        label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
        arch = device_arch(dev) or "-"
        spec, why = spec_for(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, head_dim=128)
        served = []
        for name in backends.NAMES:
            reason = None if name == "torch" else (why if spec is None else
                                                   backends.get(name).unavailable_reason(dev, spec))
            served.append(f"{name}: {'yes' if reason is None else 'no (' + reason + ')'}")
        click.echo(f"device      {dev} {label} [{arch}]")
        for line in served:
            click.echo(f"              {line}")
        click.echo(f"              backend='auto' picks: {resolve('auto', dev, spec, why)} "
                   f"(for head_dim 128, {'bf16' if dev.type == 'cuda' else 'fp32'}, blocks 64x64)")
    click.echo(f"cache dir   {cache_dir()}")
    for path in shared_cache_dirs():
        click.echo(f"shared      {path} (read-only)")
    env = {k: v for k, v in os.environ.items() if k.startswith("SLAGEN_") or k == "TRITON_INTERPRET"}
    click.echo("env         " + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "(no SLAGEN_* set)"))


def spec_grid(arch, head_dims, dtypes, blocks, feature_maps, scopes, negligibles) -> List[KernelSpec]:
    """Every distinct KernelSpec of the grid, one per role (KernelSpec normalises the fields a role does not
    depend on, so e.g. one block-map spec serves every feature map and scope)."""
    specs = []
    for d, dt, (bq, bk), fm, sc, ng, role in itertools.product(head_dims, dtypes, blocks, feature_maps, scopes,
                                                              negligibles, ROLES):
        spec = KernelSpec(arch=arch, head_dim=d, block_q=bq, block_k=bk, feature_map=fm, scope=sc,
                          has_negligible=ng, dtype=dt, role=role)
        if spec not in specs:
            specs.append(spec)
    return specs


@main.command()
@click.option("--arch", required=True, callback=lambda c, p, v: _csv(parse_arch)(c, p, v)[0],
              help="Target arch: sm80, sm86, sm89, sm90 (also 9.0, 9.0a, sm_90a).")
@click.option("--head-dim", "head_dims", default="128", show_default=True, callback=_csv(int),
              help="Head dims, comma-separated.")
@click.option("--dtype", "dtypes", default="bf16", show_default=True, callback=_csv(parse_dtype))
@click.option("--block", "blocks", default="64x64", show_default=True, callback=_csv(_block),
              help="Selection blocks block_qxblock_k, comma-separated.")
@click.option("--feature-map", "feature_maps", default="softmax", show_default=True,
              callback=_csv(parse_feature_map), help="softmax, elu, relu or none (sparse-only).")
@click.option("--scope", "scopes", default="marginal", show_default=True, callback=_csv(parse_scope))
@click.option("--negligible", "negligibles", default="off", show_default=True, callback=_csv(_negligible),
              help="Negligible class: off, on or off,on.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "triton", "tilelang"]))
@click.option("--tune/--no-tune", default=False, help="Autotune on the local GPU after building.")
@click.option("--seq-len", "seq_lens", multiple=True, type=int, help="Sequence lengths to tune for.")
@click.option("--emit", type=click.Path(file_okay=False, path_type=Path),
              help="Also copy the generated sources into this directory.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Kernels built at once (threads; TileLang compiles overlap). Default: the CPU count, at most 8.")
def build(arch, head_dims, dtypes, blocks, feature_maps, scopes, negligibles, backend, tune, seq_lens, emit, jobs):
    """Render every kernel of a spec grid into the cache; compile what this machine's toolchain can.

    Triton kernels are rendered and imported (Triton compiles them on the GPU at first use); TileLang
    kernels (sm90 forward and backward) are compiled to sm_90a cubins, which needs only tilelang and nvcc,
    no GPU.
    """
    if tune:
        raise click.UsageError("--tune: tune on a GPU host with `slagen tune` (same spec options, plus --seq-len)")
    try:
        specs = spec_grid(arch, head_dims, dtypes, blocks, feature_maps, scopes, negligibles)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    items = [(s, "triton") for s in specs] if backend in ("auto", "triton") else []
    if backend in ("auto", "tilelang"):
        why_not = _tilelang_build_blocker(arch)
        if why_not and backend == "tilelang":
            raise click.UsageError(f"--backend tilelang: {why_not}")
        if why_not:
            click.echo(f"note: not building TileLang kernels: {why_not}")
        else:
            logging.getLogger("tilelang").setLevel(logging.WARNING)  # one line per compile drowns the bar
            tl_specs = [s for s in specs if s.role in TEMPLATE_ROLES["tilelang"] and s.dtype in ("bf16", "fp16")
                        and s.head_dim in (64, 128)]
            items += [(s, "tilelang") for s in tl_specs]
            if len(tl_specs) < len([s for s in specs if s.role in TEMPLATE_ROLES["tilelang"]]):
                click.echo("note: TileLang serves bf16/fp16 forwards and backwards of head dim 64/128; the rest "
                           "build for Triton only")
    threads = codegen.compile_threads(jobs)
    click.echo(f"building {len(items)} kernels for {arch} into {cache_dir() / 'generated'} ({threads} at a time)")

    def build_one(item):
        spec, name = item
        if name == "tilelang":
            from slagen.backends import tilelang as tl_backend
            tl_backend.build(spec)
            path = Path(codegen.load(spec, name).__file__)   # the file the compiled kernels came from
        else:
            path = codegen.write(spec, name)
            codegen.import_file(path)
        if emit:
            emit.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, emit / path.name)
        return item

    from concurrent.futures import ThreadPoolExecutor, as_completed
    with click.progressbar(length=len(items), label="building",
                           item_show_func=lambda item: item and item[0].uri(item[1])) as bar, \
            ThreadPoolExecutor(max_workers=threads) as pool:
        for done in as_completed([pool.submit(build_one, item) for item in items]):
            bar.update(1, done.result())
    if emit:
        click.echo(f"sources copied to {emit}")
    click.echo("done: Triton kernels compile on the GPU at first use; TileLang kernels are compiled to sm_90a.")


def _tilelang_build_blocker(arch: str):
    """Why TileLang kernels cannot be built here for ``arch``, or None."""
    if arch != "sm90":
        return f"TileLang kernels target sm90 only (asked for {arch})"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc is not on PATH (TileLang compiles sm_90a cubins with it)"
    from slagen.backends import tilelang as tl_backend
    return tl_backend.tilelang_import_error()


@main.group("cache")
def cache_group():
    """Inspect and share the tuning cache (records are plain JSON; see README, "Tuning and sharing")."""


@cache_group.command("path")
def cache_path():
    """Print the user cache dir (and the shared read-only dirs of SLAGEN_CACHE_PATH)."""
    click.echo(str(cache_dir()))
    for path in shared_cache_dirs():
        click.echo(f"{path} (shared, read-only)")


def _all_records():
    from slagen.autotune import cache, records
    here = records.stack_meta()
    for label, path in cache.sources():
        for r in cache.read_records(path):
            yield label, r, r["meta"] == here


@cache_group.command("ls")
def cache_ls():
    """One line per tuning record: where, spec, backend, GPU, bucket, config, time, speedup, usable."""
    rows = list(_all_records())
    if not rows:
        click.echo(f"no tuning records (user cache: {cache_dir()})")
        return
    for label, r, usable in rows:
        cfg = ",".join(f"{k}={v}" for k, v in sorted(r["config"].items()))
        speed = r["default_ms"] / r["time_ms"] if r["time_ms"] else float("nan")
        state = "usable" if usable else "other stack (not used)"
        click.echo(f"{label:<8} {r['backend']:<8} {r['spec']} {r['gpu']} [{r['bucket']}] {cfg} "
                   f"{r['time_ms']:.3f} ms ({speed:.2f}x default) {state}")


@cache_group.command("show")
@click.argument("pattern")
def cache_show(pattern):
    """Print the records whose spec, GPU or bucket contains PATTERN, as JSON."""
    hits = [dict(r, source=label, usable=usable) for label, r, usable in _all_records()
            if pattern in r["spec"] or pattern in r["gpu"] or pattern in r["bucket"]]
    if not hits:
        raise click.ClickException(f"no tuning record matches {pattern!r}")
    click.echo(json.dumps(hits, indent=1, sort_keys=True))


@cache_group.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--with-artifacts", is_flag=True, help="Also pack the generated sources and compiled kernels.")
def cache_export(file, with_artifacts):
    """Write the user cache's records (optionally artifacts) to one portable FILE."""
    from slagen.autotune import bundle
    summary = bundle.export(file, with_artifacts=with_artifacts)
    click.echo(f"exported {summary['records']} records and {summary['artifacts']} artifacts to {file}")


@cache_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--trust-artifacts", is_flag=True,
              help="Write the bundle's compiled artifacts (after checking their SHA-256 and paths).")
def cache_import(file, trust_artifacts):
    """Merge a bundle FILE into the user cache, reporting what was taken and what was skipped."""
    from slagen.autotune import bundle, select
    try:
        report = bundle.import_bundle(file, trust_artifacts=trust_artifacts)
    except bundle.BundleError as err:
        raise click.ClickException(str(err)) from None
    select.forget()
    click.echo(f"took {report.taken} records into {cache_dir()}")
    for line in report.unusable:
        click.echo(f"  stored, not usable on this stack: {line}")
    for line in report.skipped:
        click.echo(f"  skipped: {line}")
    click.echo(f"artifacts written: {report.artifacts_written}")
    for line in report.artifacts_skipped:
        click.echo(f"  artifacts skipped: {line}")


@cache_group.command("merge")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
def cache_merge(files, output):
    """Combine bundle FILES into one bundle (per key the faster record wins)."""
    from slagen.autotune import bundle, records
    try:
        summary = bundle.merge_bundles(list(files), output)
    except (bundle.BundleError, records.RecordError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"merged {len(files)} bundles into {output}: {summary['records']} records, "
               f"{summary['artifacts']} artifacts")


@cache_group.command("clear")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--all", "everything", is_flag=True, help="Also delete generated sources and compiled kernels.")
def cache_clear(yes, everything):
    """Delete the user cache's tuning records (and with --all, everything under the cache dir)."""
    from slagen.autotune import cache
    root = cache_dir()
    if not yes:
        click.confirm(f"delete the tuning records{' and all generated files' if everything else ''} in {root}?",
                      abort=True)
    count = cache.clear()
    if everything and root.exists():
        shutil.rmtree(root)
    click.echo(f"deleted {count} records" + (f" and {root}" if everything else ""))


@main.command()
@click.option("--backend", default="triton", show_default=True, type=click.Choice(["triton", "tilelang"]),
              help="tilelang tunes its forward and its backward (TileLang or Triton sparse loops); its block map "
                   "and the backward's Triton kernels are tuned with triton.")
@click.option("--head-dim", "head_dims", default="128", show_default=True, callback=_csv(int))
@click.option("--dtype", "dtypes", default="bf16", show_default=True, callback=_csv(parse_dtype))
@click.option("--block", "blocks", default="128x64", show_default=True, callback=_csv(_block))
@click.option("--feature-map", "feature_maps", default="softmax", show_default=True,
              callback=_csv(parse_feature_map))
@click.option("--scope", "scopes", default="marginal", show_default=True, callback=_csv(parse_scope))
@click.option("--negligible", "negligibles", default="off", show_default=True, callback=_csv(_negligible))
@click.option("--role", "roles", default=",".join(ROLES), show_default=True,
              callback=_csv(_role))
@click.option("--seq-len", "seq_lens", multiple=True, type=int, default=(32760,), show_default=True)
@click.option("--topk", default=0.05, show_default=True, type=float, help="Density to tune at.")
@click.option("--heads", default=12, show_default=True, type=int)
@click.option("--batch", default=1, show_default=True, type=int)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Time at most this many candidates per kernel: the default config, then an even spread of "
                   "the rest of the space (for a quick tune; the full space can take minutes per kernel).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Threads compiling TileLang candidates before they are timed one by one (default: the CPU "
                   "count, at most 8). Triton compiles each candidate at its first launch, one at a time.")
@click.option("--config", "configs", multiple=True, metavar="JSON",
              help="Time the default config and exactly these instead of the search space (repeatable): JSON "
                   "objects of overrides, e.g. '{\"epilogue\": \"fused\"}' or, for the nested backward config, "
                   "'{\"dkdv\": {\"block_m\": 32}}'. Invalid ones are reported and skipped.")
def tune(backend, head_dims, dtypes, blocks, feature_maps, scopes, negligibles, roles, seq_lens, topk, heads,
         batch, limit, jobs, configs):
    """Autotune kernels on the local GPU and store the winners in the user tuning cache."""
    import torch

    from slagen.autotune import cache, problems, space
    from slagen.dispatch import device_arch

    overrides = []
    for text in configs:
        try:
            overrides.append(json.loads(text))
        except json.JSONDecodeError as err:
            raise click.BadParameter(f"{text!r} is not JSON: {err}", param_hint="--config") from None
        if not isinstance(overrides[-1], dict):
            raise click.BadParameter(f"{text!r} must be a JSON object", param_hint="--config")
    if not torch.cuda.is_available():
        raise click.ClickException("slagen tune needs a CUDA GPU (none is visible to torch)")
    device = torch.device("cuda", torch.cuda.current_device())
    arch = device_arch(device)
    try:
        specs = [s for s in spec_grid(arch, head_dims, dtypes, blocks, feature_maps, scopes, negligibles)
                 if s.role in roles and s.role in problems.ROLE_MODULES[backend]]
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    click.echo(f"tuning {len(specs)} kernels x {len(seq_lens)} lengths on {torch.cuda.get_device_name(device)} "
               f"({arch}), B={batch} H={heads} topk={topk}")
    for spec in specs:
        for seq_len in seq_lens:
            mod = problems.role_module(backend, spec.role)
            default = mod.default_config(spec)
            if overrides:
                picked = [default] + [c for c in (_override(default, o, mod.check_config, spec) for o in overrides)
                                      if c is not None and c != default]
            else:
                picked = space.spread(space.candidates(spec, default, mod.check_config), limit)
            threads = codegen.compile_threads(jobs) if backend == "tilelang" else 1
            click.echo(f"{spec.canonical} L={seq_len}: {len(picked)} candidates"
                       + (f", compiled on {threads} threads first" if threads > 1 else ""))
            with click.progressbar(length=len(picked), label=f"{spec.canonical} L={seq_len}",
                                   show_eta=True) as bar:
                result = problems.tune_and_store(spec, backend, device, seq_len=seq_len, density=topk,
                                                 batch=batch, heads=heads, configs=picked, jobs=jobs,
                                                 progress=lambda i, outcome: bar.update(1))
            best = ", ".join(f"{k}={v}" for k, v in sorted(result.best.items()))
            click.echo(f"  winner {best}: {result.best_ms:.3f} ms vs default {result.default_ms:.3f} ms "
                       f"({result.speedup:.2f}x); {len(result.failures)} of {len(picked)} candidates failed")
            for outcome in result.outcomes:
                diff = {key: val for key, val in outcome.config.items() if val != default.get(key)} or "default"
                timing = f"{outcome.time_ms:.3f} ms" if outcome.time_ms is not None else outcome.error
                click.echo(f"    {json.dumps(diff)}: {timing}")
    click.echo(f"stored in {cache.records_path()}")


def _override(default: dict, override: dict, check, spec):
    """``default`` with ``override`` applied (one level deep for nested configs), or None (reported) when the
    kernel's check_config rejects the result or the override names keys the kernel does not have."""
    from slagen.autotune.space import copy_config
    cfg = copy_config(default)
    for key, val in override.items():
        if key not in cfg or isinstance(cfg[key], dict) != isinstance(val, dict):
            click.echo(f"  --config {json.dumps(override)}: {key!r} is not a {spec.role} tunable "
                       f"(keys: {', '.join(cfg)}); skipped")
            return None
        if isinstance(val, dict):
            cfg[key].update(val)
        else:
            cfg[key] = val
    try:
        check(cfg, spec)
    except (ValueError, KeyError, TypeError) as err:
        click.echo(f"  --config {json.dumps(override)}: {err}; skipped")
        return None
    return cfg


@main.command()
@click.option("--seq-len", "seq_lens", default="32760", show_default=True, callback=_csv(int),
              help="Sequence lengths, comma-separated (one table each: e.g. 8192,16384,32760,75600).")
@click.option("--heads", default=12, show_default=True, type=int)
@click.option("--batch", default=1, show_default=True, type=int)
@click.option("--head-dim", default=128, show_default=True, type=int)
@click.option("--topk", default=0.05, show_default=True, type=float)
@click.option("--block", "blocks", default="128x64,64x64", show_default=True, callback=_csv(_block))
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "fp16"]))
@click.option("--backend", "backends", default="triton", show_default=True,
              help="slagen backends to measure, comma-separated (triton, tilelang).")
@click.option("--flex/--no-flex", default=True, help="Also time FlexAttention on the same blocks (compiles).")
@click.option("--backward/--no-backward", default=True, help="Also time forward+backward.")
@click.option("--reference-sla", "reference_sla", multiple=True, metavar="LABEL=DIR",
              help="Also time the authors' thu-ml/SLA code found in DIR (holding sparse_linear_attention/).")
@click.option("--rows", "slagen_rows", default=",".join(SLAGEN_ROWS), show_default=True,
              callback=_csv(str), help="slagen rows to time per block size and backend, comma-separated: "
              "blockmap (the block map alone), marginal / all (SLA, scope marginal / all), sparse (sparse-only), "
              "given (sparse-only given the block map). The dense and FlexAttention rows always run.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Times are medians of this many measurements per row, every row re-timed in turn, each round "
              "starting one row further on (a row's place in the order changes its time).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write the results as JSON (rewritten after every row, so a run cut short keeps its rows).")
@click.option("--stall-timeout", default=900.0, show_default=True, type=float,
              help="Seconds without a finished row or round after which the run is ended (a kernel that never "
              "finishes ignores Ctrl-C and SIGTERM): last progress and Python stacks printed, rows so far in the "
              "JSON, exit status 3. 0: never.")
def bench(seq_lens, heads, batch, head_dim, topk, blocks, dtype, backends, flex, backward, reference_sla,
          slagen_rows, rounds, json_path, stall_timeout):
    """SLA vs dense attention (SDPA cuDNN/flash) and FlexAttention on this GPU: a table per length (and JSON)."""

    import torch

    from slagen import bench as bench_mod
    unknown = [r for r in slagen_rows if r not in SLAGEN_ROWS]
    if unknown or not slagen_rows:
        raise click.BadParameter(f"{unknown or 'nothing'}: choose from {', '.join(SLAGEN_ROWS)}",
                                 param_hint="--rows")
    if not torch.cuda.is_available():
        raise click.ClickException("slagen bench needs a CUDA GPU (none is visible to torch)")
    refs = [tuple(item.split("=", 1)) if "=" in item else (item, item) for item in reference_sla]
    results = []

    def save_json():
        if json_path:
            with open(json_path, "w") as fh:
                json.dump([r for r in results if r.get("rows")], fh, indent=1)

    def write_json():
        if json_path:
            save_json()
            click.echo(f"\nJSON written to {json_path}")

    last = "the start"

    def progress(line: str) -> None:     # a finished row or round: shown, saved, and the stall clock restarted
        nonlocal last
        click.echo(line)
        last = line.strip()
        save_json()
        guard.kick()

    def stalled():
        where = bench_mod.compiling(sys._current_frames().get(threading.main_thread().ident))
        why = (f"the main thread is compiling ({where}): a compile that outlasted the limit, not a stuck kernel; "
               "raise --stall-timeout (FlexAttention's backward compiles for minutes)" if where else
               "the GPU is likely stuck in a kernel")
        click.echo(f"\nslagen bench: no progress for {stall_timeout:g} s since {last!r} (--stall-timeout); {why}. "
                   "Python stacks follow." + (f" The rows measured so far are in {json_path}." if json_path else ""),
                   err=True)
        save_json()

    def stop(signum, frame):     # `timeout`'s SIGTERM: end like Ctrl-C, with the rows measured so far
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    guard = bench_mod.StallGuard(stall_timeout, stalled)
    try:
        for seq_len in seq_lens:     # each length's table as soon as it is measured
            click.echo(f"== L={seq_len}")
            results.append({})
            bench_mod.run(batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim, topk=topk, blocks=blocks,
                          dtype=dtype, backward=backward, flex=flex, echo=progress, into=results[-1],
                          backends=[b.strip() for b in backends.split(",") if b.strip()], reference_sla=refs,
                          slagen_rows=slagen_rows, rounds=rounds)
            torch.cuda.empty_cache()
            click.echo("\n" + bench_mod.table(results[-1]) + "\n")
    except KeyboardInterrupt:
        results = [r for r in results if r.get("rows")]
        if results:
            click.echo("\n(interrupted: the table of the rows measured so far)\n\n" + bench_mod.table(results[-1]))
        write_json()
        raise SystemExit(130)
    finally:
        guard.close()
        signal.signal(signal.SIGTERM, previous)
    if len(results) > 1:
        click.echo("Scaling with L (forward GPU time; per work: relative to the first length, 1.00 = linear in "
                   "the work):\n\n" + bench_mod.scaling_table(results))
    write_json()


@main.command()
@click.option("--backend", "backend_names", default=None, help="Backends to check, comma-separated (default: all available).")
@click.option("--seq-len", default=4096, show_default=True, type=int)
@click.option("--head-dim", default=128, show_default=True, type=int)
@click.option("--heads", default=2, show_default=True, type=int)
@click.option("--dtype", default=None, type=click.Choice(["bf16", "fp16", "fp32"]),
              help="Input dtype (default bf16 on a GPU, fp32 on CPU).")
@click.option("--topk", default=0.05, show_default=True, type=float)
@click.option("--block", default="128x64", show_default=True, callback=lambda c, p, v: _block(v))
def check(backend_names, seq_len, head_dim, heads, dtype, topk, block):
    """Every available backend vs the reference on fresh random inputs, forward and gradients."""
    import torch

    from slagen import check as check_mod
    cuda = torch.cuda.is_available()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype or ("bf16" if cuda else "fp32")]
    device = torch.device("cuda" if cuda else "cpu")
    names = [n.strip() for n in backend_names.split(",")] if backend_names else check_mod.available(device, dt)
    if not names:
        click.echo(f"no kernel backend runs on {device} here: checking the torch reference in {dt} against float64")
        names = ["torch"]
    click.echo(f"checking {', '.join(names)} on {device}: L={seq_len} D={head_dim} H={heads} {dt} topk={topk} "
               f"block={block[0]}x{block[1]}")
    rows = check_mod.run(backend_names=names, seq_len=seq_len, head_dim=head_dim, heads=heads, dtype=dt, topk=topk,
                         block_q=block[0], block_k=block[1], device=device, echo=click.echo)
    click.echo("")
    click.echo(check_mod.table(rows))
    failed = [r for r in rows if not r.ok]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(rows)} checks failed")
    click.echo(f"\nall {len(rows)} checks passed")
