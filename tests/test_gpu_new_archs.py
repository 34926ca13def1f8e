"""On a CUDA GPU, DeepSeek-V2/V3 and Qwen2-MoE through test_gpu.py's and test_gpu_offload.py's checks: bf16 parity
with transformers, every policy giving the all-GPU tokens (GPT-OSS too), piecewise and wave CUDA graphs,
whole-step graphs."""

from __future__ import annotations

import pytest
import torch

import test_gpu
import test_gpu_offload
from moeflow.policy import POLICIES

pytestmark = pytest.mark.gpu
ARCHS = ["deepseek_v2", "deepseek_v3", "qwen2_moe"]
OFFLOADED = ARCHS + ["gpt_oss"]  # GPT-OSS's biased experts offloaded (its fp32 parity: test_archs.py)


@pytest.fixture(autouse=True)
def whole_gpu_after():
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.parametrize("model_type", ARCHS)
def test_bf16_parity_on_gpu(hf_checkpoint, model_type):
    test_gpu.test_bf16_parity_on_gpu(hf_checkpoint, model_type)


@pytest.mark.parametrize("model_type", OFFLOADED)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policies_give_the_all_gpu_tokens(hf_checkpoint, model_type, policy):
    test_gpu_offload.test_policies_give_the_all_gpu_tokens(hf_checkpoint, model_type, policy)


@pytest.mark.parametrize("model_type", OFFLOADED)
def test_piecewise_graphs_give_the_eager_tokens(hf_checkpoint, model_type):
    test_gpu_offload.test_piecewise_graphs_give_the_eager_tokens(hf_checkpoint, model_type)


@pytest.mark.parametrize("model_type", OFFLOADED)
@pytest.mark.parametrize("policy", ["auto", "lru"])
def test_wave_graphs_give_the_eager_tokens(hf_checkpoint, model_type, policy):
    test_gpu_offload.test_wave_graphs_give_the_eager_tokens(hf_checkpoint, model_type, policy)


def test_cuda_graph_decode_matches_eager_with_mla():
    """The whole decode step captured: MLA attends over the whole slot under the graph's device-side mask."""
    test_gpu.test_cuda_graph_decode_matches_eager("tiny-deepseek-v2")
