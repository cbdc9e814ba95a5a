import pytest

from slagen.spec import KernelSpec, parse_arch, parse_dtype


@pytest.mark.parametrize("text", ["sm90", "sm_90a", "9.0", "9.0a", "SM90", 90, (9, 0), "compute_90"])
def test_arch_spellings(text):
    assert parse_arch(text) == "sm90"


@pytest.mark.parametrize("text,want", [("bf16", "bf16"), ("bfloat16", "bf16"), ("float16", "fp16"),
                                       ("torch.float32", "fp32")])
def test_dtype_spellings(text, want):
    assert parse_dtype(text) == want


def test_canonical_hash_and_round_trip():
    spec = KernelSpec(arch="9.0a", head_dim=64, block_q=128, block_k=64, feature_map="elu", scope="marginal",
                      has_negligible=True, dtype="float16", role="backward")
    assert spec.canonical == "backward_sm90_d64_b128x64_elu_marginal_negl_fp16"
    assert KernelSpec.from_canonical(spec.canonical) == spec
    assert hash(spec) == hash(KernelSpec.from_canonical(spec.canonical))
    assert len(spec.short_hash) == 12 and spec.short_hash != spec.replace(dtype="bf16").short_hash
    assert spec.uri("triton").startswith("triton_backward_sm90")
    sparse = KernelSpec(feature_map="none")
    assert sparse.feature_map is None and "_none_" in sparse.canonical


def test_spec_is_frozen():
    with pytest.raises(Exception):
        KernelSpec().head_dim = 64


@pytest.mark.parametrize("field,value,words", [
    ("arch", "sm75", "allowed: sm80, sm86, sm89, sm90"),
    ("head_dim", 96, "head_dim=96 is not supported; allowed: 16, 32, 64, 128, 256"),
    ("block_q", 48, "block_q=48"),
    ("block_k", True, "block_k=True"),
    ("feature_map", "hedgehog", "allowed: softmax, elu, relu"),
    ("scope", "complement", "allowed: marginal, all"),
    ("dtype", "int8", "allowed: bf16, fp16, fp32"),
    ("role", "bwd", "allowed: block_map, forward, backward"),
    ("has_negligible", 1, "has_negligible=1"),
])
def test_errors_name_field_value_and_allowed(field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        KernelSpec(**{field: value})


def test_fields_that_do_not_change_the_computation_are_normalised():
    base = dict(arch="sm90", head_dim=128, block_q=128, block_k=64)
    assert KernelSpec(**base, scope="all", has_negligible=True).has_negligible is False
    assert KernelSpec(**base, feature_map=None, scope="all", has_negligible=True) == KernelSpec(**base, feature_map=None)
    block_map = KernelSpec(**base, feature_map="elu", scope="all", has_negligible=True, role="block_map")
    assert (block_map.feature_map, block_map.scope, block_map.has_negligible) == (None, "marginal", True)
    assert KernelSpec(**base, scope="marginal", has_negligible=True).has_negligible is True


def test_memoised_constructor_returns_one_validated_spec():
    a = KernelSpec.of(arch="sm_90a", head_dim=128, block_q=128, block_k=64, has_negligible=True)
    assert a == KernelSpec(arch="sm90", head_dim=128, block_q=128, block_k=64, has_negligible=True)
    assert KernelSpec.of(arch="sm_90a", head_dim=128, block_q=128, block_k=64, has_negligible=True) is a
    with pytest.raises(ValueError, match="has_negligible=1"):     # 1 == True, but not a valid spelling
        KernelSpec.of(arch="sm_90a", head_dim=128, block_q=128, block_k=64, has_negligible=1)
    with pytest.raises(ValueError, match="head_dim=96"):
        KernelSpec.of(head_dim=96)
