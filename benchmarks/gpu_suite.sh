#!/usr/bin/env bash
# All GPU measurements in ONE call (< 8 min on one H100/H200), for a session that is lent a GPU:
#   * decode: seconds per sampling step vs the HBM weight-streaming floor (weights ÷ measured
#     bandwidth), IAR-B and IAR-L, bf16, CFG 2.0, batch 64 and 256 (target: ratio_to_floor ≤ 1.5);
#     `ratio_to_floor_kv` also counts the KV-cache read;
#   * training: MFU of one train step, IAR-B and IAR-L, bf16, batch 256 (target: mfu ≥ 0.45).
#
#   bash benchmarks/gpu_suite.sh [--dry-run] [--out DIR] [--budget SECONDS] [--quick]
#   bash benchmarks/gpu_suite.sh --prepare     # HERE (with the registry): build .gpu_site/
#
# The GPU machine has no network and only jax/flax/optax/orbax/chex preinstalled. `--prepare`
# pip-installs the missing pure-Python deps (ml_collections, absl-py, PyYAML) into .gpu_site/;
# carry it to the device (`run(carry=[".gpu_site"])`) and the suite puts it on PYTHONPATH.
# Results: DIR/*.log (full output), DIR/*.json (last-line JSON of each step), DIR/summary.json;
# the summary is also the last line of stdout. --dry-run prints the commands and runs nothing.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${ROOT}/gpu_suite_out"
BUDGET=450          # seconds for everything; each step gets min(its cap, what is left - reserve)
RESERVE=15
DRY=0
QUICK=0
PYTHON="${PYTHON:-python3}"

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#*=}" ;;
    --budget) BUDGET="$2"; shift ;;
    --budget=*) BUDGET="${1#*=}" ;;
    --prepare)
      set -e
      cd "$ROOT"
      "$PYTHON" -m pip install --no-deps --target .gpu_site ml_collections absl-py PyYAML
      echo "built ${ROOT}/.gpu_site; carry it: run(carry=[\".gpu_site\"], command=\"bash benchmarks/gpu_suite.sh\")"
      exit 0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (use --dry-run, --out DIR, --budget S, --quick, --prepare)" >&2; exit 2 ;;
  esac
  shift
done

cd "$ROOT"
mkdir -p "$OUT"
if [ -d "$ROOT/.gpu_site" ]; then
  export PYTHONPATH="$ROOT/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=3
START=$(date +%s)
STEPS=()

remaining() { echo $(( BUDGET - ($(date +%s) - START) - RESERVE )); }

# step NAME CAP_SECONDS CMD...: runs CMD with a timeout, saves its log and last-line JSON.
step() {
  local name="$1" cap="$2"; shift 2
  local left; left=$(remaining)
  local t=$(( cap < left ? cap : left ))
  echo "+ [$name, timeout ${t}s] $*"
  STEPS+=("$name")
  if [ "$DRY" = 1 ]; then return 0; fi
  if [ "$t" -lt 20 ]; then
    echo "  skipped: the ${BUDGET}s budget is used up" | tee "$OUT/$name.log"
    echo '{"skipped": "budget"}' > "$OUT/$name.json"
    return 0
  fi
  local t0; t0=$(date +%s)
  timeout --kill-after=5 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local last; last=$(grep -E '^\{' "$OUT/$name.log" | tail -n 1)
  if [ "$rc" -ne 0 ] || [ -z "$last" ]; then
    last="{\"error\": \"rc=$rc\", \"tail\": $("$PYTHON" -c 'import json,sys; print(json.dumps(sys.stdin.read()[-1500:]))' < "$OUT/$name.log")}"
  fi
  echo "$last" > "$OUT/$name.json"
  echo "  rc=$rc in $(( $(date +%s) - t0 ))s: $(head -c 400 "$OUT/$name.json")"
}

step env 60 "$PYTHON" -c '
import json, jax, flax, optax
import ml_collections  # noqa: F401  (missing -> run `bash benchmarks/gpu_suite.sh --prepare` and carry .gpu_site)
d = jax.devices()[0]
print(json.dumps({"jax": jax.__version__, "flax": flax.__version__, "platform": d.platform,
                  "device": getattr(d, "device_kind", ""), "devices": jax.device_count()}))'

BATCHES="64,256"
TRAIN_B=256
if [ "$QUICK" = 1 ]; then BATCHES="64"; TRAIN_B=64; fi

# Decode: both batch sizes share one process (startup + param init once per model).
step decode_b 130 "$PYTHON" benchmarks/sample_speed.py --config=configs/iar.py:b --batch="$BATCHES" \
  --cfg=2.0 --dtype=bfloat16 --bandwidth_mib=4096 --repeats=3
step decode_l 150 "$PYTHON" benchmarks/sample_speed.py --config=configs/iar.py:l --batch="$BATCHES" \
  --cfg=2.0 --dtype=bfloat16 --bandwidth_mib=4096 --repeats=3

# Training MFU, fused attention (jax.nn.dot_product_attention: cuDNN flash attention where available).
step train_b 90 "$PYTHON" benchmarks/train_step.py --config=configs/iar.py:b --batch="$TRAIN_B" --steps=5 --dtype=bfloat16 --attention=dot_product
step train_l 120 "$PYTHON" benchmarks/train_step.py --config=configs/iar.py:l --batch="$TRAIN_B" --steps=5 --dtype=bfloat16 --attention=dot_product

# If time is left: the nn.scan weight layout for comparison (unroll=0).
step decode_b_scan 60 "$PYTHON" benchmarks/sample_speed.py --config=configs/iar.py:b --batch=64 \
  --cfg=2.0 --dtype=bfloat16 --bandwidth_mib=4096 --repeats=3 --unroll=0

if [ "$DRY" = 1 ]; then
  echo "dry run: ${#STEPS[@]} steps (${STEPS[*]}), budget ${BUDGET}s, output ${OUT}"
  echo "{\"dry_run\": true, \"steps\": \"${STEPS[*]}\"}"
  exit 0
fi

"$PYTHON" - "$OUT" "${STEPS[@]}" <<'EOF'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
res = {}
for n in names:
    try:
        with open(os.path.join(out, n + ".json")) as f:
            res[n] = json.load(f)
    except Exception as e:  # a step that printed no JSON
        res[n] = {"error": repr(e)}
checks = {}
for n in ("decode_b", "decode_l"):
    runs = res.get(n, {}).get("runs") or ([res[n]] if "ratio_to_floor" in res.get(n, {}) else [])
    for r in runs:
        checks[f"{n}_bs{r['batch']}"] = {"step_ms": r["step_ms"], "ratio_to_floor": r["ratio_to_floor"],
                                         "ratio_to_floor_kv": r["ratio_to_floor_kv"],
                                         "pass": r["ratio_to_floor"] <= 1.5}
for n in ("train_b", "train_l"):
    if "mfu" in res.get(n, {}):
        checks[n] = {"mfu": res[n]["mfu"], "step_s": res[n]["step_s"], "pass": res[n]["mfu"] >= 0.45}
summary = {"env": res.get("env"), "checks": checks, "all_pass": bool(checks) and all(c["pass"] for c in checks.values())}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"summary": summary, "raw": res}, f, indent=1)
print(json.dumps(summary))
EOF
