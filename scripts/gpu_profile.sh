#!/usr/bin/env bash
# On the GPU host: measure the machine once (`moeflow profile`, cached in ~/.cache/moeflow for the engine and
# copied to $OUT), for the Mixtral and Qwen3 expert shapes; then `moeflow plan` from that profile.
# Usage: OUT=/tmp/out bash scripts/gpu_profile.sh
set -uo pipefail
export PYTHONPATH=src
OUT=${OUT:-out}
mkdir -p "$OUT"
P="$OUT/profile.json"
for m in mixtral-8x7b qwen3-30b-a3b; do
  t0=$SECONDS
  python3 -m moeflow profile --model synthetic:$m --out "$P" 2>&1 | tail -40
  echo "profile $m: $((SECONDS - t0)) s wall"
done
python3 -m moeflow plan --model synthetic:mixtral-8x7b --gpu-memory 24GiB --profile "$P" --roofline "$OUT/roofline-mixtral.png"
python3 -m moeflow plan --model synthetic:mixtral-8x7b --gpu-memory 76GiB --profile "$P" --workload latency
python3 -m moeflow plan --model synthetic:qwen3-30b-a3b --gpu-memory 16GiB --profile "$P"
