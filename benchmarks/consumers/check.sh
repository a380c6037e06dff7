#!/bin/bash
# The consumers check: export the demo run's weights (plain, under a capped token budget, and as
# a schedule) and load every file through each consumer's own code, in one venv per consumer
# (their pins conflict), asserting the weights that reach it equal the achievable ones to 1e-9.
#
#   bash benchmarks/consumers/check.sh [CONSUMER ...]     (default: every consumer in consumers.txt)
#
# CONSUMERS_CACHE   where the venvs live (default ~/.cache/chameleon_ext/consumers); reused while
#                   their requirement line is unchanged
# CHAMELEON_PYTHON  the Python with chameleon_ext's dependencies (default .venv/bin/python)
# INSTALL_TIMEOUT   seconds per venv install (default 600); a consumer that does not install in
#                   time is reported as skipped, with its log
# TORCHTITAN_SRC    a checkout of TorchTitan main (its Grain data stack is not on PyPI); unset:
#                   that row is skipped (TORCHTITAN_REV: its commit, for the table)
# NANOTRON_SRC      a checkout of nanotron to check instead of its 0.4 wheel (which fails on import)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/benchmarks/consumers
CACHE=${CONSUMERS_CACHE:-$HOME/.cache/chameleon_ext/consumers}
PY=${CHAMELEON_PYTHON:-$ROOT/.venv/bin/python}
BASE_PY=${BASE_PYTHON:-python3.11}
LIMIT=${INSTALL_TIMEOUT:-600}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CACHE"

PYTHONPATH=$ROOT "$PY" "$HERE/make_exports.py" "$WORK" ${CHAMELEON_WEIGHTS:-} || exit 2

# Consumers whose released package cannot take part, with the reason (checked, not assumed,
# where an install can show it).
declare -A REASON=(
  [levanter]="PyPI's levanter (1.1, 2023) predates data mixtures; train_weights schedules are in its git main (not on PyPI)"
)

status=0
results=()
while read -r name reqs; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  if (($#)) && [[ ! " $* " =~ " $name " ]]; then continue; fi
  venv=$CACHE/$name
  stamp=$(echo "$reqs" | sha256sum | cut -c1-16)
  if [[ ! -f $venv/.ok-$stamp ]]; then
    rm -rf "$venv"
    "$BASE_PY" -m venv "$venv"
    if ! timeout "$LIMIT" nice "$venv/bin/pip" install -q $reqs > "$CACHE/$name.log" 2>&1; then
      results+=("{\"consumer\": \"$name\", \"version\": \"$reqs\", \"result\": \"skipped\", \"detail\": \"install failed or took over ${LIMIT}s (see $CACHE/$name.log)${REASON[$name]:+; ${REASON[$name]}}\"}")
      continue
    fi
    touch "$venv/.ok-$stamp"
  fi
  if [[ -n "${REASON[$name]:-}" ]]; then
    results+=("{\"consumer\": \"$name\", \"version\": \"$reqs\", \"result\": \"skipped\", \"detail\": \"${REASON[$name]}\"}")
    continue
  fi
  checker=$HERE/check_${name//-/_}.py
  line=$(cd "$HERE" && timeout 300 nice "$venv/bin/python" "$checker" "$WORK" 2>"$WORK/$name.err" | tail -1)
  [[ -z "$line" ]] && line="{\"consumer\": \"$name\", \"result\": \"FAIL\", \"detail\": \"$(tail -1 "$WORK/$name.err" | tr '"' "'")\"}"
  [[ "$line" == *'"FAIL"'* ]] && status=1
  results+=("$line")
done < "$HERE/consumers.txt"

printf '%s\n' "${results[@]}" | "$PY" "$HERE/table.py"
exit $status
