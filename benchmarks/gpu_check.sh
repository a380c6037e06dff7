#!/usr/bin/env bash
# GPU check, run from the repository root on a machine with an NVIDIA GPU (written to finish
# within 8 minutes on one H200): builds the extension in place for that GPU, runs every
# CUDA test, then times the pooling and krls benchmarks on the GPU. Results land in
# $OUT (default out/gpu): build.log, tests.log, tests.xml, bench.json, bench.md, env.json.
#
#   OUT=out/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export CHAMELEON_FORCE_CUDA=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

$PY - > "$OUT/env.json" <<'PYEOF'
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PYEOF

echo "== build (in place)"
timeout 240 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -30 "$OUT/build.log"; exit 1; }

echo "== CUDA tests"
timeout 150 $PY -m pytest python_tests/test_pooling.py python_tests/test_krls.py -k cuda -q -p no:cacheprovider \
    --junitxml "$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" | tail -5 || status=1

echo "== GPU benchmarks"
timeout 200 $PY -m pytest benchmarks/bench_pooling.py benchmarks/bench_krls.py -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench.json" --benchmark-min-rounds 5 --benchmark-max-time 0.25 \
    > "$OUT/bench.log" 2>&1 || status=1
$PY benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/bench.md" || status=1
exit $status
