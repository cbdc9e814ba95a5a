"""Test setup: without a GPU, Triton kernels run under its interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here, before the
test modules import slagen's generated kernels. Each test gets its own slagen cache dir.
"""

import os

import pytest
import torch

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
