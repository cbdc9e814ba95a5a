"""Rewrites of TileLang's generated CUDA source, applied through TileLang's CUDA post-processing callback.

Each rewrite matches only code that a template marked by a buffer name, so the TIR (and TileLang's cache key)
of a kernel that asks for a rewrite differs from one that does not, and no other kernel's source is touched.
TileLang's disk cache is keyed by the TIR, not by this module: a change to a rewrite's output must rename its
marker (here and in the templates), or a cache filled before would keep serving the old code.

- ``tree_max``: a fragment row max that TileLang lowers as one serial chain per row,
      row_max_tree[i] = -inf;  for (v < N) row_max_tree[i] = max(row_max_tree[i], <value v>);
  becomes a pairwise tree over the N values (depth log2 N instead of N dependent FMNMX). Max is exact in any
  order, so the result has the same bits (ncu, session 40: the forward's two 16-deep chains were 11 % of its
  consumer loop's samples).
"""

from __future__ import annotations

import re
import threading

TREE_BUFFER = "row_max_tree"       # the template's name for a row max to be reduced as a tree

_SERIAL_MAX = re.compile(
    r"(?P<dst>" + TREE_BUFFER + r"\[\w+\]) = -CUDART_INF_F;\s*"
    r"#pragma unroll\s*"
    r"for \(int (?P<v>\w+) = 0; (?P=v) < (?P<n>\d+); \+\+(?P=v)\) \{\s*"
    r"(?P=dst) = max\((?P=dst), (?P<src>[^;]+)\);\s*\}")


def tree_max(code: str) -> str:
    """``code`` with each serial row max over ``row_max_tree`` rewritten as a pairwise tree (N a power of two)."""
    def tree(match: re.Match) -> str:
        n, v, dst, src = int(match["n"]), match["v"], match["dst"], match["src"]
        if n & (n - 1):
            return match[0]
        lines = [f"{{ float tree_[{n}];", "#pragma unroll",
                 f"for (int {v} = 0; {v} < {n}; ++{v}) {{ tree_[{v}] = {src}; }}"]
        half = n // 2
        while half:        # written out level by level: no loop left for nvcc to keep
            lines += [f"tree_[{j}] = max(tree_[{j}], tree_[{j + half}]);" for j in range(half)]
            half //= 2
        lines.append(f"{dst} = max(-CUDART_INF_F, tree_[0]); }}")    # (the chain's start: all NaN gives -inf)
        return "\n".join(lines)
    return _SERIAL_MAX.sub(tree, code)


def chained(previous):
    """The post-processing callback slagen installs: ``previous`` (a callback registered before, or None) first,
    then the rewrites."""
    def postproc(code, target):
        return tree_max(previous(code, target) if previous is not None else code)
    return postproc


_REGISTERED = False
_LOCK = threading.Lock()


def register() -> None:
    """Install the rewrites as TileLang's CUDA post-processing callback (once per process), after any callback
    registered before (code without the marked buffers passes through unchanged)."""
    global _REGISTERED
    with _LOCK:
        if _REGISTERED:
            return
        import tvm_ffi
        from tilelang.engine.callback import register_cuda_postproc
        register_cuda_postproc(chained(tvm_ffi.get_global_func("tilelang_callback_cuda_postproc", allow_missing=True)))
        _REGISTERED = True
