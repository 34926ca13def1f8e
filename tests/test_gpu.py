"""On a CUDA GPU: bf16 parity with transformers, the grouped expert path, the whole model on the GPU."""

from __future__ import annotations

import pytest
import torch

from moeflow.checkpoint import load
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.experts.local import LocalExperts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
@torch.inference_mode()
def test_bf16_parity_on_gpu(hf_checkpoint, model_type):
    """bf16 tolerance = transformers' own bf16 error: both are measured against transformers in fp32."""
    path, hf = hf_checkpoint(model_type)
    ck = load(path, device="cuda")  # auto dtype on cuda: bf16
    assert ck.store.data.dtype == torch.bfloat16 and ck.store.data.is_cuda
    eng = LLMEngine(ck, max_seqs=2, max_len=256)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 310, (200,), generator=g).tolist()  # many positions: argmax agreement is a rate
    x = torch.tensor([ids], device="cuda")
    ref32 = hf.to("cuda")(x).logits[0].double()
    ref16 = hf.to(torch.bfloat16)(x).logits[0].double()
    ours = eng.prefill_logits([ids])[0].double()

    def rel(a):
        return float((a - ref32).norm() / ref32.norm())

    assert rel(ours) < max(1.5 * rel(ref16), 5e-3), (rel(ours), rel(ref16))
    agree = (ours.argmax(-1) == ref32.argmax(-1)).float().mean().item()
    agree_hf = (ref16.argmax(-1) == ref32.argmax(-1)).float().mean().item()
    assert agree >= agree_hf - 0.05, (agree, agree_hf)


@torch.inference_mode()
def test_grouped_gemm_path_matches_loop_on_gpu():
    ck = load("synthetic:tiny-qwen3", device="cuda", dtype="bf16")
    for n in (1, 3, 64):
        x = torch.randn(n, ck.cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(ck.cfg.num_experts, device="cuda")[:4] for _ in range(n)])
        w = torch.rand(n, 4, device="cuda")
        a = LocalExperts(ck.store, grouped=False)(0, x, ids, w).float()
        b = LocalExperts(ck.store, grouped=True)(0, x, ids, w).float()
        assert float((a - b).norm() / a.norm()) < 1e-2


@torch.inference_mode()
def test_whole_model_on_gpu_generates_like_cpu_fp32():
    """The tiny default on the GPU in fp32 (loop path) gives the CPU's greedy tokens. Random weights give
    near-tied logits, where the two devices' summation orders may pick different tokens: a divergence is
    allowed only at a step whose top two CPU logits are within fp32 noise of each other."""
    prompt = "The quick brown fox"
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    cpu_engine = LLMEngine(load("synthetic:tiny-mixtral"), max_seqs=1, max_len=64)
    cpu = cpu_engine.generate([prompt], params)[0]
    gpu_engine = LLMEngine(load("synthetic:tiny-mixtral", device="cuda", dtype="fp32"), max_seqs=1, max_len=64)
    gpu = gpu_engine.generate([prompt], params)[0]
    # teacher-forced: both devices' logits over the CPU's whole sequence agree to fp32 noise
    ids = cpu.prompt_ids + cpu.output_ids
    a, b = cpu_engine.prefill_logits([ids])[0], gpu_engine.prefill_logits([ids])[0].cpu()
    assert float((a - b).norm() / a.norm()) < 1e-4
    diverged = next((i for i, (x, y) in enumerate(zip(gpu.output_ids, cpu.output_ids)) if x != y), None)
    if diverged is not None:
        top2 = a[len(cpu.prompt_ids) - 1 + diverged].topk(2).values
        assert float(top2[0] - top2[1]) < 1e-3 * float(a.abs().max()), f"diverged at step {diverged}, no tie"


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-mixtral"])
@torch.inference_mode()
def test_cuda_graph_decode_matches_eager(name):
    """Teacher-forced: both engines see the same tokens; their logits agree at every step."""
    ck = load(f"synthetic:{name}", device="cuda", dtype="bf16")
    engines = [LLMEngine(ck, max_seqs=1, max_len=96, cuda_graphs=g) for g in (False, True)]
    seqs = [e.add_request("Graphs replay the same kernels", SamplingParams(max_new_tokens=64)) for e in engines]
    for e in engines:
        e._admit()
    logits = [e._forward([s]) for e, s in zip(engines, seqs)]  # prefill (eager in both)
    agree = 0
    for _ in range(40):
        token = int(logits[0].argmax())
        agree += token == int(logits[1].argmax())
        for s in seqs:
            s.output_ids.append(token)
        logits = [e._forward([s]) for e, s in zip(engines, seqs)]
        # bf16 through different attention kernels: a few percent; a wrong position or mask is O(1)
        assert float((logits[1] - logits[0]).norm() / logits[0].norm()) < 5e-2
    assert agree >= 36
    assert engines[1].graphs and not engines[0].graphs


def test_concurrent_host_read_measures_both_rates():
    """The CPU's read rate and the copy rate while both run: positive, and neither above what the host
    reached alone by more than measurement noise."""
    from moeflow.bench.ceilings import concurrent_host_read, memory_bandwidth
    from moeflow.bench.latency import h2d_bandwidth

    dev = torch.device("cuda")
    both = concurrent_host_read(dev, nbytes=256 << 20, copies=4)
    alone_cpu, alone_h2d = memory_bandwidth(torch.device("cpu"), 256 << 20), h2d_bandwidth(dev, 256 << 20)
    assert 0 < both["cpu_read_bw_concurrent"] < 1.5 * alone_cpu
    assert 0 < both["h2d_bw_concurrent"] < 1.5 * alone_h2d
