"""ptxas's report on a generated TileLang kernel for sm_90a: registers per thread, spill bytes and performance
advisories — above all C7515, "wgmma.mma_async instructions are serialized", after which every wgmma waits for
the one before it (session 19: a forward step body with a run-time branch between its two score accumulators
was bit-identical and 28 % slower for it; docs/perf-notes.md).

TileLang runs nvcc without ptxas's verbose output, so :func:`report` compiles the kernel's CUDA source once more
with TileLang's own flags (C++20, its template and CUTLASS include dirs, fast math as slagen's pass configs ask)
plus ``-Xptxas -v``, to a throw-away cubin. A diagnostic for tests and tools/ptxas_report.py: no call runs it.
Needs nvcc and tilelang, no GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Tuple

ARCH = ("-gencode", "arch=compute_90a,code=sm_90a")


@dataclass(frozen=True)
class Report:
    """What ptxas said of one kernel: ``registers`` per thread at launch (the consumer warpgroups of a warp-
    specialised kernel raise theirs with setmaxnreg), ``spill_bytes`` (stores + loads), ``advisories``: its
    "Potential Performance Loss" lines (e.g. wgmma serialisation, C7515)."""
    registers: int
    spill_bytes: int
    advisories: Tuple[str, ...]

    @property
    def wgmma_serialized(self) -> bool:
        return any("C7515" in line or "wgmma.mma_async instructions are serialized" in line
                   for line in self.advisories)


def nvcc_command(source_path: str, cubin_path: str) -> list:
    """The nvcc command line that compiles ``source_path`` as TileLang does for sm_90a, ptxas verbose."""
    from tilelang.contrib import nvcc
    from tilelang.env import CUTLASS_INCLUDE_DIR, TILELANG_TEMPLATE_PATH
    return [nvcc.get_nvcc_compiler(), "--cubin", "-O3", *ARCH, "-std=c++20", f"-I{TILELANG_TEMPLATE_PATH}",
            f"-I{CUTLASS_INCLUDE_DIR}", "--use_fast_math", "-w", "-Xptxas", "-v", source_path, "-o", cubin_path]


def parse(output: str) -> Report:
    """A :class:`Report` from ptxas's verbose output for a source with one kernel."""
    used = re.findall(r"Used (\d+) registers", output)
    if len(used) != 1:
        raise ValueError(f"expected one kernel's 'Used N registers' line in ptxas's output, found {len(used)}")
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", output))
    advisories = tuple(line.split(":", 1)[1].strip() for line in output.splitlines()
                       if "Potential Performance Loss" in line)
    return Report(int(used[0]), spills, advisories)


def compile_cubin(kernel, directory: str) -> Tuple[str, str]:
    """Compile a TileLang kernel's CUDA source (anything with ``get_kernel_source()``) into
    ``directory``/kernel.cubin with :func:`nvcc_command`; returns (the cubin's path, nvcc's output)."""
    source, cubin = os.path.join(directory, "kernel.cu"), os.path.join(directory, "kernel.cubin")
    with open(source, "w") as f:
        f.write(kernel.get_kernel_source())
    done = subprocess.run(nvcc_command(source, cubin), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"nvcc failed on the kernel's source (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return cubin, done.stdout + done.stderr


def report(kernel) -> Report:
    """ptxas's :class:`Report` for a compiled TileLang kernel (anything with ``get_kernel_source()``)."""
    with tempfile.TemporaryDirectory(prefix="slagen-ptxas-") as tmp:
        return parse(compile_cubin(kernel, tmp)[1])
