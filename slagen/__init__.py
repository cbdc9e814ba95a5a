"""slagen: generated Sparse-Linear Attention (SLA, arXiv 2509.24006) kernels behind one PyTorch API."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("slagen")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from slagen.spec import KernelSpec  # noqa: E402
from slagen.blockmap import BlockMap  # noqa: E402
from slagen.api import attention, block_map  # noqa: E402
from slagen.module import SparseLinearAttention  # noqa: E402

__all__ = ["attention", "block_map", "BlockMap", "KernelSpec", "SparseLinearAttention", "__version__"]
