"""GPT-OSS's experts (biases, the clamped SwiGLU) offloaded: a biased block's row parts sum to the expert, a
partly copied slot computes its part, the slot waves (grouped or slot by slot) and the CPU's share give
LocalExperts' output, and the engine's greedy tokens under a forced CPU/copy split are the local run's."""

from __future__ import annotations

import pytest
import torch

from conftest import check_slot_waves, budget_for
from test_offload import costs_table, prompts

from moeflow.checkpoint import load
from moeflow.config import OffloadConfig
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.experts.biased import BiasedFormat, biased_ffn
from moeflow.experts.store import ExpertStore
from moeflow.models import get_architecture


def biased_store(hidden: int, inter: int, layers: int, std: float, device: str = "cpu") -> ExpertStore:
    """A GPT-OSS-shaped bf16 expert store (8 experts, top-2) of random weights and biases in host memory."""
    hf = {"model_type": "gpt_oss", "vocab_size": 128, "hidden_size": hidden, "intermediate_size": inter,
          "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 8, "max_position_embeddings": 128}
    store = ExpertStore(get_architecture("gpt_oss").config(hf), torch.bfloat16, "cpu")
    store.data.normal_(0, std)
    if device == "cuda":
        store.pin()
    return store


def grouped_mm_on_cpu() -> bool:
    try:
        torch._grouped_mm(torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(1, 16, 16, dtype=torch.bfloat16),
                          offs=torch.tensor([2], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@torch.inference_mode()
def test_row_parts_sum_to_the_expert_and_a_cleared_slot_computes_its_part():
    store = biased_store(hidden=48, inter=40, layers=1, std=0.3)
    fmt, cfg = store.fmt, store.cfg
    assert isinstance(fmt, BiasedFormat) and store.expert_bytes == cfg.expert_bytes(torch.bfloat16)
    block = store.block(0, 3).float()
    x = torch.randn(5, 48)
    whole = biased_ffn(x, store.gate_up(0)[3].float(), store.down_t(0)[3].float(), store.bias(0)[3].float(), cfg)
    torch.testing.assert_close(fmt.ffn(x, block), whole, rtol=1e-5, atol=1e-5)
    for r in (1, 17, 39):
        torch.testing.assert_close(fmt.ffn(x, block, 0, r) + fmt.ffn(x, block, r), whole, rtol=1e-5, atol=1e-5)
        slot = torch.randn_like(block)  # a slot's stale contents, then rows r:I copied in
        for d, s in zip(fmt.runs(slot, r, 40), fmt.runs(block, r, 40)):
            d.copy_(s)
        fmt.clear(slot, r)
        torch.testing.assert_close(fmt.ffn(x, slot), fmt.ffn(x, block, r), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def check_grouped_biased(device: str) -> None:
    """All experts of a layer in grouped GEMMs with their biases (LocalExperts on a GPU in bf16) give the
    per-expert loop's output; experts 6 and 7 get no token (empty groups)."""
    from moeflow.experts.local import LocalExperts

    store = biased_store(hidden=128, inter=128, layers=2, std=0.05).to(device)
    g = torch.Generator(device=device).manual_seed(3)
    for n in (1, 5, 33):
        x = torch.randn(n, 128, dtype=torch.bfloat16, device=device, generator=g)
        ids = torch.stack([torch.randperm(6, device=device, generator=g)[:2] for _ in range(n)])
        w = torch.softmax(torch.randn(n, 2, device=device, generator=g), -1)
        want = LocalExperts(store, grouped=False)(1, x, ids, w).float()
        got = LocalExperts(store, grouped=True)(1, x, ids, w).float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_grouped_biased_experts_match_the_looped_ones():
    if not grouped_mm_on_cpu():
        pytest.skip("this PyTorch has no grouped GEMM on the CPU")
    check_grouped_biased("cpu")


@pytest.mark.gpu
def test_grouped_biased_experts_match_the_looped_ones_on_the_gpu():
    check_grouped_biased("cuda")


def check_biased_waves(device: str, policy: str, grouped: bool | None):
    """conftest's slot-wave check on biased experts: residents, copied waves, splits (equal CPU and copy costs),
    slots reused within a layer (40 tokens)."""
    H = 128
    store = biased_store(hidden=H, inter=H, layers=2, std=0.05, device=device)  # I = H: sizes must not be inferred
    return check_slot_waves(device, policy, grouped, store=store)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("policy", ["auto", "lru", "fiddler"])
def test_biased_slot_waves_and_cpu_share_match_the_local_experts(policy, grouped):
    if grouped and not grouped_mm_on_cpu():
        pytest.skip("this PyTorch has no grouped GEMM on the CPU")
    stats = check_biased_waves("cpu", policy, grouped)
    if policy == "auto":
        assert 0 < stats.cpu_experts and 0 < stats.copied_experts


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["auto", "lru", "fiddler"])
def test_biased_slot_waves_match_on_the_gpu(policy):
    """The same on a GPU: grouped GEMMs with biases, the decode waves replayed as CUDA graphs."""
    check_biased_waves("cuda", policy, None)


@torch.inference_mode()
def test_split_experts_keep_the_greedy_tokens(hf_checkpoint):
    """auto with equal CPU and copy costs splits missed experts by rows: a batch of two lengths decodes the
    tokens of the all-on-one-device run."""
    path, _ = hf_checkpoint("gpt_oss")
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batch = prompts(1, lengths=(11, 4))
    want = [s.output_ids for s in LLMEngine(load(path), max_seqs=2, max_len=64).generate(batch, greedy)]
    ck = load(path, device="cpu", expert_device="cpu")
    eng = LLMEngine(ck, max_seqs=2, max_len=64, offload=OffloadConfig(budget_for(ck, 4), policy="auto"))
    backend = eng.model.experts
    backend.costs, backend.calibrate = costs_table(1.0, 1.0), False
    assert [s.output_ids for s in eng.generate(batch, greedy)] == want
    assert 0 < backend.stats.cpu_experts and 0 < backend.stats.copied_experts


@pytest.mark.gpu
@torch.inference_mode()
def test_whole_step_decode_graphs_with_sinks_match_eager(hf_checkpoint, monkeypatch):
    """All on the GPU in bf16 with the biased experts grouped (no host sync), GPT-OSS's decode step captured whole
    (sink attention, per-layer windows) gives eager's logits at every teacher-forced step."""
    from moeflow.experts import local

    monkeypatch.setattr(local.LocalExperts, "graph_safe", property(lambda self: local.can_group(self.store.data)))
    path, _ = hf_checkpoint("gpt_oss")
    ck = load(path, device="cuda", dtype="bf16")
    engines = [LLMEngine(ck, max_seqs=1, max_len=96, cuda_graphs=g) for g in (False, True)]
    seqs = [e.add_request(list(range(5, 30)), SamplingParams(max_new_tokens=64)) for e in engines]
    for e in engines:
        e._admit()
    logits = [e._forward([s]) for e, s in zip(engines, seqs)]
    for _ in range(24):  # past the window of 8 several times over
        token = int(logits[0].argmax())
        for s in seqs:
            s.output_ids.append(token)
        logits = [e._forward([s]) for e, s in zip(engines, seqs)]
        assert float((logits[1] - logits[0]).norm() / logits[0].norm()) < 5e-2
    assert engines[1].graphs and not engines[0].graphs
