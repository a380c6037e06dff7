#!/usr/bin/env bash
# The GPU check: one prepared run on a machine with one NVIDIA GPU and no network (written for
# an H100 or H200 with torch 2.11, CUDA 13, the machine's python3), about 6 minutes at most:
#   1. build the extension in place against the machine's torch (CUDA required);
#   2. the GPU tests (`-m gpu`): the kernel tests first, then the compile/opcheck/gradcheck ones;
#   3. the goals report (benchmarks/gpu_report.py): pooling GB/s (CUDA kernel sets v2 and v1,
#      CHAMELEON_POOL_CUDA_KERNEL, side by side) as a share of the measured copy
#      bandwidth, krls device time against torch.linalg at batch 4096 for k = 7..64, fp32/fp64,
#      for both CUDA kernel generations (CHAMELEON_KRLS_CUDA_KERNEL=v2 and v1) and the library
#      path, which gives the fused/library crossover (CHAMELEON_KRLS_FUSED_MAX);
#   4. compute-sanitizer memcheck, racecheck and synccheck over benchmarks/gpu_sanitize.py,
#      which runs every kernel instantiation once and checks every answer;
#   5. if time is left, the pytest benchmarks of pooling and krls (pytest-benchmark JSON).
# Every step has a time limit, cut to what is left of the whole budget, and is stopped with
# SIGINT (pytest then still prints its summary and pytest-benchmark writes its JSON; the report
# prints the tables it has); a summary is written whatever happens. Everything lands in $OUT,
# at most 8 files: summary.md, build.log, tests.log, report.md, report.json, sanitizer.log,
# bench.json, bench.md.
#
#   OUT=out/gpu bash benchmarks/gpu_check.sh            # on the GPU machine
#   OUT=out/dry PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --quick
#       a CPU dry run of every step: no build (the extension already built here is used), the
#       GPU tests are collected (and skip), the sanitizer workload and the report run on the
#       CPU at small sizes, the benchmarks are smoke-run.
set -uo pipefail
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
TOTAL=${CHAMELEON_GPU_CHECK_BUDGET:-400}  # seconds for the whole script
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ $QUICK -eq 0 ] && export CHAMELEON_FORCE_CUDA=1
START=$SECONDS
SUMMARY="$OUT/summary.md"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
step() { note "== [$((SECONDS - START)) s] $*"; }
# budget WANT: min(WANT, what is left of TOTAL less 15 s for the SIGINT grace and the summary)
budget() {
  local left=$((TOTAL - (SECONDS - START) - 15)) b=$1
  ((left < b)) && b=$left
  ((b < 5)) && b=5
  echo "$b"
}
# bounded LIMIT CMD...: SIGINT at LIMIT seconds, SIGKILL 10 s later if it is still running
bounded() {
  local limit=$1
  shift
  timeout -s INT -k 10 "$limit" "$@"
}
rc_word() {
  case $1 in 0) echo "ok" ;; 124) echo "stopped at its time limit (SIGINT)" ;; 137) echo "killed after its time limit" ;; *) echo "exit $1" ;; esac
}
status=0
finish() {
  note "== [$((SECONDS - START)) s] done, status $status (0 = every step passed)"
  [ -s "$OUT/report.md" ] && { echo; cat "$OUT/report.md"; } >> "$SUMMARY"
}
trap finish EXIT

step "environment"
$PY - <<'PYEOF' 2>&1 | tee -a "$SUMMARY"
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {gpu}")
PYEOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used \
  --format=csv,noheader 2>&1 | tee -a "$SUMMARY"

if [ $QUICK -eq 1 ]; then
  step "build: skipped in --quick (using the extension built here)"
else
  step "build (in place, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  rm -f chameleon_ext/_C*.so
  bounded "$(budget 240)" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    note "build: $(rc_word $rc); last lines:"
    tail -25 "$OUT/build.log" | tee -a "$SUMMARY"
    status=1
    exit 1
  fi
  grep -iE "spill|warning: .*(stack|local)" "$OUT/build.log" | head -5 | tee -a "$SUMMARY"
fi
$PY -c "import chameleon_ext; print('build_info', chameleon_ext.build_info())" 2>&1 | tee -a "$SUMMARY"

# pytest-timeout (in the machine's image) bounds each test; without it the step limits do.
PER_TEST=()
$PY -c "import pytest_timeout" 2> /dev/null && PER_TEST=(--timeout 90)
GPU_TESTS=(python_tests/test_krls.py python_tests/test_krls_cuda.py python_tests/test_krls_cuda_sweep.py
  python_tests/test_pooling.py)
