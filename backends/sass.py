"""SASS-level views of a generated TileLang kernel: a check that register operands loaded once survive the key
loop, and the loop's instruction order.

The key loops copy a tile from shared memory into registers at step 0 (``T.copy`` under ``if t == 0``: an LDSM
block) and make it the register (A) operand of a wgmma in every step — the forward's Q (its S = QKᵀ), the dq
kernel's Q and dO (S and dP). Those registers must survive the loop's back-edge. Session 20 found ptxas breaking
that: in the d 64 dq kernel with ``row_regs`` it gave the registers of the step-0 copies to the dP accumulator
and the dS operand inside the loop, so from step 1 on S was computed from dS (a wrong dQ, bit-exact otherwise;
the PTX keeps them live). :func:`clobbered_operands` finds such a kernel from its disassembly: an LDSM-loaded
register that an RS wgmma (HGMMA with a register A operand) reads and any other instruction writes inside the
loop around that HGMMA. Needs nvcc, tilelang and nvdisasm (the ``nvidia-cuda-nvdisasm`` wheel, a test
dependency; or on PATH; or $SLAGEN_NVDISASM), no GPU. :func:`loop_schedule` summarises the main loop's order of
waits, branches, wgmmas and softmax instructions (tools/ptxas_report.py --schedule), :func:`loop_mix` counts its
instructions by opcode (--mix). Diagnostics for tests and tools: no call runs them.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from typing import List, Optional, Tuple

from slagen.backends import ptxas

_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_PRED = r"^\s*(?:@!?U?P\w+\s+)?"          # a line's indent and optional predicate (@P0, @!UP1, ...)
_WRITE = re.compile(_PRED + r"([A-Z][A-Za-z0-9_.]*)\s+R(\d+)\b")
_LDSM = re.compile(_PRED + r"LDSM\.\S*?\.(\d)\s+R(\d+),")
_RS_HGMMA = re.compile(r"^\s*HGMMA\.\S+\s+R\d+,\s+R(\d+),")
_NO_DEST = ("ST", "RED", "BRA", "BAR", "SYNCS", "EXIT", "RET", "CALL")


def nvdisasm_path() -> Optional[str]:
    """nvdisasm from $SLAGEN_NVDISASM, PATH or the ``nvidia-cuda-nvdisasm`` wheel, or None."""
    if os.environ.get("SLAGEN_NVDISASM"):
        return os.environ["SLAGEN_NVDISASM"]
    found = shutil.which("nvdisasm")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        hits = sorted(glob.glob(os.path.join(root, "*", "bin", "nvdisasm")))
        if hits:
            return hits[-1]
    return None


def disassemble(kernel) -> str:
    """The SASS of a compiled TileLang kernel, compiled as TileLang does (backends/ptxas.py) and disassembled."""
    tool = nvdisasm_path()
    if tool is None:
        raise RuntimeError("nvdisasm not found: pip install nvidia-cuda-nvdisasm, or set SLAGEN_NVDISASM")
    with tempfile.TemporaryDirectory(prefix="slagen-sass-") as tmp:
        cubin, _ = ptxas.compile_cubin(kernel, tmp)
        done = subprocess.run([tool, "-c", cubin], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nvdisasm failed (exit {done.returncode}): {done.stderr[-1000:]}")
        return done.stdout


def _written(line: str) -> range:
    """The registers an instruction writes (none for stores, branches and barriers): an HGMMA its fp32
    accumulator (N / 2 registers for 64xN), an LDSM .x2 / .x4 two / four, 64- / 128-bit results two / four."""
    m = _WRITE.match(line)
    if not m or m.group(1).startswith(_NO_DEST):
        return range(0)
    op, base = m.group(1), int(m.group(2))
    if op.startswith("HGMMA"):
        width = int(re.search(r"HGMMA\.64x(\d+)x", op).group(1)) // 2
    elif op.startswith("LDSM"):
        width = int(_LDSM.match(line).group(1))
    else:
        width = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1
    return range(base, base + width)


def _lines_and_loops(sass: str) -> Tuple[List[str], List[Tuple[int, int]]]:
    """The disassembly's lines (addresses stripped) and its loops as (label line, backward BRA line) spans."""
    lines = [re.sub(r"/\*[0-9a-f]+\*/", "", line).rstrip() for line in sass.splitlines()]
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    back_edges = [(labels[m.group(1)], i) for i, line in enumerate(lines)
                  if (m := _BRANCH.search(line)) and m.group(1) in labels and labels[m.group(1)] < i]
    return lines, back_edges


