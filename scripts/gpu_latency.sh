#!/usr/bin/env bash
# On the GPU host, one call: the offloading tests, then `moeflow bench latency` stages (results under $OUT).
# Needs .carry/data with mt_bench.jsonl, the Mixtral routing trace and a placement made from it:
#   moeflow profile-experts --model synthetic:mixtral-8x7b --trace .carry/data/mixtral-8x7b-instruct.humaneval.jsonl \
#       --out .carry/data/mixtral-trace-placement.json
# Usage: [NEW_TOKENS=128] [RUNS=1] [REPEAT=1] [ROUTING=native] bash scripts/gpu_latency.sh STAGE...   (RUNS: decode runs per row, median;
#   REPEAT: all rows again this many times, in turn; model-accuracy compares medians)
# with stages
#   tests      the GPU tests, the CPU kernel's tests and the offloading tests (the native hand-over, AMX here)
#   mixtral24  Mixtral-8x7B at 24 GiB: auto, fiddler, lru; native routing and the trace replayed
#   mixtral76  the same at 76 GiB
#   mixtral    both budgets in one process (one load of the weights and one profile)
#   baseline   transformers + accelerate at 24 GiB (BASELINE_TOKENS new tokens, default 8)
#   qwen16     Qwen3-30B-A3B at 16 GiB, native routing
#   profile    Mixtral-8x7B, PROFILE_POLICY (auto) at PROFILE_BUDGETS (76 and 24 GiB): the bench's figures and
#              torch.profiler tables of the host's time in decode and in a 512-token prefill
#   kernel     `bench cpu-experts` (Mixtral and Qwen3 shapes, 1-256 tokens per expert)
#   probe      scripts/probes/cpu_cost_probe.py: one Mixtral expert on the CPU timed the ways the profile and the engine do
#   resident   scripts/probes/resident_probe.py: a decode layer with its experts on the GPU, Qwen3 and Mixtral shapes, with
#              K or all experts, 6 or 12 layers, policy gpu or lru (what the profile's resident layer leaves out)
#   prefillcpu scripts/probes/prefill_cpu_probe.py: m experts of n prompt tokens in one CPU call (a prefill's), Qwen3 and
#              Mixtral shapes
# Each latency stage ends with `bench model-accuracy` on its JSON (the run's own predictions): *-accuracy.json/png.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
D=.carry/data
NEW=${NEW_TOKENS:-128}
accuracy() {  # a latency JSON -> its accuracy table, JSON and plot beside it
  [ -f "$1" ] && python3 -m moeflow bench model-accuracy --results "$1" --out "${1%.json}-accuracy.json" \
    --plot "${1%.json}-accuracy.png" 2>&1 | grep -E "│|within"
}
mixtral() {  # budget, extra args
  python3 -m moeflow bench latency --model synthetic:mixtral-8x7b --budgets "$1" --policies "${POLICIES:-auto,fiddler,lru}" \
    --prompts $D/mt_bench.jsonl $([ "${ROUTING:-both}" = native ] || echo "--routing-trace $D/mixtral-8x7b-instruct.humaneval.jsonl \
    --trace-placement $D/mixtral-trace-placement.json") --new-tokens "$NEW" --runs "${RUNS:-1}" --repeat "${REPEAT:-1}" "${@:2}" 2>&1 | tee "$OUT/latency-mixtral-${1//,/-}.log"
}
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_offload.py \
             tests/test_cpu_experts.py tests/test_offload.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    mixtral24) mixtral 24GiB --out "$OUT/latency-mixtral-24GiB.json"; accuracy "$OUT/latency-mixtral-24GiB.json" ;;
    mixtral76) mixtral 76GiB --out "$OUT/latency-mixtral-76GiB.json"; accuracy "$OUT/latency-mixtral-76GiB.json" ;;
    mixtral) mixtral 24GiB,76GiB --out "$OUT/latency-mixtral-24GiB-76GiB.json"
             accuracy "$OUT/latency-mixtral-24GiB-76GiB.json" ;;
    baseline) python3 -m moeflow bench latency --model synthetic:mixtral-8x7b --budgets 24GiB --policies auto \
                --prompts $D/mt_bench.jsonl --new-tokens 16 --baseline-tokens "${BASELINE_TOKENS:-8}" \
                --out "$OUT/latency-baseline.json" 2>&1 | tee "$OUT/latency-baseline.log" ;;
    qwen16) python3 -m moeflow bench latency --model synthetic:qwen3-30b-a3b --budgets 16GiB \
              --policies "${POLICIES:-auto,fiddler,lru}" --prompts $D/mt_bench.jsonl --new-tokens "$NEW" --runs "${RUNS:-1}" \
              --repeat "${REPEAT:-1}" --out "$OUT/latency-qwen3-16GiB.json" 2>&1 | tee "$OUT/latency-qwen3-16GiB.log"
            accuracy "$OUT/latency-qwen3-16GiB.json" ;;
    profile) python3 scripts/probes/profile_decode.py synthetic:mixtral-8x7b --gpu-memory "${PROFILE_BUDGETS:-76GiB,24GiB}" \
               --policy "${PROFILE_POLICY:-auto}" --steps 16 --prefill 512 > "$OUT/profile.txt" 2>&1
             grep -E "ms/token|tok/s|^auto|cpu_scale|bound|prefill of" "$OUT/profile.txt" ;;
    probe) python3 scripts/probes/cpu_cost_probe.py 2>&1 | tee "$OUT/cpu_cost_probe.txt" ;;
    resident) { python3 scripts/probes/resident_probe.py synthetic:qwen3-30b-a3b
                python3 scripts/probes/resident_probe.py synthetic:mixtral-8x7b --variants "2 2 6 gpu,8 2 6 gpu,2 2 6 lru"
              } 2>&1 | tee "$OUT/resident_probe.txt" ;;
    prefillcpu) for s in "qwen3-30b-a3b 64" "mixtral-8x7b 12"; do
                  set -- $s
                  python3 scripts/probes/prefill_cpu_probe.py --shape "$1" --experts "$2" 2>&1 | tee -a "$OUT/prefill_cpu_probe.txt"
                done ;;
    kernel) python3 -m moeflow bench cpu-experts --reps 10 --out "$OUT/cpu_experts.json" --plot "$OUT/cpu_experts.png" \
              > "$OUT/cpu_experts.txt" 2>&1; tail -42 "$OUT/cpu_experts.txt" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
