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
    path, hf = hf_checkpoint(model_type)
    hf = hf.to("cuda", torch.bfloat16)
    ck = load(path, device="cuda")  # auto dtype on cuda: bf16
    assert ck.store.data.dtype == torch.bfloat16 and ck.store.data.is_cuda
    eng = LLMEngine(ck, max_seqs=2, max_len=128)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 310, (40,), generator=g).tolist()
    ours = eng.prefill_logits([ids])[0]
    ref = hf(torch.tensor([ids], device="cuda")).logits[0].float()
    rel = float((ours - ref).norm() / ref.norm())
    assert rel < 3e-2, rel                                   # bf16: ~1e-2 expected
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


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
    """The tiny default on the GPU in fp32 (loop path) gives the CPU's greedy tokens."""
    prompt = "The quick brown fox"
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    cpu = LLMEngine(load("synthetic:tiny-mixtral"), max_seqs=1, max_len=64).generate([prompt], params)[0]
    gpu = LLMEngine(load("synthetic:tiny-mixtral", device="cuda", dtype="fp32"), max_seqs=1,
                    max_len=64).generate([prompt], params)[0]
    assert gpu.output_ids == cpu.output_ids
