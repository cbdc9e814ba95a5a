"""The tuner: time each candidate config on real inputs, check it against the reference, keep the best.

Backend-agnostic: a *problem* gives ``run(config) -> output`` and ``check(output) -> None`` (raises on a
wrong result); the tuner never lets a failing or wrong candidate win, and reports why each one lost.

Where the problem gives a ``compile(config)`` that builds a candidate's kernels without running them (TileLang:
lowering + nvcc, seconds per kernel), all candidates first compile on ``jobs`` threads; running, checking and
timing then happen one candidate at a time, and only what fails there counts.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence


@dataclasses.dataclass
class Outcome:
    config: dict
    time_ms: Optional[float] = None
    error: Optional[str] = None


@dataclasses.dataclass
class TuneResult:
    best: dict
    best_ms: float
    default_ms: float
    outcomes: List[Outcome]

    @property
    def speedup(self) -> float:
        return self.default_ms / self.best_ms if self.best_ms else 1.0

    @property
    def failures(self) -> List[Outcome]:
        return [o for o in self.outcomes if o.error]


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def compile_all(configs: List[dict], compile: Callable[[dict], object], jobs: int) -> None:
    """Compile every config on ``jobs`` threads. Errors are not verdicts here: tune() runs each candidate
    afterwards (a failed compile fails again there, and is reported with the others)."""
    def attempt(cfg):
        try:
            compile(cfg)
        except Exception:   # noqa: BLE001 - see the docstring
            pass
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(attempt, configs))


def tune(configs: List[dict], run: Callable[[dict], object], check: Callable[[object], None],
         time_ms: Callable[[Callable[[], object]], float],
         progress: Optional[Callable[[int, Outcome], None]] = None,
         compile: Optional[Callable[[dict], object]] = None, jobs: int = 1, rounds: int = 1) -> TuneResult:
    """Try ``configs`` (the first is the default); return the fastest correct one.

    compile, jobs: with a compile-only callable and jobs > 1, every candidate compiles on that many threads
    before they run one by one. rounds > 1 times the correct candidates again, in turn, rounds - 1 more times
    and keeps each one's median, each round starting one candidate further on (:func:`rotation`): on the H200
    the same kernel measured 12 % slower timed after three others (session 12) and 9 % apart by its place in
    the round (session 13), which would otherwise favour the candidates timed first — the default among them.
    progress is called after each candidate's first round. Raises RuntimeError if the default config itself
    fails (then nothing is trustworthy).
    """
    if compile is not None and jobs > 1:
        compile_all(configs, compile, jobs)
    outcomes = []
    for i, cfg in enumerate(configs):
        outcome = Outcome(cfg)
        try:
            check(run(cfg))                        # compiles on first run; wrong results never win
            outcome.time_ms = float(time_ms(lambda cfg=cfg: run(cfg)))
        except Exception as err:                   # skip and report: one bad candidate is not fatal
            outcome.error = _error(err)
        outcomes.append(outcome)
        if progress:
            progress(i, outcome)
    if outcomes[0].error:
        raise RuntimeError(f"the default config {configs[0]} failed: {outcomes[0].error}")
    timed = [o for o in outcomes if o.time_ms is not None]
    samples = {id(o): [o.time_ms] for o in timed}
    for r in range(1, rounds):
        for o in rotation(timed, r):
            samples[id(o)].append(float(time_ms(lambda cfg=o.config: run(cfg))))
    for o in timed:
        o.time_ms = statistics.median(samples[id(o)])
    best = min((o for o in outcomes if o.time_ms is not None), key=lambda o: o.time_ms)
    return TuneResult(best=best.config, best_ms=best.time_ms, default_ms=outcomes[0].time_ms,
                      outcomes=outcomes)


def rotation(items: Sequence, r: int) -> list:
    """``items`` in round ``r``'s order: rotated to start at item r mod len, so every item leads a round in turn.
    Repeated timings run their rounds in these orders: on the H200 a kernel timed first in a round, right after
    another one, measured up to 9 % faster than the same kernel timed second (session 13)."""
    items = list(items)
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def record(spec_name: str, backend: str, gpu: str, arch: str, bucket: str, result: TuneResult,
           meta: dict) -> dict:
    """The tuning record of a result (see slagen.autotune.records)."""
    return {"spec": spec_name, "backend": backend, "gpu": gpu, "arch": arch, "bucket": bucket,
            "config": result.best, "time_ms": result.best_ms, "default_ms": result.default_ms,
            "created": time.time(), "meta": meta}
