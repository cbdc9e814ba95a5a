"""Cross-backend correctness on this machine (`slagen check`).

Every available backend against the PyTorch reference (fp32, from the same inputs), forward and every
gradient (q, k, v, proj weight, proj bias), on fresh random inputs with outputs checked for NaN/Inf.
Relative error ‖out − ref‖ / ‖ref‖ against a threshold that fits the dtype. Where no kernel backend
can run (a CPU-only machine), the reference itself is checked in float32 against float64. Each backend's
call without a block map (it builds its own, as a model calls it; the TileLang backend pools in its linear
pre-pass then) must also give, bit for bit, the output of the call given ``slagen.block_map(q, k)``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, List, Optional, Sequence

import torch

import slagen
from slagen import backends

THRESHOLD = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}
CASES = [  # (feature_map, scope, negligible)
    ("softmax", "marginal", 0.0), ("softmax", "all", 0.0), ("softmax", "marginal", 0.1),
    ("elu", "marginal", 0.0), ("relu", "all", 0.1), (None, "marginal", 0.0),
]


@dataclasses.dataclass
class Row:
    backend: str
    case: str
    errors: dict
    threshold: float
    note: str = ""
    own_map: Optional[bool] = None   # the call building its own map gave the same bits as the one given it

    @property
    def ok(self) -> bool:
        return not self.note and self.own_map is not False and all(e <= self.threshold for e in self.errors.values())


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def available(device: torch.device, dtype: torch.dtype) -> List[str]:
    """Backends (besides the reference) that serve a default call here."""
    from slagen.dispatch import spec_for
    spec, _ = spec_for(device, dtype, head_dim=64, block_q=64, block_k=64)
    if spec is None:
        return []
    return [n for n in backends.NAMES if n != "torch" and backends.get(n).unavailable_reason(device, spec) is None]


def run(*, backend_names: Optional[Sequence[str]] = None, seq_len: int = 4096, head_dim: int = 128, heads: int = 2,
        batch: int = 1, dtype: torch.dtype = torch.bfloat16, topk: float = 0.05, block_q: int = 128,
        block_k: int = 64, device: Optional[torch.device] = None,
        echo: Callable[[str], None] = print) -> List[Row]:
    """Check each backend on each of CASES; returns one Row per (backend, case)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = list(backend_names) if backend_names else available(device, dtype)
    rows = []
    for name, (fmap, scope, negl) in itertools.product(names, CASES):
        case = f"{fmap or 'sparse-only'}/{scope}/negl={negl}"
        gen = torch.Generator(device=device).manual_seed(len(rows) + 1)
        shape = (batch, heads, seq_len, head_dim)
        q, k, v, do = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))
        w = b = None
        if fmap is not None:
            w = torch.randn(head_dim, head_dim, device=device, generator=gen) / head_dim ** 0.5
            b = torch.randn(head_dim, device=device, generator=gen) * 0.1
        args = dict(feature_map=fmap, scope=scope, block_q=block_q, block_k=block_k)
        try:
            bmap = slagen.block_map(q, k, topk=topk, negligible=negl, block_q=block_q, block_k=block_k, backend=name)
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v) + ((w, b) if w is not None else ())]
            extra = dict(proj_weight=leaves[3], proj_bias=leaves[4]) if w is not None else {}
            out = slagen.attention(*leaves[:3], block_map=bmap, backend=name, **args, **extra)
            own = slagen.attention(*leaves[:3], topk=topk, negligible=negl, backend=name, **args, **extra)
            same = torch.equal(own, out)
            del own
            grads = torch.autograd.grad(out, leaves, do)
            ref_dtype = torch.float64 if name == "torch" else torch.float32
            ref_leaves = [t.detach().to(ref_dtype).requires_grad_(True) for t in leaves]
            ref_extra = dict(proj_weight=ref_leaves[3], proj_bias=ref_leaves[4]) if w is not None else {}
            ref_map = slagen.BlockMap(*bmap.tensors(), block_q=block_q, block_k=block_k)
            ref = slagen.attention(*ref_leaves[:3], block_map=ref_map, backend="torch", **args, **ref_extra)
            ref_grads = torch.autograd.grad(ref, ref_leaves, do.to(ref_dtype))
            names_ = ["out", "dq", "dk", "dv", "dW", "db"][:1 + len(leaves)]
            errors = dict(zip(names_, [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]))
            row = Row(name, case, errors, THRESHOLD[dtype], own_map=same)
        except Exception as err:  # report and go on: one failing case must not hide the others
            row = Row(name, case, {}, THRESHOLD[dtype], note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        rows.append(row)
        worst = max(row.errors.values()) if row.errors else float("nan")
        own_map = {None: "", True: "own map = given", False: "own map != given"}[row.own_map]
        echo(f"  {name:<9} {case:<28} worst {worst:.2e} {own_map:<16} {'ok' if row.ok else 'FAIL'} {row.note}")
        del q, k, v, do
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: List[Row]) -> str:
    lines = ["| backend | case | out | dq | dk | dv | dW | db | own map = given | threshold | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        errs = [f"{r.errors[k]:.1e}" if k in r.errors else "" for k in ("out", "dq", "dk", "dv", "dW", "db")]
        own = {None: "", True: "yes", False: "NO"}[r.own_map]
        lines.append(f"| {r.backend} | {r.case} | {' | '.join(errs)} | {own} | {r.threshold:g} | "
                     f"{'pass' if r.ok else 'FAIL ' + r.note} |")
    return "\n".join(lines)
