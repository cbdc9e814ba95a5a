"""ptxas's view of the TileLang kernels of one spec under one or more configs, on a machine without a GPU
(nvcc and tilelang only): registers at launch, spill bytes, and whether any wgmma is serialised (ptxas's C7515
advisory; backends/ptxas.py). Run it on a loop variant before spending device time on it:

    python tools/ptxas_report.py                                   # d128, 128x64, softmax, marginal, defaults
    python tools/ptxas_report.py --fmap none --config '{}' --config '{"overlap": false}'
    python tools/ptxas_report.py --roles dq,dkdv --backward-config '{}' --backward-config '{"dq": {"tile_n": 128}}'
    python tools/ptxas_report.py --roles forward --config '{}' --config '{"overlap": false}' --schedule
    python tools/ptxas_report.py --roles forward --fmap none --mix

A kernel whose wgmma is serialised computes the same bits and runs slower (session 19: +28 % on the forward).
Where nvdisasm is found (backends/sass.py), a last column names the register operands copied in at step 0 that
ptxas reuses inside the key loop — different bits: a wrong result (session 20, the d 64 dq with row_regs).
With --schedule it also prints each kernel's main loop as the order of its waits, branches, wgmma issues and
waits and softmax instructions: what a block boundary (a wait's branch) keeps ptxas from moving (session 21).
With --mix it prints the main loop's instructions counted by opcode: what one pass over the loop body issues per
warp, which at the card's power limit sets a step's time as much as its critical path does (session 22).
"""

from __future__ import annotations

import argparse
import json

from slagen.backends import ptxas, sass
from slagen.backends import tilelang as tl_backend
from slagen.spec import KernelSpec

ROLES = ("forward", "forward-training", "forward-tail", "prepass", "dq", "dkdv")


FORWARD_ROLES = ("forward", "forward-training", "forward-tail", "prepass")


def forward_kernels(spec: KernelSpec, config: dict, roles):
    """(role, compiled kernel) of ``spec`` under the forward ``config`` for each forward role the spec has."""
    cfg = tl_backend._resolve_config(spec, config)
    linear = spec.feature_map is not None
    for role in roles:
        if role == "prepass" and linear:
            yield role, tl_backend.prepass_kernel(spec, cfg)
        elif role in ("forward", "forward-training"):
            yield role, tl_backend.forward_kernel(spec, cfg, save=role == "forward-training" and linear)
        elif role == "forward-tail" and cfg["tail_split"] > 1 and not cfg["persistent"]:
            yield role, tl_backend.forward_kernel(spec, cfg, tail=True)


def backward_kernels(spec: KernelSpec, backward_config: dict, roles):
    """(role, compiled kernel) of the TileLang backward's dq / dkdv under ``backward_config``."""
    bspec = spec.replace(role="backward")
    cfg = tl_backend._resolve_config(bspec, {"backward": "tilelang", **backward_config})
    for role in roles:
        if role in ("dq", "dkdv"):
            yield role, tl_backend.backward_kernel(bspec, cfg, role)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", default="128x64")
    ap.add_argument("--fmap", default="softmax", help="softmax, elu, relu or none (sparse-only)")
    ap.add_argument("--scope", default="marginal")
    ap.add_argument("--roles", default=",".join(ROLES), help=f"comma-separated, of {', '.join(ROLES)}")
    ap.add_argument("--config", action="append", default=[], help="a JSON forward config (repeatable; '{}': the "
                                                                   "defaults): the forward and pre-pass roles")
    ap.add_argument("--backward-config", action="append", default=[], help="a JSON backward config for the dq / "
                    "dkdv roles (repeatable; '{}': the defaults)")
    ap.add_argument("--schedule", action="store_true", help="after the table, each kernel's main-loop order of "
                    "waits, branches, wgmmas and softmax instructions (backends/sass.py loop_schedule; needs nvdisasm)")
    ap.add_argument("--mix", action="store_true", help="after the table, each kernel's main-loop instructions "
                    "counted by opcode (backends/sass.py loop_mix; needs nvdisasm)")
    args = ap.parse_args()
    bq, bk = (int(x) for x in args.block.split("x"))
    spec = KernelSpec(arch="sm90", head_dim=args.head_dim, block_q=bq, block_k=bk, scope=args.scope,
                      feature_map=None if args.fmap == "none" else args.fmap, dtype="bf16")
    roles = [r for r in args.roles.split(",") if r]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise SystemExit(f"--roles: unknown {unknown}; allowed: {', '.join(ROLES)}")
    check = sass.nvdisasm_path() is not None
    print(f"{spec.canonical}\n\n| config | kernel | registers | spill bytes | wgmma serialised | advisories |"
          + (" operands reused in the loop |\n|---|---|---|---|---|---|---|" if check else "\n|---|---|---|---|---|---|"))
    for flag in ("schedule", "mix"):
        if getattr(args, flag) and not check:
            raise SystemExit(f"--{flag} needs nvdisasm (pip install nvidia-cuda-nvdisasm, or set SLAGEN_NVDISASM)")
    runs = [(text, forward_kernels(spec, json.loads(text), roles)) for text in args.config or ["{}"]]
    if set(roles) - set(FORWARD_ROLES):     # the backward's kernels do not depend on --config: per backward config
        runs += [(text, backward_kernels(spec, json.loads(text), roles)) for text in args.backward_config or ["{}"]]
    schedules, mixes = [], []
    for text, kernels in runs:
        for role, kernel in kernels:
            rep = ptxas.report(kernel)
            row = (f"| `{text}` | {role} | {rep.registers} | {rep.spill_bytes} | "
                   f"{'YES' if rep.wgmma_serialized else 'no'} | {'; '.join(rep.advisories)[:120]} |")
            if check:
                code = sass.disassemble(kernel)
                reused = sass.clobbered_operands(code)
                row += f" {'YES: R' + ', R'.join(str(r) for r, _ in reused) if reused else 'none'} |"
                if args.schedule:
                    schedules.append(f"- `{text}` {role}: {sass.loop_schedule(code) or '(no loop with a wgmma)'}")
                if args.mix:
                    mix = sass.loop_mix(code)
                    counts = ", ".join(f"{n} {op}" for op, n in mix)
                    mixes.append(f"- `{text}` {role}: {sum(n for _, n in mix)}: {counts}" if mix
                                 else f"- `{text}` {role}: (no loop with a wgmma)")
            print(row, flush=True)
    if schedules:
        print("\nmain loop, in order (N×OP: a run of N):\n" + "\n".join(schedules))
    if mixes:
        print("\nmain loop, instructions per warp per pass by opcode (IMAD.MOV as MOV):\n" + "\n".join(mixes))


if __name__ == "__main__":
    main()
