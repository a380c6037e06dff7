#!/usr/bin/env bash
# GPU check, run from the repository root on a machine with an NVIDIA GPU and no network
# (written for one H200 with torch 2.11, CUDA 13, Python 3.12, to end within 6 minutes):
#   1. builds the extension in place against the machine's torch;
#   2. runs every CUDA test of every test file (pytest -k cuda);
#   3. times every benchmark file with its CUDA providers, writing each file's JSON and
#      ratio table into $OUT as soon as that file finishes (a timeout keeps what ran);
#   4. runs compute-sanitizer (memcheck, racecheck, synccheck) over a small CUDA test
#      selection, where the machine allows it (else it says so and goes on).
# Each step has a time budget, cut to what is left of the whole script's budget.
#
#   OUT=out/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
TOTAL=${CHAMELEON_GPU_CHECK_BUDGET:-350}  # seconds for the whole script
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export CHAMELEON_FORCE_CUDA=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CHAMELEON_BENCH_ROUNDS=${CHAMELEON_BENCH_ROUNDS:-10}
status=0
START=$SECONDS

# budget WANTED: prints min(WANTED, what is left of TOTAL less 5 s), at least 1
budget() {
  local left=$((TOTAL - (SECONDS - START) - 5))
  local b=$1
  ((left < b)) && b=$left
  ((b < 1)) && b=1
  echo "$b"
}

step() { echo "== [$((SECONDS - START)) s] $*"; }

$PY - > "$OUT/env.json" <<'PYEOF'
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))
PYEOF
cat "$OUT/env.json"

step "build (in place)"
timeout "$(budget 130)" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { echo "build failed"; tail -30 "$OUT/build.log"; exit 1; }

step "CUDA tests (all test files)"
timeout "$(budget 60)" $PY -m pytest python_tests -k cuda -q -p no:cacheprovider --maxfail=20 \
    --junitxml "$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"

step "GPU benchmarks"
# pooling first (the issue's bandwidth goals), then krls, then the end-to-end ones
for name in pooling krls embed embed_scaling; do
  f=benchmarks/bench_$name.py
  [ -f "$f" ] || continue
  case $name in pooling) want=90 ;; krls) want=35 ;; *) want=15 ;; esac
  step "  $f (budget $(budget $want) s)"
  timeout "$(budget $want)" $PY -m pytest "$f" -q -p no:cacheprovider \
      --benchmark-json "$OUT/bench_$name.json" --benchmark-min-rounds 5 --benchmark-max-time 0.25 \
      > "$OUT/bench_$name.log" 2>&1 || { status=1; echo "  $f failed or ran out of time (see bench_$name.log)"; }
  if [ -s "$OUT/bench_$name.json" ]; then
    $PY benchmarks/summarize.py "$OUT/bench_$name.json" > "$OUT/bench_$name.md" && cat "$OUT/bench_$name.md"
  fi
done

step "compute-sanitizer"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
# every dtype on a misaligned view (vector body + scalar edges) and on a T-split row, both ops
SELECTION="python_tests/test_pooling.py::test_cuda_every_instantiation"
if [ -z "$SAN" ]; then
  echo "compute-sanitizer not found on this machine: skipped"
else
  for tool in memcheck racecheck synccheck; do
    step "  $tool"
    # PyTorch's caching allocator hides out-of-bounds accesses inside its blocks from
    # memcheck; PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own allocation.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(budget 30)" "$SAN" --tool "$tool" --error-exitcode 9 \
        --target-processes all $PY -m pytest $SELECTION -q -p no:cacheprovider -k "size1 or size6" \
        > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    if [ $rc -eq 9 ]; then
      status=1; echo "  $tool found errors:"; grep -m 20 -E "=====|Error" "$OUT/sanitizer_$tool.log"
    elif [ $rc -eq 0 ]; then
      echo "  $tool: clean"; tail -1 "$OUT/sanitizer_$tool.log"
    elif [ $rc -eq 124 ]; then
      echo "  $tool: ran out of its time budget (partial log kept)"
    else
      echo "  $tool could not run here (exit $rc): $(grep -m 1 -iE 'error|not supported' "$OUT/sanitizer_$tool.log")"
    fi
  done
fi
step "done (status $status)"
exit $status
