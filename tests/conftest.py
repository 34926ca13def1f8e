"""Fixtures: tiny random checkpoints saved by transformers itself (the published tensor layout)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from moeflow.engine.budget import step_workspace
from moeflow.synthetic import _tokenizer_for

TINY = {
    "mixtral": dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                    max_position_embeddings=512, bos_token_id=1, eos_token_id=2, initializer_range=0.1),
    "qwen3_moe": dict(vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                      num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, max_position_embeddings=512,
                      bos_token_id=317, eos_token_id=319, initializer_range=0.1),
    # MLA without q_lora_rank (as V2-Lite), YaRN, a dense first layer, two shared experts
    "deepseek_v2": dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=None,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                        num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
                        routed_scaling_factor=1.5, max_position_embeddings=512, bos_token_id=317,
                        eos_token_id=319, initializer_range=0.1,
                        rope_scaling={"type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                                      "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1}),
    # q_lora_rank, sigmoid scores with noaux_tc groups (the correction bias set by the tests), renormalized, scaled
    "deepseek_v3": dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=24,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                        num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, max_position_embeddings=512, bos_token_id=317,
                        eos_token_id=319, initializer_range=0.1),
    # q/k/v biases, a gated shared expert, a dense layer
    "qwen2_moe": dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=3, mlp_only_layers=[1],
                      max_position_embeddings=512, bos_token_id=317, eos_token_id=319, initializer_range=0.1),
    "olmoe": dict(vocab_size=320, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
                  norm_topk_prob=False, max_position_embeddings=512, bos_token_id=None, eos_token_id=319,
                  pad_token_id=1, initializer_range=0.1),
    "phimoe": dict(vocab_size=320, hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                   max_position_embeddings=512, attention_bias=True, lm_head_bias=True, bos_token_id=317,
                   eos_token_id=319, initializer_range=0.1),
    "gpt_oss": dict(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=6,
                    num_experts_per_tok=2, sliding_window=8, max_position_embeddings=512, bos_token_id=317,
                    eos_token_id=319, initializer_range=0.1, attn_implementation="eager"),
}
HF_CLASSES = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"),
              "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
              "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
              "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
              "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
              "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"), "phimoe": ("PhimoeConfig", "PhimoeForCausalLM"),
              "gpt_oss": ("GptOssConfig", "GptOssForCausalLM")}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh profile cache folder (MOEFLOW_CACHE_DIR) for the test; the native kernel's builds stay where they
    were (under the same variable), so that none is built again for it."""
    from moeflow.experts import native

    ext = native.cache_dir()
    monkeypatch.setattr(native, "cache_dir", lambda: ext)
    monkeypatch.setenv("MOEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def budget_for(ck, slots: int, max_seqs: int = 2, max_len: int = 64) -> int:
    """A GPU budget that leaves exactly `slots` expert slots for an engine of max_seqs x max_len (what
    attach_offload computes)."""
    kv = ck.cfg.kv_bytes_per_token(ck.store.data.dtype) * max_seqs * max_len
    fixed = ck.dense_bytes + kv + step_workspace(ck.cfg, kv, max_len, ck.store.data.element_size(), max_seqs)
    return fixed + slots * ck.store.expert_bytes


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def save_hf_checkpoint(path: Path, model_type: str, seed: int = 0, **overrides):
    """Build a random transformers model, save it with save_pretrained plus a tokenizer; return the model."""
    import transformers

    kwargs = TINY[model_type] | overrides
    config_cls, model_cls = HF_CLASSES[model_type]
    cfg, cls = getattr(transformers, config_cls)(**kwargs), getattr(transformers, model_cls)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if model_type == "gpt_oss":  # its biases and sinks start at zero: random ones are exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("bias", "sinks")):
                    p.normal_(0, 0.5)
    model.save_pretrained(path)
    _tokenizer_for({"model_type": model_type, **kwargs}).save(path)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path, _hf_built):
    """Factory: hf_checkpoint(model_type, **config overrides) -> (folder, transformers model): the test's own
    copy of a checkpoint built once per session (tests may damage the folder or change the model)."""

    def make(model_type: str = "mixtral", **overrides):
        src, model, rng = _hf_built(model_type, **overrides)
        path = tmp_path / f"{model_type}-ckpt"
        shutil.copytree(src, path, dirs_exist_ok=True)
        torch.set_rng_state(rng)  # the global generator as a fresh build leaves it
        return path, copy.deepcopy(model)

    return make


@pytest.fixture(scope="session")
def _hf_built(tmp_path_factory):
    built: dict[str, tuple] = {}

    def get(model_type: str, **overrides):
        key = f"{model_type}-{sorted(overrides.items())}"
        if key not in built:
            path = tmp_path_factory.mktemp("hf") / f"{model_type}-ckpt"
            model = save_hf_checkpoint(path, model_type, **overrides)
            built[key] = path, model, torch.get_rng_state()
        return built[key]

    return get


