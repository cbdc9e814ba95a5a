#!/usr/bin/env bash
# Session 8, call 2 (one-off): GPU tests of the new paths, then tunes, profile, memory.
set -u
export TL=1 TEST_TIMEOUT=230 TUNE_TIMEOUT=200 MEMORY_TIMEOUT=70 TRITON_ROLES=
STEPS=tests TEST_ARGS="tests/test_tilelang.py -rfE" TEST_K="gpu_backward;prepass or pre_warps or pre_tile;overlap" \
  bash tools/device_run.sh >/dev/null 2>&1
OV=""
if grep -q " passed" "$OUT/tests-3.log" && ! grep -qE "failed|rror|Timeout" "$OUT/tests-3.log"; then
  OV='--config {"overlap":true} --config {"overlap":true,"tile_n":128}'
fi
E='"lin_init":true,"tma_store":true'
export TILELANG_TUNE_ARGS="--config {\"tile_n\":128} $OV --config {\"dq\":{$E},\"dkdv\":{$E}} --config {\"dq\":{\"tma_store\":true},\"dkdv\":{\"tma_store\":true}} --config {\"dq\":{\"lin_init\":true},\"dkdv\":{\"lin_init\":true}}"
echo "tune args: $TILELANG_TUNE_ARGS" >"$OUT/tuneargs.txt"
STEPS="tune" bash tools/device_run.sh >/dev/null 2>&1
export PYTHONPATH=/tmp/site SLAGEN_CACHE_DIR=/tmp/slagen-cache
timeout 100 python3 tools/profile_sla.py --backend tilelang --only marginal,sparse-only --cprofile 30 \
  --cprofile-case "SLA marginal fwd+bwd" >"$OUT/profile.log" 2>&1
echo "== profile: exit $?" >>"$OUT/steps.txt"
timeout 70 python3 tools/backward_memory.py --budgets 0 >"$OUT/memory.log" 2>&1
echo "== memory: exit $?" >>"$OUT/steps.txt"
cat "$OUT/steps.txt" "$OUT/tuneargs.txt"; cat "$OUT/tests.log"; tail -40 "$OUT/tune.log"
grep -A30 "^NVIDIA" "$OUT/profile.log"; tail -6 "$OUT/memory.log"
