#!/usr/bin/env bash
# On the GPU host, one call: the GPU-marked tests of every feature, then benchmark stages (results under $OUT).
# Needs .carry/data with mt_bench.jsonl and the routing traces of ../shared/data/traces (carry .carry).
# Usage: bash scripts/gpu_session.sh STAGE...
#   tests        every gpu-marked test, the CPU kernels' tests (AVX512-BF16, AMX) and the pipeline's
#   kernel       bench cpu-experts: the read ceiling's readers, the bf16 kernel and the int4 path (Mixtral shape)
#   kernelsweep  bench cpu-experts, int4 Mixtral shape at 1 token: VNNI against the AVX2 loop and the gate/up
#                prefetch distances (quant_prefetch), side by side (the AVX2 loop twice, early and last: runs drift), at
#                16 and 8 threads
#   deepseek     bench latency on synthetic:deepseek-v2-lite at 8 GiB, its real trace replayed: auto, fiddler, lru, fmoe
#   archs        bench generate all on the GPU: deepseek-v2-lite, qwen1.5-moe-a2.7b, olmoe-1b-7b, gpt-oss-20b
#   int4         bench latency Mixtral-8x7B int4 at 24 and 12 GiB; Qwen3-30B-A3B int4 at 8 GiB (auto, lru: the int4
#                CPU path is PyTorch's, far too slow for fiddler's CPU-first rule)
#   throughput   bench throughput: Mixtral-8x7B at 24 GiB, generation length 128, beside the serve path
#   fmoe         bench latency Mixtral-8x7B at 24 GiB with its trace replayed: auto against fmoe
#   gptoss       bench latency GPT-OSS-20B at 12 GiB: auto, fiddler, lru (biased experts offloaded)
#   hostpath     bench latency Qwen3-30B-A3B at 16 GiB and Mixtral-8x7B at 24 GiB: auto against auto-prefetch
#   triton       scripts/gpu_triton.sh: the fused MoE and decoder-op kernels' tests, kernel sweep, all-GPU Qwen3 step
#   maps         fmoe started from expert maps of DeepSeek trace requests 200:999, replaying the trace only (8 GiB):
#                auto, lru, fmoe
#   attention    the pipeline's CPU decode attention at the Mixtral plan's micro-batch (448 sequences, 236 positions),
#                alone and beside host->GPU copies
#   int4triton   the int4 stage's Mixtral rows (24 and 12 GiB, auto) with the waves through the fused Triton kernels
#                (quant/grouped.py TRITON_WAVES: Mixtral's experts are too large for the batched dequantization)
#   servemaps    bench serve, ShareGPT prompts (.carry/data/sharegpt-200.jsonl), concurrency 1 and 4, 32 tokens:
#                DeepSeek-V2-Lite at 8 GiB with its trace replayed, one server per policy: auto, fmoe (maps of
#                requests 200:999, learning on line), lru; needs the server's wheels carried (scripts/gpu_serve.sh)
#   throughputq  bench throughput: Qwen3-30B-A3B at 16 GiB, generation lengths GEN_LENS (default 64), no baseline;
#                with MAX_BATCH, the plan's N at most that, then the same N in micro-batches of 128 (--plan)
#   throughputx  bench throughput of the pipeline's newer paths at GEN_LENS (default 64), beside the serve path:
#                Mixtral-8x7B int4 at 24 GiB, DeepSeek-V2-Lite at 8 GiB (MLA), GPT-OSS-20B at 12 GiB (sinks,
#                windows, biased experts); MAX_BATCH caps N (default 1024); then the latent-row attention kernel
#                alone (DeepSeek-V2-Lite's shape) to see its arithmetic bound
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
D=.carry/data
NEW=${NEW_TOKENS:-64}
lat() {  # name, model, budgets, policies, extra args
  python3 -m moeflow bench latency --model "$2" --budgets "$3" --policies "$4" --prompts $D/mt_bench.jsonl \
    --new-tokens "$NEW" --out "$OUT/latency-$1.json" "${@:5}" 2>&1 | tee "$OUT/latency-$1.log" | grep -v "^\s*$" | tail -20
}
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests) python3 -m pytest -q -p no:cacheprovider -rfE -m gpu --continue-on-collection-errors tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
           python3 -m pytest -q -p no:cacheprovider -rfE tests/test_cpu_experts.py tests/test_pipeline.py \
             2>&1 | tee "$OUT/cpu_kernel_tests.log" | tail -8 ;;
    kernel) python3 -m moeflow bench cpu-experts --shapes mixtral --tokens 1,64 --reps 5 --out "$OUT/cpu-experts.json" \
              2>&1 | tail -12
            python3 -m moeflow bench cpu-experts --shapes mixtral --tokens 1,64 --reps 5 --quantize int4 \
              --out "$OUT/cpu-experts-int4.json" 2>&1 | tail -6 ;;
    kernelsweep) for t in 16 8; do
                   python3 -m moeflow bench cpu-experts --shapes mixtral --tokens 1 --quantize int4 --reps 10 \
                     --torch-max-tokens 0 --threads $t --out "$OUT/cpu-experts-int4-sweep-t$t.json" --variants \
                     "quant_vnni=0;quant_prefetch=0;quant_prefetch=1024;quant_prefetch=4096;quant_prefetch=8192;quant_vnni=0" \
                     2>&1 | tail -9
                 done ;;
    deepseek) lat deepseek-v2-lite-8GiB synthetic:deepseek-v2-lite 8GiB auto,fiddler,lru,fmoe \
                --routing-trace $D/deepseek-v2-lite-chat.dev.npz --baseline-tokens 0 ;;
    archs) python3 -m moeflow bench generate --device cuda --model synthetic:deepseek-v2-lite \
             --model synthetic:qwen1.5-moe-a2.7b --model synthetic:olmoe-1b-7b --model synthetic:gpt-oss-20b \
             --out "$OUT/generate-archs.json" 2>&1 | tail -12 ;;
    int4) lat mixtral-int4 synthetic:mixtral-8x7b-int4 24GiB,12GiB auto,lru --baseline-tokens 0
          lat qwen3-int4 synthetic:qwen3-30b-a3b-int4 8GiB auto,lru --baseline-tokens 0 ;;
    throughput) python3 -m moeflow bench throughput --configs synthetic:mixtral-8x7b@24GiB --prompts $D/mt_bench.jsonl \
                  --gen-lens 128 --baseline-batches 16 --baseline-tokens 32 --out "$OUT/throughput-mixtral.json" \
                  2>&1 | tee "$OUT/throughput-mixtral.log" | tail -25 ;;
    fmoe) lat mixtral-fmoe synthetic:mixtral-8x7b 24GiB auto,fmoe --baseline-tokens 0 --ttft-len 256 \
            --routing-trace $D/mixtral-8x7b-instruct.humaneval.jsonl ;;
    gptoss) lat gpt-oss-20b-12GiB synthetic:gpt-oss-20b 12GiB auto,fiddler,lru --ttft-len 256 ;;
    hostpath) lat qwen3-16GiB synthetic:qwen3-30b-a3b 16GiB auto,auto-prefetch
              lat mixtral-24GiB synthetic:mixtral-8x7b 24GiB auto,auto-prefetch ;;
    triton) bash scripts/gpu_triton.sh 48 ;;
    maps) python3 -m moeflow maps build --trace $D/deepseek-v2-lite-chat.dev.npz --prompts 200:999 --no-semantic \
            --out "$OUT/maps-deepseek.npz" 2>&1 | tail -1
          lat deepseek-maps synthetic:deepseek-v2-lite 8GiB auto,lru,fmoe --routing-trace $D/deepseek-v2-lite-chat.dev.npz \
            --trace-only --expert-maps "$OUT/maps-deepseek.npz" --baseline-tokens 0 ;;
    attention) python3 -m moeflow.pipeline.attention_bench --batch 448 --ctx 236 --threads 16 --repeat 5 --beside-copies \
                 2>&1 | tee "$OUT/attention.log" | tail -8 ;;
    int4triton) python3 -c "import sys, moeflow.quant.grouped as g; g.TRITON_WAVES = True; from moeflow.cli import main; \
sys.exit(main(['bench', 'latency', '--model', 'synthetic:mixtral-8x7b-int4', '--budgets', '24GiB,12GiB', '--policies', 'auto', \
'--prompts', '$D/mt_bench.jsonl', '--new-tokens', '$NEW', '--out', '$OUT/latency-mixtral-int4-triton.json']))" 2>&1 | tail -14 ;;
    servemaps) python3 -m moeflow maps build --trace $D/deepseek-v2-lite-chat.dev.npz --prompts 200:999 --no-semantic \
                 --out "$OUT/maps-serve.npz" 2>&1 | tail -1
               python3 -m moeflow bench serve --serve "--model synthetic:deepseek-v2-lite --device cuda --gpu-memory 8GiB \
--routing-trace $D/deepseek-v2-lite-chat.dev.npz --max-running 8 --max-len 2048" --policies auto,fmoe,lru \
                 --expert-maps "$OUT/maps-serve.npz" --concurrencies 1,4 --num-prompts 8 --max-new-tokens 32 --ignore-eos \
                 --prompts $D/sharegpt-200.jsonl --time-limit 60 --out "$OUT/serve-deepseek-8GiB.json" 2>&1 \
                 | tee "$OUT/serve-deepseek-8GiB.log" | tail -8 ;;
    throughputq) python3 -m moeflow bench throughput --configs synthetic:qwen3-30b-a3b@16GiB --prompts $D/mt_bench.jsonl \
                   --gen-lens "${GEN_LENS:-64}" --baseline-batches "" ${MAX_BATCH:+--max-batch $MAX_BATCH} \
                   --out "$OUT/throughput-qwen3.json" 2>&1 | tee "$OUT/throughput-qwen3.log" | tail -25
                 if [ -n "${MAX_BATCH:-}" ]; then  # beside it, micro-batches of 128 at the same N
                   python3 -m moeflow bench throughput --configs synthetic:qwen3-30b-a3b@16GiB --prompts $D/mt_bench.jsonl \
                     --gen-lens "${GEN_LENS:-64}" --baseline-batches "" --plan "$MAX_BATCH,128,0.16,0,cpu" \
                     --out "$OUT/throughput-qwen3-mu128.json" 2>&1 | tee "$OUT/throughput-qwen3-mu128.log" | tail -3
                 fi ;;
    throughputx) for cfg in mixtral-8x7b-int4@24GiB deepseek-v2-lite@8GiB gpt-oss-20b@12GiB; do
                   python3 -m moeflow bench throughput --configs "synthetic:$cfg" --prompts $D/mt_bench.jsonl \
                     --gen-lens "${GEN_LENS:-64}" --baseline-batches 16 --baseline-tokens 32 \
                     --max-batch "${MAX_BATCH:-1024}" --out "$OUT/throughput-${cfg%@*}.json" 2>&1 \
                     | tee "$OUT/throughput-${cfg%@*}.log" | tail -6
                 done
                 python3 -m moeflow.pipeline.attention_bench --batch 448 --ctx 236 --heads 16,1,576 --shared \
                   --threads 16,8 --repeat 5 2>&1 | tee "$OUT/attention-mla.log" | tail -3 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
