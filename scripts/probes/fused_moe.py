"""The fused-MoE kernels against PyTorch's paths, and one all-GPU decode step's time by kernel.

kernels: one layer of experts (default Qwen3-30B-A3B's: H 2048, I 768, 128 experts, top-8) at several token
counts, each path replayed from a CUDA graph (the per-expert int4 loop, which syncs, eagerly): ms per layer and
GB/s of the distinct experts' weights it touches.
    PYTHONPATH=src python3 scripts/probes/fused_moe.py kernels [--tokens 1,8,64,512]
step: synthetic:qwen3-30b-a3b cut to --layers layers, all on the GPU: ms per decode token (CUDA graph) with the
fused experts and the fused decoder ops (models/fused_ops.py) off and on, then a torch.profiler table of one eager
step's kernels by GPU time.
    PYTHONPATH=src python3 scripts/probes/fused_moe.py step --layers 8 [--configs off,all --steps 20 --no-profile]
"""

import argparse

import torch

from moeflow.experts import fused_moe
from moeflow.experts.ffn import grouped_experts, quantized_experts
from moeflow.quant.format import ExpertFormat, QuantSpec
from moeflow.quant.triton_moe import quantized_fused_experts

p = argparse.ArgumentParser()
p.add_argument("what", choices=["kernels", "step"])
p.add_argument("--tokens", default="1,8,64,512")
p.add_argument("--shape", default="2048,768,128,8", help="H,I,E,K")
p.add_argument("--layers", type=int, default=8)
p.add_argument("--quant", default="int4")
p.add_argument("--sweep", action="store_true", help="kernels: also time each tile config of SWEEP")
p.add_argument("--configs", default="off,experts,ops,all", help="step: which of off, experts, ops, all to time")
p.add_argument("--steps", type=int, default=40, help="step: decode steps timed per config")
p.add_argument("--no-profile", action="store_true", help="step: skip the kernel table")
a = p.parse_args()


