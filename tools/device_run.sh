#!/usr/bin/env bash
# One call on the GPU machine: install slagen, check every backend against the reference, benchmark,
# and (with GPU_TESTS=1) run the gpu-marked tests. Logs and tables go to $OUT; the tables print last.
#   STEPS="check bench tests blockmap profile tune"  which steps   TL=1  unpack the TileLang bundle (.device/)
#   (profile: tools/profile_sla.py, host vs GPU time per call; tune: `slagen tune` for the triton forward and
#    backward with the candidates of tools/tune_candidates.sh (or TRITON_TUNE_ARGS_TEXT="--limit 8"), the
#    tilelang forward and backward with its candidates there (or TILELANG_TUNE_ARGS, e.g. "--limit 3"), then
#    a second process that must find the tuned configs; steps after it (bench) use the tuned configs)
#   (memory: tools/backward_memory.py, f+b peak memory and time per head-group budget, MEMORY_ARGS)
#   (blockmap: tools/bench_blockmap.py, launch by launch; BLOCKMAP_ARGS e.g. "--baseline .baselines/bm_old"
#    after `python tools/bench_blockmap.py --export-baseline d186c39 .baselines/bm_old` here, carried along)
#   TRITON_ROLES / TILELANG_ROLES (default forward,backward): the roles the tune step tunes per backend
#     (set to the empty string to skip that backend)
#   CHECK_ARGS, BENCH_ARGS, TEST_ARGS                  extra arguments for each step; TEST_K: pytest -k expression
#   (CHECK_TIMEOUT / BENCH_TIMEOUT: SIGTERM, then SIGKILL 20 s later — a process inside a CUDA call or a compile
#    does not see SIGTERM, and session 40 lost a whole device call to a bench that outlived its `timeout`)
#   (TEST_K with ';' between expressions: one pytest process per expression, run concurrently — the TileLang
#    GPU tests are bound by single-threaded kernel compiles; or TEST_IDS=<file of node ids, one per line> with
#    TEST_GROUPS=N (default 12): N processes, each a contiguous chunk of the list. Each process has its own copy
#    of the cache built so far ($SLAGEN_CACHE_DIR-tests-N; `slagen build` first saves every process that
#    compile); its log goes to $LOGS/tests-N.log and tests.log in $OUT sums up: summary and failure lines of
#    each, or how far a process killed at TEST_TIMEOUT got)
#   The device tool brings back at most 8 files from $OUT: only the steps' logs and tables go there (the
#   install log and per-process test logs stay in $LOGS, default /tmp/slagen-logs, printed on failure).
set -u
source "$(dirname "$0")/tune_candidates.sh"
[ -n "${TRITON_TUNE_ARGS_TEXT:-}" ] && read -r -a TRITON_TUNE_ARGS <<<"$TRITON_TUNE_ARGS_TEXT"
OUT=${OUT:-/tmp/slagen-out}
LOGS=${LOGS:-/tmp/slagen-logs}
mkdir -p "$OUT" "$LOGS"
STEPS=${STEPS:-"check bench"}
if [ "${TL:-0}" = 1 ]; then
  mkdir -p /tmp/site && tar xJf .device/tilelang-site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$LOGS/install.log" 2>&1 || {
  cat "$LOGS/install.log"; exit 1; }
export SLAGEN_CACHE_DIR=${SLAGEN_CACHE_DIR:-/tmp/slagen-cache}
slagen info 2>&1 | tee "$LOGS/info.txt"
summarize_tests() {   # a pytest -q log: its summary and failure lines, or (cut by the timeout) how far it got
  if grep -qE "[0-9]+ (passed|failed|skipped|errors?)\b" "$1"; then
    grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|errors?)\b" "$1"
  else
    local progress; progress=$(grep -E '^[.FEsx]+( |$)' "$1" | cut -d' ' -f1 | tr -d '\n')
    echo "(cut by the timeout: ${#progress} tests done, $(tr -cd 'FE' <<<"$progress" | wc -c) failed or errors)"
  fi
}
refs=""
for d in .baselines/sla_main .baselines/sla_1; do
  [ -d "$d" ] && refs="$refs --reference-sla $(basename "$d")=$d"
