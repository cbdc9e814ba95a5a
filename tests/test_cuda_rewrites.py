"""backends/cuda_rewrites.py: the rewrites of TileLang's generated CUDA (CPU only; the compiled kernels' bits are
compared on the GPU in tests/test_tilelang.py::test_gpu_tree_max_gives_the_same_bits)."""

from __future__ import annotations

import math
import random
import re

import pytest

from slagen.backends import cuda_rewrites

CHAIN = """      #pragma unroll
      for (int i_7 = 0; i_7 < 2; ++i_7) {{
        {buf}[i_7] = -CUDART_INF_F;
        #pragma unroll
        for (int rv = 0; rv < {n}; ++rv) {{
          {buf}[i_7] = max({buf}[i_7], acc_s[((((rv & 7) * 4) + (i_7 * 2)) + (rv >> 3))]);
        }}
        {buf}[i_7] = tl::AllReduce<tl::MaxOp, 4, 1, 128, tl::NamedBarrier<256>>::run({buf}[i_7]);
      }}
"""


def run_tree(code: str, values, start: float):
    """Execute the rewritten statements of one row in Python (max as CUDA's fmaxf: a NaN operand is ignored)."""
    def fmax(a, b):
        return b if math.isnan(a) else a if math.isnan(b) else max(a, b)
    body = code[code.index("{ float tree_["):]
    n = int(re.match(r"\{ float tree_\[(\d+)\];", body).group(1))
    tree_ = list(values) + [None] * (n - len(values))
    for stmt in re.findall(r"tree_\[(\d+)\] = max\(tree_\[(\d+)\], tree_\[(\d+)\]\);", body):
        dst, a, b = map(int, stmt)
        tree_[dst] = fmax(tree_[a], tree_[b])
    last = re.search(r"row_max_tree\[i_7\] = max\(-CUDART_INF_F, tree_\[0\]\); \}", body)
    assert last, "the tree's result is not stored into the row max"
    return fmax(start, tree_[0])


@pytest.mark.parametrize("n", [16, 32])
def test_tree_max_turns_the_marked_chain_into_a_tree_of_the_same_max(n):
    code = CHAIN.format(buf=cuda_rewrites.TREE_BUFFER, n=n)
    out = cuda_rewrites.tree_max(code)
    assert f"max({cuda_rewrites.TREE_BUFFER}[i_7], acc_s" not in out, "the serial chain is still there"
    assert f"tree_[rv] = acc_s[((((rv & 7) * 4) + (i_7 * 2)) + (rv >> 3))];" in out, "values not loaded as before"
    assert out.count(" = max(tree_[") == n - 1                     # a tree: n - 1 maxima, log2 n levels
    assert "for (int half_" not in out and "AllReduce<tl::MaxOp" in out
    rng = random.Random(n)
    cases = [[rng.uniform(-50, 50) for _ in range(n)], [-math.inf] * n, [0.0, -0.0] * (n // 2),
             [-math.inf] * (n - 1) + [3.0], [math.nan] + [rng.uniform(-1, 1) for _ in range(n - 1)]]
    for values in cases:
        want = max((v for v in values if not math.isnan(v)), default=-math.inf)
        assert run_tree(out, values, -math.inf) == want, values
    assert run_tree(out, [math.nan] * n, -math.inf) == -math.inf      # all NaN: the chain's -inf start


def test_tree_max_leaves_unmarked_and_odd_chains_alone():
    plain = CHAIN.format(buf="row_max", n=16)
    assert cuda_rewrites.tree_max(plain) == plain
    odd = CHAIN.format(buf=cuda_rewrites.TREE_BUFFER, n=12)
    assert cuda_rewrites.tree_max(odd) == odd


def test_the_callback_runs_a_callback_registered_before_first():
    seen = []

    def previous(code, target):
        seen.append(target)
        return code.replace("row_max[", cuda_rewrites.TREE_BUFFER + "[")
    out = cuda_rewrites.chained(previous)(CHAIN.format(buf="row_max", n=16), "sm_90a")
    assert seen == ["sm_90a"] and "{ float tree_[16];" in out
    assert cuda_rewrites.chained(None)("int x;", "sm_90a") == "int x;"


def test_the_forward_template_marks_the_tree_with_the_rewrites_name():
    from slagen.codegen import TEMPLATE_DIR
    text = (TEMPLATE_DIR / "tilelang" / "forward.py.j2").read_text()
    assert text.count(f"{cuda_rewrites.TREE_BUFFER} = T.alloc_fragment(") == 2   # per-tile and persistent kernels
