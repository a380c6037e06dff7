#!/usr/bin/env bash
# The real-text comparison at GPT-2-small scale on one H100/H200, in under 8 minutes: every
# proxy (Chameleon's, DoReMi's reference and proxy, RegMix's) and every base run is the `base`
# preset (12 layers x 768, the GPT-2 small shape), and the script prints the same tables as
# run_evidence.sh (pretraining, then finetuning and new domains while time is left).
# Written for Python 3.12, torch 2.11, CUDA, no network; run from the repository root:
#
#   bash benchmarks/real_text/gpu_recipe.sh [--quick] [CORPUS] [OUT]
#
# CORPUS (default benchmarks/real_text/corpus, a git-ignored folder) must be the folder that
# build_corpus.py wrote on a Debian machine: most of its domains come from packages a GPU image
# does not ship, so the corpus travels with the tree (about 20 MB: copy it there without its
# .chameleon_cache and name it in the device tool's `carry`). Where it is missing the script
# tries build_corpus.py --no-install on the machine's own files and stops, saying so, if that
# cannot give every domain. The token cache is written under OUT, not into the corpus.
#
# --quick: a CPU dry run of the same steps at toy sizes (tiny preset, a few steps, 2 seeds; no
# extension build) to check the script end to end on a machine without a GPU.
#
# Every step runs under `timeout -s INT` with a share of the TOTAL budget (seconds, default
# 470); a compare cut short keeps its finished units (rerun the same command to resume). The
# sizes below were set from a FLOP estimate (about 4e12 FLOPs per step; 0.05-0.1 s per step
# in bf16), not measured on a device yet; override them with the environment variables.
set -uo pipefail
QUICK=0
POS=()
for a in "$@"; do
  case $a in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "gpu_recipe.sh: unknown option $a (expected --quick)" >&2; exit 2 ;;
    *) POS+=("$a") ;;
  esac
done
CORPUS=${POS[0]:-benchmarks/real_text/corpus}
PY=${PYTHON:-python3}
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ $QUICK = 1 ]; then
  OUT=${POS[1]:-out/gpu_recipe_quick}
  TOTAL=${TOTAL:-600}
  DEVICE=cpu PRESET=tiny BLOCK=64 BATCH=8 LR=3e-3 WARMUP=2 STEPS=10 PROXY_STEPS=8
  REGMIX_PROXIES=4 REGMIX_STEPS=5 SEEDS=2 EVAL_WINDOWS=4 EMBED_WINDOWS=8 FT_STEPS=6
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  OUT=${POS[1]:-out/gpu_recipe}
  TOTAL=${TOTAL:-470}
  DEVICE=cuda PRESET=${PRESET:-base} BLOCK=${BLOCK:-256} BATCH=${BATCH:-32} LR=${LR:-6e-4}
  WARMUP=${WARMUP:-20} STEPS=${STEPS:-150} PROXY_STEPS=${PROXY_STEPS:-80}
  REGMIX_PROXIES=${REGMIX_PROXIES:-16} REGMIX_STEPS=${REGMIX_STEPS:-15} SEEDS=${SEEDS:-3}
  EVAL_WINDOWS=${EVAL_WINDOWS:-64} EMBED_WINDOWS=${EMBED_WINDOWS:-128} FT_STEPS=${FT_STEPS:-40}
fi
MIXTURES=${MIXTURES:-uniform,natural,chameleon-paper,chameleon,doremi,regmix}
FT_MIXTURES=${FT_MIXTURES:-uniform,natural,chameleon-paper,chameleon,doremi}
NEW_DOMAINS=dictionary,c_headers
FT_DOMAINS=python,manpages,glossary
mkdir -p "$OUT"

# budget WANTED: min(WANTED, what is left of TOTAL less 5 s), at least 1
budget() {
  local left=$((TOTAL - (SECONDS - START) - 5)) b=$1
  ((left < b)) && b=$left
  ((b < 1)) && b=1
  echo "$b"
}
left() { echo $((TOTAL - (SECONDS - START))); }
step() { echo "== [$((SECONDS - START)) s] $*"; }

step "environment"
timeout -s INT "$(budget 60)" "$PY" - <<'PYEOF' | tee "$OUT/env.json"
import json, platform, torch
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))
PYEOF

if [ $QUICK = 0 ]; then
  step "build the extension in place (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout -s INT "$(budget 150)" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { echo "build failed or ran out of time (see $OUT/build.log)"; tail -20 "$OUT/build.log"; exit 1; }
fi

step "corpus $CORPUS"
if [ ! -f "$CORPUS/sources.json" ]; then
  echo "no corpus at $CORPUS; trying to build it from this machine's packages (build_corpus.py --no-install)"
  timeout -s INT "$(budget 90)" "$PY" benchmarks/real_text/build_corpus.py --no-install --out "$CORPUS" \
    || { echo "cannot build the corpus here: build it on a Debian machine with" \
              "'python benchmarks/real_text/build_corpus.py --out $CORPUS' and bring the folder along"; exit 2; }
fi
"$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); [print(f\"  {d['domain']:11s} {d['bytes']:>10,} bytes  {d['sha256'][:12]}\") for d in r['domains']]" "$CORPUS/sources.json"

compare() {  # compare NAME WANTED_SECONDS ARGS...
  local name=$1 want=$2
  shift 2
  local b
  b=$(budget "$want")
  step "$name (budget $b s)"
  timeout -s INT "$b" "$PY" -m chameleon_ext compare --data "$CORPUS" --cache-dir "$OUT/token_cache" \
      --device "$DEVICE" --preset "$PRESET" --block-size "$BLOCK" --batch-size "$BATCH" --lr "$LR" \
      --warmup "$WARMUP" --steps "$STEPS" --proxy-steps "$PROXY_STEPS" --regmix-proxies "$REGMIX_PROXIES" \
      --regmix-steps "$REGMIX_STEPS" --seeds "$SEEDS" --eval-windows "$EVAL_WINDOWS" \
      --embed-windows "$EMBED_WINDOWS" --finetune-steps "$FT_STEPS" --ckpt-every 0 --no-plots \
      --out "$OUT/compare" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  case $rc in
    0) sed -n '/^# /,$p' "$OUT/$name.log" | grep -v '^wrote ' ;;
    124|130) echo "$name: out of time after $b s; its finished units are kept (rerun to resume)"; tail -3 "$OUT/$name.log" ;;
    *) echo "$name failed (exit $rc):"; tail -15 "$OUT/$name.log" ;;
  esac
  return $rc
}

status=0
if [ $QUICK = 1 ]; then want_pre=$(left); else want_pre=300; fi
compare pretrain "$want_pre" --mixtures "$MIXTURES" || status=1
if (( $(left) > 40 )); then
  compare finetune "$(left)" --mixtures "$FT_MIXTURES" --finetune-domains "$FT_DOMAINS" || status=1
else
  echo "finetuning scenario skipped: $(left) s left"
fi
if (( $(left) > 40 )); then
  compare new_domains "$(left)" --mixtures "$MIXTURES" --new-domains "$NEW_DOMAINS" || status=1
else
  echo "new-domains scenario skipped: $(left) s left"
fi
step "done (tables and logs in $OUT)"
exit $status