def clobbered_operands(sass: str) -> List[Tuple[int, str]]:
    """(register, the writing instruction) for each register an LDSM loads, an RS HGMMA reads as its A operand
    and another instruction writes inside the innermost loop (a backward BRA's span) around that HGMMA; empty
    for a kernel whose loaded operands survive its loops. Writes before or after the loop are fine."""
    lines, back_edges = _lines_and_loops(sass)
    loaded = {}
    for i, line in enumerate(lines):
        m = _LDSM.match(line)
        if m:
            loaded.setdefault(int(m.group(2)), []).append(i)
    found = []
    for i, line in enumerate(lines):
        m = _RS_HGMMA.match(line)
        if not m or int(m.group(1)) not in loaded:
            continue
        spans = [(start, end) for start, end in back_edges if start <= i <= end]
        if not spans:
            continue
        start, end = min(spans, key=lambda span: span[1] - span[0])
        regs = set(range(int(m.group(1)), int(m.group(1)) + 4))
        for j in range(start, end + 1):
            if j not in loaded.get(int(m.group(1)), []) and regs & set(_written(lines[j])):
                found.append((int(m.group(1)), lines[j].strip()))
                break
    return sorted(set(found))


# What loop_schedule names: mbarrier waits and releases, branches, wgmma issue and wait, and the softmax's
# long-latency or chained instructions; everything else is left out.
_SCHEDULE_OPS = (("SYNCS.PHASECHK", "WAIT"), ("SYNCS.ARRIVE", "ARRIVE"), ("WARPGROUP.DEPBAR", "DEPBAR"),
                 ("MUFU.EX2", "EX2"), ("FMNMX", "MAX"), ("SHFL", "SHFL"), ("F2FP", "F2FP"), ("BRA", "BRA"))


def _main_loop(sass: str) -> List[str]:
    """The lines of the kernel's main loop: the innermost loop around the most HGMMAs (the consumer's key loop);
    empty when no loop holds an HGMMA."""
    lines, loops = _lines_and_loops(sass)
    hgmma = [i for i, line in enumerate(lines) if re.match(_PRED + "HGMMA", line)]
    inner = [(start, end) for start, end in loops
             if not any(s2 > start and e2 < end for s2, e2 in loops if (s2, e2) != (start, end))]
    counted = [(sum(start <= i <= end for i in hgmma), start, end) for start, end in inner]
    count, start, end = max(counted, default=(0, 0, -1))
    return lines[start:end + 1] if count else []


def loop_mix(sass: str) -> List[Tuple[str, int]]:
    """The main loop's instructions counted by opcode (its name without modifiers; IMAD.MOV counted as MOV, the
    move idiom it is), most frequent first: what one pass over the loop body issues per warp (a step-0 block
    inside the body included). At the card's power limit a step's time follows what it issues, not only its
    critical path (docs/perf-notes.md, session 22). Empty when no loop holds an HGMMA."""
    counts: dict = {}
    for line in _main_loop(sass):
        m = re.match(_PRED + r"([A-Z][A-Z0-9_]*)(\.MOV\b)?", line)
        if m:
            op = "MOV" if m.group(1) == "IMAD" and m.group(2) else m.group(1)
            counts[op] = counts.get(op, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def loop_schedule(sass: str) -> str:
    """The order of the key instructions in the kernel's main loop, the innermost loop around the most HGMMAs
    (the consumer's key loop): waits on mbarriers (WAIT), branches (BRA: a wait's retry, a step-0 block),
    wgmma issues by shape (e.g. HGMMA64x64), their wait (DEPBAR), MUFU.EX2, FMNMX, SHFL, F2FP and the barrier
    releases (ARRIVE), runs written ``N×OP``. Where a block boundary (a BRA) falls decides what ptxas can move
    past it (session 21: the row max ahead of the K wait's branch hid that wait). Empty when no loop holds an
    HGMMA."""
    ops = []
    for line in _main_loop(sass):
        body = re.sub(_PRED, "", line)
        m = re.match(r"HGMMA\.(\d+x\d+)x", body)
        op = f"HGMMA{m.group(1)}" if m else next((name for prefix, name in _SCHEDULE_OPS
                                                   if body.startswith(prefix)), None)
        if op:
            ops.append(op)
    runs = []
    for op in ops:
        if runs and runs[-1][1] == op:
            runs[-1][0] += 1
        else:
            runs.append([1, op])
    return " ".join(f"{n}×{op}" if n > 1 else op for n, op in runs)
