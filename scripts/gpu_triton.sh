#!/usr/bin/env bash
# One call on the GPU host: the Triton kernels' GPU tests (fused MoE, fused decoder ops, decode attention), the
# fused experts against PyTorch's paths by token count (tile sweep), then an all-GPU Qwen3-30B-A3B decode step
# (LAYERS layers, default all 48) with each fusion off and on and the graphed step's kernels by GPU time.
# Usage (device tool): bash scripts/gpu_triton.sh [LAYERS]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_fused_moe.py tests/test_fused_ops.py 2>&1 | tee "$OUT/triton_tests.log"
python3 scripts/probes/fused_moe.py kernels --sweep 2>&1 | tee "$OUT/fused_moe_kernels.log"
python3 scripts/probes/fused_moe.py step --layers "${1:-48}" 2>&1 | tee "$OUT/fused_moe_step.log"