def timed(fn, reps: int = 20, graph: bool = True) -> float:
    """ms per call: replayed from a CUDA graph of `reps` calls (no launch gaps), or eager."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        run = g.replay
    else:
        def run():
            for _ in range(reps):
                fn()
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * reps)


SWEEP = {  # tokens -> tile configs (bm, bn, bk, warps, stages)
    1: [(16, bn, bk, 4, 4) for bn in (16, 32, 64) for bk in (64, 128, 256)] + [(16, 32, 128, 8, 4),
                                                                             (16, 32, 128, 4, 2)],
    512: [(32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (32, 128, 64, 4, 3)],
}
SWEEP[8] = SWEEP[1]


def sweep(n, x, ids, w, gate_up, down_t, touched, expert_bytes) -> None:
    best = None
    for cfg in SWEEP.get(n, []):
        t = fused_moe.Tiles(*cfg)
        try:
            ms = timed(lambda: fused_moe.fused_experts(x, ids, w, gate_up, down_t, t))
        except Exception as e:  # a config the GPU cannot hold (shared memory)
            print(f"tokens {n:4d} tiles {cfg}: {type(e).__name__}", flush=True)
            continue
        best = min(best or (ms, cfg), (ms, cfg))
        print(f"tokens {n:4d} tiles {cfg}: {ms * 1e3:8.1f} us {touched * expert_bytes / ms / 1e6:6.0f} GB/s",
              flush=True)
    if best:
        print(f"tokens {n:4d} best tiles {best[1]}: {best[0] * 1e3:.1f} us", flush=True)


def kernels() -> None:
    H, inter, E, K = map(int, a.shape.split(","))
    dev, dt = "cuda", torch.bfloat16
    gate_up = torch.randn(E, 2 * inter, H, device=dev, dtype=dt) * 0.02
    down_t = (torch.randn(E, H, inter, device=dev, dtype=dt) * 0.02).transpose(1, 2)  # the GPU store's view
    fmt = ExpertFormat(inter, H, dt, QuantSpec(4, 64) if a.quant == "int4" else QuantSpec(8, 64))
    blocks = torch.randint(0, 255, (E, fmt.block_numel), dtype=torch.uint8, device=dev)
    blocks.view(E, 3, inter, fmt.record)[..., fmt.q_bytes:fmt.q_bytes + fmt.scale_bytes] = 0  # finite scales
    bf16_bytes, q_bytes = 3 * inter * H * 2, fmt.block_bytes
    print(f"H {H} I {inter} E {E} K {K}; expert {bf16_bytes / 1e6:.2f} MB bf16, {q_bytes / 1e6:.2f} MB {a.quant}")
    for n in map(int, a.tokens.split(",")):
        x = torch.randn(n, H, device=dev, dtype=dt)
        w, ids = torch.rand(n, E, device=dev).topk(K)
        w = w / w.sum(-1, keepdim=True)
        touched = int(ids.unique().numel())
        ref = grouped_experts(x, ids, w, gate_up, down_t).float()
        err = float((fused_moe.fused_experts(x, ids, w, gate_up, down_t).float() - ref).norm() / ref.norm())
        rows = {
            "torch grouped bf16": (timed(lambda: grouped_experts(x, ids, w, gate_up, down_t)), bf16_bytes),
            "fused bf16": (timed(lambda: fused_moe.fused_experts(x, ids, w, gate_up, down_t)), bf16_bytes),
            f"fused {a.quant}": (timed(lambda: quantized_fused_experts(x, ids, w, blocks, fmt)), q_bytes),
        }
        if n <= 64:
            rows[f"per-expert {a.quant} (eager)"] = (timed(lambda: quantized_experts(x, ids, w, blocks, fmt), 3,
                                                           graph=False), q_bytes)
        for name, (ms, eb) in rows.items():
            print(f"tokens {n:4d} experts {touched:3d} {name:28s} {ms * 1e3:9.1f} us  "
                  f"{touched * eb / ms / 1e6:7.0f} GB/s", flush=True)
        print(f"tokens {n:4d} fused bf16 vs grouped: relative error {err:.2e}", flush=True)
        if a.sweep:
            sweep(n, x, ids, w, gate_up, down_t, touched, bf16_bytes)


def step() -> None:
    from torch.profiler import ProfilerActivity, profile

    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.engine.sequence import SamplingParams
    from moeflow.experts.local import LocalExperts
    from moeflow.models import fused_ops
    from moeflow.synthetic import build_synthetic

    ck = build_synthetic("qwen3-30b-a3b", "cuda", torch.bfloat16, overrides={"num_hidden_layers": a.layers})
    prompt = list(range(10, 42))
    engines = {}
    configs = {"off": (False, False, False), "experts": (True, False, False), "ops": (True, True, False),
               "all": (True, True, True)}  # (fused experts, fused norm/RoPE and router, decode attention)
    if bad := set(a.configs.split(",")) - set(configs):
        p.error(f"--configs: unknown {', '.join(sorted(bad))}; choose from {', '.join(configs)}")
    for fused, ops, attn in (configs[c] for c in a.configs.split(",")):
        fused_ops.ENABLED, fused_ops.DECODE_ATTENTION = ops, attn
        ck.model.set_experts(LocalExperts(ck.store, fused=fused))
        eng = engines[(fused, ops, attn)] = LLMEngine(ck, max_seqs=1, max_len=256)
        eng.add_request(prompt, SamplingParams(max_new_tokens=a.steps + 20, ignore_eos=True))
        for _ in range(6):
            eng.step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.steps):
            eng.step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / a.steps
        print(f"{a.layers} layers fused experts={fused} ops={ops} attention={attn}: {ms:.3f} ms/token (graph), "
              f"{ms / a.layers * 1e3:.1f} us/layer; 48 layers ~{1e3 / (ms * 48 / a.layers):.0f} tok/s", flush=True)
    for key in [] if a.no_profile else [k for k in (configs["off"], configs["all"]) if k in engines]:
        # the graphed steps' kernels (a graph's replays count)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engines[key].step()
            torch.cuda.synchronize()
        rows = prof.key_averages()
        print(f"graphed decode steps x3, {a.layers} layers, fused (experts, ops, attention) = {key}: "
              f"{sum(r.count for r in rows) / 3:.0f} kernels a step")
        print(rows.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)


kernels() if a.what == "kernels" else step()