done
for step in $STEPS; do
  start=$(date +%s)
  case $step in
    check) timeout -k 20 "${CHECK_TIMEOUT:-240}" slagen check --seq-len 32760 --heads 2 ${CHECK_ARGS:-} >"$OUT/check.log" 2>&1 ;;
    bench) timeout -k 20 "${BENCH_TIMEOUT:-400}" slagen bench --json "$OUT/bench.json" $refs ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1 ;;
    tests) rm -rf "$LOGS/groups"; mkdir -p "$LOGS/groups"
           if [ -n "${TEST_IDS:-}" ]; then      # node ids: TEST_GROUPS contiguous chunks (neighbours share kernels)
             n_ids=$(grep -c . "$TEST_IDS"); groups=${TEST_GROUPS:-12}
             grep . "$TEST_IDS" | split -l $(( (n_ids + groups - 1) / groups )) -d -a 3 - "$LOGS/groups/g"
           elif [[ "${TEST_K:-}" == *";"* ]]; then
             IFS=';' read -r -a exprs <<<"$TEST_K"; n=0
             for e in "${exprs[@]}"; do         # one argument per line: -k, the expression, TEST_ARGS' words
               n=$((n + 1)); printf '%s\n' -k "$e" ${TEST_ARGS:-tests} >"$LOGS/groups/g$(printf %03d $n)"
             done
           fi
           if compgen -G "$LOGS/groups/g*" >/dev/null; then
             n=0
             for f in "$LOGS"/groups/g*; do    # each its own process and a copy of the cache built so far
               n=$((n + 1)); mapfile -t args <"$f"; cache="$SLAGEN_CACHE_DIR-tests-$n"
               rm -rf "$cache"; if [ -d "$SLAGEN_CACHE_DIR" ]; then cp -r "$SLAGEN_CACHE_DIR" "$cache"; fi
               SLAGEN_CACHE_DIR="$cache" timeout -s KILL "${TEST_TIMEOUT:-400}" \
                 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE "${args[@]}" >"$LOGS/tests-$n.log" 2>&1 &
             done
             wait
             i=0
             for f in "$LOGS"/groups/g*; do    # (a process cut by the timeout leaves only its progress characters)
               i=$((i + 1)); echo "-- group $i ($(wc -l <"$f") lines): $(head -c 150 "$f" | tr '\n' ' ')"
               summarize_tests "$LOGS/tests-$i.log"; echo
             done >"$OUT/tests.log"
           else
             timeout -s KILL "${TEST_TIMEOUT:-400}" python3 -m pytest -m gpu -q -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} ${TEST_ARGS:-tests} >"$OUT/tests.log" 2>&1
           fi ;;
    profile) timeout "${PROFILE_TIMEOUT:-200}" python3 tools/profile_sla.py ${PROFILE_ARGS:-} >"$OUT/profile.log" 2>&1 ;;
    tune) ( if [ -n "${TRITON_ROLES-forward,backward}" ]; then
              timeout "${TUNE_TIMEOUT:-300}" slagen tune --backend triton --role "${TRITON_ROLES:-forward,backward}" "${TRITON_TUNE_ARGS[@]}" || exit 1; fi
            if [ -n "${TILELANG_ROLES-forward,backward}" ]; then
              timeout "${TUNE_TIMEOUT:-300}" slagen tune --backend tilelang --role "${TILELANG_ROLES:-forward,backward}" ${TILELANG_TUNE_ARGS:-"${TILELANG_TUNE_CANDIDATES[@]}"} || exit 1; fi
            slagen cache ls && python3 tools/tuned_lookup.py ) >"$OUT/tune.log" 2>&1 ;;
    blockmap) timeout "${BLOCKMAP_TIMEOUT:-200}" python3 tools/bench_blockmap.py --json "$OUT/blockmap.json" ${BLOCKMAP_ARGS:-} >"$OUT/blockmap.log" 2>&1 ;;
    memory) timeout "${MEMORY_TIMEOUT:-200}" python3 tools/backward_memory.py ${MEMORY_ARGS:-} >"$OUT/memory.log" 2>&1 ;;
  esac
  echo "== $step: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
done
for step in $STEPS; do
  echo; echo "======== $step"; tail -n 60 "$OUT/$step.log"
done
