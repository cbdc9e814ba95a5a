#!/usr/bin/env bash
# A/B in one GPU call: tools/profile_sla.py on this tree ("new") and on a baseline tree ("base"), same card,
# same process setup, caches apart (METHOD.md: the baseline in the same run). Make the baseline tree first,
# here:   rm -rf .baselines/slagen_base && mkdir -p .baselines/slagen_base &&
#         git archive <commit> | tar -x -C .baselines/slagen_base
# and pass carry [".device", ".baselines"] to the device call.
#   PROFILE_ARGS   arguments of profile_sla.py (e.g. --only "marginal fwd")    BASE  the baseline tree
#   TL=1           unpack the TileLang bundle (.device/) first                 ROUNDS  base/new alternations (1)
set -u
OUT=${OUT:-/tmp/slagen-out}
BASE=${BASE:-.baselines/slagen_base}
mkdir -p "$OUT"
if [ "${TL:-0}" = 1 ]; then
  mkdir -p /tmp/site && tar xJf .device/tilelang-site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
fi
# Each side is installed before it runs (the base as a plain install, this tree editable: an editable
# install's import hook would shadow a baseline put on PYTHONPATH); this tree stays installed at the end.
for round in $(seq "${ROUNDS:-1}"); do
  for side in base new; do
    src=.; mode=-e
    [ "$side" = base ] && src=$BASE && mode=
    python3 -m pip install -q --no-deps --no-build-isolation --no-index $mode "$src" >>"$OUT/install.log" 2>&1 ||
      { tail -n 30 "$OUT/install.log"; exit 1; }
    SLAGEN_CACHE_DIR=/tmp/slagen-cache-$side timeout "${PROFILE_TIMEOUT:-300}" \
      python3 tools/profile_sla.py ${PROFILE_ARGS:-} >"$OUT/ab-$side-$round.log" 2>&1
    echo "== $side round $round: exit $?"
  done
done
for log in "$OUT"/ab-*.log; do
  echo; echo "======== $(basename "$log")"; grep -E '^\||^NVIDIA|Traceback|Error' "$log" | tail -n 30
done
