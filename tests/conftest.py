"""Test setup: without a GPU, Triton kernels run under its interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here, before the
test modules import slagen's generated kernels. Each test gets its own slagen cache dir.

The interpreter's tl.dot is numpy's matmul, and numpy's OpenBLAS picks its sgemm kernel by CPU: its FMA kernels
(Haswell, Zen: every recent x86-64) round a column differently by its place in the tile, so equal key blocks'
pooled scores stop tying exactly and the block map's exact-tie tests fail there (seen on an AMD EPYC, session
37). The Sandy Bridge kernel (AVX, no FMA) sums every column alike. OpenBLAS reads OPENBLAS_CORETYPE when it
loads, with numpy, which `import torch` imports: so it is set first.
"""

import os
import platform
import sys
import warnings

if platform.machine().lower() in ("x86_64", "amd64") and "OPENBLAS_CORETYPE" not in os.environ:
    if "numpy" in sys.modules:      # (a plugin imported it first: the interpreter's exact-tie tests may fail)
        warnings.warn("numpy was loaded before tests/conftest.py could set OPENBLAS_CORETYPE=Sandybridge")
    os.environ["OPENBLAS_CORETYPE"] = "Sandybridge"

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run with -m gpu on the device machine)")


@pytest.fixture(autouse=True, scope="session")
def _session_cache_dir(tmp_path_factory):
    """Generated kernels of the whole session (of each pytest-xdist worker) go to one fresh cache dir, not the
    user's."""
    path = tmp_path_factory.mktemp("slagen-cache")
    old = os.environ.get("SLAGEN_CACHE_DIR")
    os.environ["SLAGEN_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SLAGEN_CACHE_DIR", None)
    else:
        os.environ["SLAGEN_CACHE_DIR"] = old