run_tests() {  # run_tests WANT LABEL -k-EXPRESSION
  local want=$1 label=$2 expr=$3
  step "tests: $label"
  echo "### $label" >> "$OUT/tests.log"
  bounded "$(budget "$want")" $PY -m pytest "${GPU_TESTS[@]}" -m gpu -k "$expr" -q -rfE -p no:cacheprovider \
    "${PER_TEST[@]}" >> "$OUT/tests.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1
  note "tests ($label): $(rc_word $rc); $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | tail -n 15 | tee -a "$SUMMARY"
}
: > "$OUT/tests.log"
run_tests 100 "kernels" "not compile and not opcheck and not gradcheck"

step "report: pooling share of copy bandwidth, krls vs torch.linalg"
QFLAG=()
[ $QUICK -eq 1 ] && QFLAG=(--quick)
bounded "$(budget 75)" $PY benchmarks/gpu_report.py --out "$OUT" "${QFLAG[@]}" > "$OUT/report.log" 2>&1
rc=$?
[ $rc -eq 0 ] || status=1
note "report: $(rc_word $rc)"
grep -E "^(ERROR|CHECK FAILED)" "$OUT/report.log" | head -10 | tee -a "$SUMMARY"
rm -f "$OUT/report.log"

step "compute-sanitizer over benchmarks/gpu_sanitize.py"
: > "$OUT/sanitizer.log"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -1)
if [ $QUICK -eq 1 ] || [ -z "$SAN" ]; then
  [ -z "$SAN" ] && note "compute-sanitizer not found: the workload runs without it"
  bounded "$(budget 60)" $PY benchmarks/gpu_sanitize.py "${QFLAG[@]}" >> "$OUT/sanitizer.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  note "sanitizer workload without a sanitizer: $(rc_word $rc); $(tail -1 "$OUT/sanitizer.log")"
else
  for tool in memcheck racecheck synccheck; do
    # memcheck covers both kernel generations; racecheck and synccheck (several times slower)
    # the defaults (v2) alone, the kernels that have never run, so each finishes in its budget.
    kernels=v2; [ $tool = memcheck ] && kernels=v2,v1
    echo "### $tool (kernels $kernels)" >> "$OUT/sanitizer.log"
    # PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor its own allocation, so memcheck sees an
    # access past a tensor's end even where the caching allocator's block would cover it.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 bounded "$(budget 40)" "$SAN" --tool "$tool" --error-exitcode 9 \
      --print-limit 30 $PY benchmarks/gpu_sanitize.py --kernels "$kernels" >> "$OUT/sanitizer.log" 2>&1
    rc=$?
    case $rc in
      0) verdict="clean" ;;
      9) verdict="ERRORS FOUND"; status=1 ;;
      1) verdict="no sanitizer error, but a result differs from the oracle"; status=1 ;;
      *) verdict="$(rc_word $rc)"; status=1 ;;
    esac
    note "$tool: $verdict; $(grep -E "ERROR SUMMARY|^checks:" "$OUT/sanitizer.log" | tail -2 | tr '\n' ' ')"
  done
  grep -m 20 -E "Invalid|Race|Hazard|Barrier|FAIL" "$OUT/sanitizer.log" | tee -a "$SUMMARY"
fi

run_tests 150 "torch.compile, opcheck, gradcheck" "compile or opcheck or gradcheck"

left=$((TOTAL - (SECONDS - START) - 15))
if [ $left -lt 40 ]; then
  note "benchmarks: skipped (${left} s left)"
else
  step "pytest benchmarks (pooling, krls)"
  # torch.compile'd providers are left out: their compile time does not fit the budget.
  if [ $QUICK -eq 1 ]; then
    BENCH=(--benchmark-disable)
  else
    BENCH=(--benchmark-json "$OUT/bench.json" --benchmark-min-rounds 5 --benchmark-max-time 0.25)
  fi
  bounded "$(budget 120)" $PY -m pytest benchmarks/bench_pooling.py benchmarks/bench_krls.py -k "not compiled" -q \
    -p no:cacheprovider "${BENCH[@]}" > "$OUT/bench.md" 2>&1
  rc=$?
  note "benchmarks: $(rc_word $rc); $(tail -1 "$OUT/bench.md")"
  if [ -s "$OUT/bench.json" ]; then
    $PY benchmarks/summarize.py "$OUT/bench.json" > "$OUT/bench.tmp" 2>&1 && cat "$OUT/bench.md" >> "$OUT/bench.tmp" \
      && mv "$OUT/bench.tmp" "$OUT/bench.md"
  fi
fi
exit $status
