# Sourced by tools/device_run.sh: the Triton candidates worth timing beside the defaults on an H100/H200 at
# the headline shape (`slagen tune --config`; each override is checked against the kernel's check_config and
# reported when it does not apply). Measured outcomes: docs/perf-notes.md.
TRITON_TUNE_ARGS=(
  --config '{"pre_stages": 3}' --config '{"pre_per_sm": 4}' --config '{"num_stages": 4}'
  --config '{"pre_warps": 4}' --config '{"epilogue": "fused"}' --config '{"tile_n": 128}'
  --config '{"dq": {"num_stages": 3}}' --config '{"dkdv": {"num_stages": 3}}'
  --config '{"dkdv": {"block_n": 32}}'
)
# The TileLang backend's candidates (its forward and backward roles; an override a role lacks is skipped):
# two selected key blocks per forward / dq step, and the Triton backward against the TileLang one.
TILELANG_TUNE_CANDIDATES=(
  --config '{"tile_n": 128}' --config '{"tile_n": 128, "num_stages": 3}' --config '{"backward": "triton"}'
  --config '{"dq": {"tile_n": 128}}'
)
