"""slagen.backends.plans: per-call plans keyed by argument layouts (CPU)."""

import pytest
import torch

from slagen.backends import plans


def test_layout_is_what_a_kernel_call_depends_on():
    x = torch.zeros(2, 3, 8, 16)
    assert plans.layout(None) is None
    assert plans.layout(x) == ((2, 3, 8, 16), x.stride(), torch.float32, x.device, True)
    assert plans.layout(x.transpose(1, 2)) != plans.layout(x.transpose(1, 2).contiguous())   # strides
    flat = x.view(-1)
    assert plans.layout(flat[4:20])[-1] and not plans.layout(flat[1:17])[-1]     # 16-byte alignment


def test_plans_are_built_once_per_key_and_malformed_arguments_every_time():
    built = []
    cache = plans.Plans(bound=2)

    def build(key):
        built.append(key)
        if key is None:
            raise ValueError("x must be a tensor")
        return object()

    first = cache.get(lambda: ("a",), build)
    assert cache.get(lambda: ("a",), build) is first and built == [("a",)]
    for _ in range(2):   # a key that cannot be formed (here: an unhashable part) is never kept
        with pytest.raises(ValueError, match="must be a tensor"):
            cache.get(lambda: ({},), build)
    assert built == [("a",), None, None]
    cache.get(lambda: ("b",), build)
    cache.get(lambda: ("c",), build)          # over the bound: the memo starts again
    assert cache.get(lambda: ("a",), build) is not first


def test_config_keys_follow_the_tuning_memo():
    from slagen.autotune import select
    tuned = plans.config_key(plans.TUNED)
    assert plans.config_key(None) is None and plans.config_key({"b": 1, "a": 2}) == (("a", 2), ("b", 1))
    select.forget()
    assert plans.config_key(plans.TUNED) != tuned
