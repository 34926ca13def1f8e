#!/usr/bin/env bash
# One call on the GPU host: the GPU tests, then the benchmarks; logs and JSON land in $OUT (or ./out).
# Usage (device tool): bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_parity.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 -m moeflow generate --device cuda --max-new-tokens 16
python3 -m moeflow bench generate --device cuda --model synthetic:qwen3-30b-a3b --prompt-len 512 --new-tokens 128 \
  --runs 3 --out "$OUT/bench_generate_gpu.json" 2>&1 | tee "$OUT/bench.log"
