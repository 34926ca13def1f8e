"""The latency regime's GPU budget against every preset's shapes, from the config alone (no weights): the parts
it plans add up to at most the budget, the dense weights and the KV cache it counts are what the engine
allocates, and the workspace holds the widest MLP's activations; GPT-OSS's sink attention runs long prompts in
chunks of queries (what the budget counts) with the unchunked result."""

from __future__ import annotations

import pytest
import torch

from moeflow.checkpoint import read_model_config
from moeflow.engine.budget import share_budget, step_workspace, workspace_per_token
from moeflow.engine.kv_cache import KVCache
from moeflow.models import get_architecture
from moeflow.models.layers import DenseMLP
from moeflow.policy import get_policy
from moeflow.synthetic import PRESETS

STEP, MAX_LEN, B = 512, 1024, 2  # bf16


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_planned_parts_fit_the_budget_and_count_what_the_engine_allocates(name):
    _, cfg = read_model_config(f"synthetic:{name}")
    with torch.device("meta"):
        model = get_architecture(cfg.model_type).build(cfg, None)
        kv = KVCache(cfg, 1, MAX_LEN, torch.bfloat16, "meta")
    dense = sum(p.numel() for p in model.parameters()) * B
    assert dense == cfg.dense_numel * B
    assert kv.nbytes == cfg.kv_bytes_per_token(B) * MAX_LEN
    # the widest MLP's gate, up, activation and product on every token of a step, beside its input and output
    widest = max([cfg.expert_intermediate_size] + [m.gate_proj.out_features for m in model.modules()
                                                   if isinstance(m, DenseMLP)])
    assert workspace_per_token(cfg, B) >= B * (2 * cfg.hidden_size + 4 * widest)
    eb, trace = cfg.expert_bytes(torch.bfloat16), 5 << 20
    for policy in ("auto", "lru", "fiddler"):
        pol = get_policy(policy)
        need = dense + kv.nbytes + step_workspace(cfg, kv.nbytes, STEP, B) + trace + pol.min_slots(
            len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok) * eb
        for gpu_memory in (need, need + 7 * eb + eb // 2, need + (3 << 30)):
            b = share_budget(name, cfg, pol, gpu_memory, dense, eb, kv.nbytes, STEP, B, other_bytes=trace)
            assert b.fixed + b.slots * eb <= gpu_memory < b.fixed + (b.slots + 1) * eb, (policy, gpu_memory)


def test_a_routing_trace_on_the_gpu_takes_its_bytes_from_the_slots():
    _, cfg = read_model_config("synthetic:deepseek-v2-lite")
    pol, eb = get_policy("auto"), cfg.expert_bytes(torch.bfloat16)
    args = (cfg, pol, 8 << 30, cfg.dense_numel * B, eb, 16 << 20, STEP, B)
    without, with_trace = share_budget("x", *args), share_budget("x", *args, other_bytes=10 * eb)
    assert with_trace.slots == without.slots - 10 and with_trace.other_bytes == 10 * eb


@pytest.mark.parametrize("causal,masked", [(True, False), (False, True), (True, True)])
def test_sink_attention_in_chunks_of_queries_gives_the_whole(causal, masked, monkeypatch):
    from moeflow.models import sinks

    g = torch.Generator().manual_seed(0)
    Bq, Hq, Hkv, T, D = 2, 4, 2, 37, 8
    q = torch.randn(Bq, Hq, T, D, generator=g)
    k, v = torch.randn(Bq, Hkv, T, D, generator=g), torch.randn(Bq, Hkv, T, D, generator=g)
    mask = torch.rand(Bq, 1, T, T, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every query sees a key
    s = torch.randn(Hq, generator=g)
    whole = sinks.sink_attention(q, k, v, mask, causal, s)
    rows, real = [], sinks._rows
    monkeypatch.setattr(sinks, "CHUNK_SCORE_BYTES", Bq * Hq * T * 4 * 5)  # 5 queries a chunk
    monkeypatch.setattr(sinks, "_rows", lambda q, *a: rows.append(q.shape[2]) or real(q, *a))
    torch.testing.assert_close(sinks.sink_attention(q, k, v, mask, causal, s), whole, rtol=1e-5, atol=1e-6)
    assert rows == [5] * 7 + [2]


@pytest.mark.parametrize("name,budget", [("gpt-oss-120b", "24GiB"), ("deepseek-v3", "76GiB"),
                                         ("deepseek-v2", "40GiB"), ("gpt-oss-20b", "12GiB")])
def test_plan_works_from_the_config_alone_for_models_beyond_the_host(name, budget, tmp_path, capsys):
    """`moeflow plan` on presets whose weights no host here holds: the latency plan, and the throughput regime's
    host-memory shortfall said in a line (not an error) beside it."""
    from moeflow.cli import main
    from moeflow.perf.profile import reference_profile

    ref = tmp_path / "ref.json"
    reference_profile().save(ref)
    assert main(["plan", "--model", f"synthetic:{name}", "--gpu-memory", budget, "--profile", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "plan: policy" in out
    if name != "gpt-oss-20b":
        assert "throughput regime: " in out and "does not fit host memory" in out
    assert main(["plan", "--model", f"synthetic:{name}", "--gpu-memory", budget, "--profile", str(ref),
                 "--workload", "throughput"]) == (0 if name == "gpt-oss-20b" else 2)
