#!/usr/bin/env bash
# One call on the GPU host (AVX512-BF16 + AMX): the CPU kernel's tests, then `bench cpu-experts`; logs, JSON
# and the plot land in $OUT (or ./out). Usage (device tool): bash scripts/cpu_experts_check.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
grep -o -w -E 'avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort | uniq -c | tee "$OUT/cpu_flags.txt"
python3 -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"
python3 -c "from moeflow.experts.cpu import CpuExperts; c = CpuExperts(); print('kernel', c.kernel, 'threads', c.threads,
  'features', sorted(c.native.features) if c.native else None)" 2>&1 | tee "$OUT/cpu_kernel.txt"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_cpu_experts.py tests/test_offload.py 2>&1 | tee "$OUT/cpu_tests.log"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_offload.py 2>&1 | tail -5 | tee -a "$OUT/cpu_tests.log"
python3 -m moeflow bench cpu-experts --reps 10 --out "$OUT/cpu_experts.json" --plot "$OUT/cpu_experts.png" 2>&1 \
  | tee "$OUT/cpu_experts.txt"