def mixtral_store(hidden: int, inter: int, layers: int, std: float, pin: bool = False):
    """A Mixtral-shaped bf16 expert store (8 experts, top-2) of random weights in host memory."""
    from moeflow.experts.store import ExpertStore
    from moeflow.models import get_architecture

    hf = {"model_type": "mixtral", "vocab_size": 128, "hidden_size": hidden, "intermediate_size": inter,
          "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 8, "num_local_experts": 8,
          "num_experts_per_tok": 2, "max_position_embeddings": 128}
    store = ExpertStore(get_architecture("mixtral").config(hf), torch.bfloat16, "cpu")
    store.data.normal_(0, std)
    if pin:
        store.pin()
    return store


@torch.inference_mode()
def check_slot_waves(device: str, policy: str, grouped: bool | None, store=None):
    """One OffloadedExperts layer call per case gives LocalExperts' output (bf16 tolerance): experts already in
    slots and each wave of copies in one pass (grouped GEMMs where `grouped`, None: where supported), a split
    expert through its zeroed gate rows (equal CPU and copy costs force splits), slots reused within a layer
    (40 tokens select every expert: more copies than cache slots). store: 2 layers of 8 experts (default: a
    Mixtral-shaped one). Returns the backend's stats."""
    from moeflow.experts.local import LocalExperts
    from moeflow.experts.offload import OffloadedExperts
    from moeflow.perf.costs import ExpertCosts
    from moeflow.policy import get_policy

    store = store or mixtral_store(hidden=256, inter=512, layers=2, std=0.05, pin=device == "cuda")
    H = store.cfg.hidden_size
    pol = get_policy(policy)
    pts = (1, 4, 16, 64, 256)
    even = ExpertCosts(pts, tuple(1e-3 * n for n in pts), tuple(1e-6 for _ in pts), 1e-3)
    split = pol.split(4, 2, 8, 2)
    resident = [(0, 7), (1, 6), (0, 5), (1, 4)][:split.resident]
    backend = OffloadedExperts(store, torch.device(device), pol, split, resident, costs=even)
    backend.calibrate = False
    if grouped is not None:
        backend.waves.grouped = grouped
    if not store.fmt.biased:
        assert backend.waves.grouped == (grouped if grouped is not None else device == "cuda")
    local = LocalExperts(store.to(device))
    g = torch.Generator(device=device).manual_seed(0)
    for n in (1, 3, 40):
        for layer in (0, 1):
            x = torch.randn(n, H, device=device, dtype=torch.bfloat16, generator=g)
            ids = torch.stack([torch.randperm(8, device=device, generator=g)[:2] for _ in range(n)])
            w = torch.softmax(torch.randn(n, 2, device=device, generator=g), -1)
            want = local(layer, x, ids, w).float()
            got = backend(layer, x, ids, w).float()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    backend.close()
    return backend.stats


def check_grouped_passes(device: str, monkeypatch) -> None:
    """Every expert in a slot (policy gpu) and 100 tokens: a layer's one wave holds 200 entries, more than the
    step's 100 tokens that the workspace holds one pass of, so it runs as several grouped passes; the output is
    LocalExperts'."""
    from moeflow.experts import waves as W
    from moeflow.experts.local import LocalExperts
    from moeflow.experts.offload import OffloadedExperts
    from moeflow.policy import get_policy

    store = mixtral_store(hidden=256, inter=512, layers=2, std=0.05, pin=device == "cuda")
    pol = get_policy("gpu")
    backend = OffloadedExperts(store, torch.device(device), pol, pol.split(16, 2, 8, 2),
                               [(layer, e) for layer in range(2) for e in range(8)])
    backend.waves.grouped = True
    backend.waves.per_token = 1.0  # a workspace with room for one entry per token (real shapes have 1.8-4.5)
    passes, real = [], W.wave_ops
    monkeypatch.setattr(W, "wave_ops", lambda out, x, w, meta, M, *a: (passes.append(M), real(out, x, w, meta, M, *a)))
    local = LocalExperts(store.to(device))
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(100, 256, device=device, dtype=torch.bfloat16, generator=g)
    ids = torch.stack([torch.randperm(8, device=device, generator=g)[:2] for _ in range(100)])
    w = torch.softmax(torch.randn(100, 2, device=device, generator=g), -1)
    want = local(1, x, ids, w).float()
    got = backend(1, x, ids, w).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert len(passes) >= 2 and sum(passes) == 200 and max(passes) <= 100, passes
    backend.close()


def run_interpreted(code: str) -> None:
    """Python `code` (run beside the tests, so it can import them) with TRITON_INTERPRET=1: Triton kernels' logic
    on the CPU, where Triton is installed (not a dependency)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    import moeflow

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    path = os.pathsep.join([str(Path(moeflow.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
