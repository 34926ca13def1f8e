#!/usr/bin/env bash
# On the GPU host: the offloading tests, then `moeflow bench latency` for Mixtral-8x7B (synthetic bf16).
# Needs .carry/data with mt_bench.jsonl, the Mixtral routing trace and a placement made from it:
#   moeflow profile-experts --model synthetic:mixtral-8x7b --trace .carry/data/mixtral-8x7b-instruct.humaneval.jsonl \
#       --out .carry/data/mixtral-trace-placement.json
# Usage: bash scripts/gpu_offload.sh BUDGETS [TESTS=1] [BASELINE_TOKENS=0]   (results under $OUT)
set -uo pipefail
export PYTHONPATH=src
OUT=${OUT:-out}
mkdir -p "$OUT"
BUDGETS=${1:-24GiB}
if [ "${2:-1}" = 1 ]; then
  python3 -m pytest -q -x tests/test_gpu.py tests/test_gpu_offload.py tests/test_offload.py 2>&1 | tail -15
fi
D=.carry/data
python3 -m moeflow bench latency --model synthetic:mixtral-8x7b --budgets "$BUDGETS" --policies auto,fiddler,lru \
  --prompts $D/mt_bench.jsonl --routing-trace $D/mixtral-8x7b-instruct.humaneval.jsonl \
  --trace-placement $D/mixtral-trace-placement.json --new-tokens 128 --baseline-tokens "${3:-0}" \
  --out "$OUT/latency-mixtral-${BUDGETS//,/-}.json"
