"""OLMoE, Phi-3.5-MoE and GPT-OSS against transformers' own classes on tiny random checkpoints, and under every
offloading policy (the CPU playing both tiers)."""

from __future__ import annotations

import pytest
import torch

from conftest import budget_for
from test_parity import N_NEW, hf_greedy, prompts, rel_err

from moeflow import MoeflowError
from moeflow.checkpoint import load
from moeflow.config import OffloadConfig
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.models import get_architecture
from moeflow.policy import POLICIES

LONGROPE = {"rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
                             "long_factor": [2.0 + i for i in range(8)], "short_mscale": 1.19, "long_mscale": 1.24,
                             "original_max_position_embeddings": 40}, "max_position_embeddings": 512}
CASES = [
    ("olmoe", {}),
    ("phimoe", LONGROPE),  # prompt + output cross original_max_position_embeddings: the long mscale
    ("gpt_oss", {}),       # window 8 on layers 0 and 2, shorter than the prompts
]
VARIANTS = [("olmoe", {"norm_topk_prob": True}), ("phimoe", {})]  # prefill logits only
IDS = [f"{t}-{'-'.join(o) or 'default'}" for t, o in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def pair(request, hf_checkpoint):
    model_type, overrides = request.param
    path, hf = hf_checkpoint(model_type, **overrides)
    return path, hf, LLMEngine(load(path), max_seqs=4, max_len=128)


@torch.inference_mode()
def test_logits_and_greedy_tokens_match_transformers(pair):
    """Prefill logits within 1e-4 (fp32); 32 greedy tokens equal to transformers' (cached) alone, without
    moeflow's KV cache, and in a batch of two lengths."""
    _, hf, eng = pair
    for ids in prompts(1):
        assert rel_err(eng.prefill_logits([ids])[0], hf(torch.tensor([ids])).logits[0]) < 1e-4
    ids = prompts(3)[0]
    ref = hf_greedy(hf, ids, True)
    (seq,) = eng.generate([ids], SamplingParams(max_new_tokens=N_NEW, ignore_eos=True))
    assert seq.output_ids == ref
    tokens = list(ids)
    for _ in range(N_NEW):
        tokens.append(int(eng.prefill_logits([tokens])[0][-1].argmax()))
    assert tokens[len(ids):] == ref
    batch = prompts(2, lengths=(23, 7))
    for seq, ids in zip(eng.generate(batch, SamplingParams(max_new_tokens=N_NEW, ignore_eos=True)), batch):
        assert seq.output_ids == hf_greedy(hf, ids, use_cache=True)


@pytest.mark.parametrize("model_type,overrides", VARIANTS)
@torch.inference_mode()
def test_variants_prefill_logits_match_transformers(model_type, overrides, hf_checkpoint):
    path, hf = hf_checkpoint(model_type, **overrides)
    eng = LLMEngine(load(path), max_seqs=2, max_len=64)
    for ids in prompts(1):
        assert rel_err(eng.prefill_logits([ids])[0], hf(torch.tensor([ids])).logits[0]) < 1e-4


@torch.inference_mode()
def test_every_policy_gives_the_local_tokens(pair):
    path, _, eng = pair
    lengths, greedy = (13, 5), SamplingParams(max_new_tokens=16, ignore_eos=True)

    def run(policy):
        ck = load(path, device="cpu", expert_device="cpu")
        off = None
        if policy is not None:  # every expert in a slot for `gpu`, else 5 slots: misses in every layer
            slots = len(ck.cfg.moe_layers) * ck.cfg.num_experts if policy == "gpu" else 5
            off = OffloadConfig(budget_for(ck, slots), policy=policy)
        eng = LLMEngine(ck, max_seqs=2, max_len=64, offload=off)
        out = [s.output_ids for s in eng.generate(prompts(0, lengths=lengths), greedy)]
        assert policy is None or eng.model.experts.stats.lookups > 0
        return out

    want = run(None)
    for policy in sorted(POLICIES):
        assert run(policy) == want, policy


def test_the_dense_count_is_the_models(pair):
    """ModelConfig.dense_numel (what the planner budgets from the config alone) counts the built model's weights."""
    _, _, eng = pair
    assert eng.ck.cfg.dense_numel == sum(p.numel() for p in eng.ck.model.parameters())


def test_sparsemixer_picks_the_best_two_and_masks_far_logits():
    from moeflow.models.routers import make_router

    cfg = get_architecture("phimoe").config({"model_type": "phimoe", "vocab_size": 8, "hidden_size": 8,
                                             "num_attention_heads": 2, "num_hidden_layers": 1,
                                             "num_local_experts": 4, "intermediate_size": 8})
    logits = torch.tensor([[4.0, 1.0, 3.9, -2.0]])
    sparsemixer = make_router(cfg)
    ids, w = sparsemixer(logits)
    assert ids.tolist() == [[0, 2]]
    # expert 0 alone is within 2 eps of itself: weight 1; 2 and 1 are within 2 eps of 3.9? 1.0 is not
    assert w[0, 0].item() == pytest.approx(1.0)
    assert w[0, 1].item() == pytest.approx(1.0)
    near = torch.tensor([[4.0, 3.99, -1.0, -2.0]])
    _, w = sparsemixer(near)
    assert w[0, 0].item() == pytest.approx(torch.softmax(torch.tensor([4.0, 3.99]), 0)[0].item())


@pytest.mark.parametrize("model_type,hf,needle", [
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("phimoe", {"num_experts_per_tok": 4}, "2 experts"),
    ("phimoe", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
])
def test_unsupported_options_are_refused_by_name(model_type, hf, needle):
    from conftest import TINY

    with pytest.raises(MoeflowError, match=needle):
        get_architecture(model_type).config({"model_type": model_type, **TINY[model_type], **hf})


def test_mxfp4_experts_dequantize_as_transformers_does(tmp_path, hf_checkpoint):
    """Random MXFP4 blocks and scales: the dequantized values equal transformers' conversion, and a checkpoint
    publishing them loads the same store as one holding those values in fp32."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moeflow.models.gpt_oss import dequantize_mxfp4

    g = torch.Generator().manual_seed(0)
    path, _ = hf_checkpoint("gpt_oss")
    tensors = load_file(path / "model.safetensors")
    packed = {}
    for name in [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]:
        E, n_in, n_out = tensors[name].shape
        blocks = torch.randint(0, 256, (E, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(120, 128, (E, n_out, n_in // 32), dtype=torch.uint8, generator=g)
        want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), want)
        tensors[name] = want
        packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    plain = load(path).store.data
    save_file({k: v for k, v in tensors.items() if k not in {n[:-7] for n in packed}} | packed,
              str(path / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(load(path).store.data, plain)


@pytest.mark.parametrize("preset", ["olmoe-1b-7b", "phi-3.5-moe", "gpt-oss-20b"])
@torch.inference_mode()
def test_presets_shrunk_write_folders_that_transformers_reads_alike(preset, tmp_path):
    """A preset at tiny sizes, written as a HF folder: transformers' class reads it to the same logits, and
    moeflow reads back the same weights."""
    import transformers

    from moeflow.synthetic import build_synthetic, write_checkpoint

    tiny = dict(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, torch_dtype="float32")
    tiny |= {"head_dim": 16} if preset.startswith("gpt") else {}
    tiny |= {"rope_scaling": None} if preset.startswith("phi") else {}
    tiny |= {"eos_token_id": 319, "bos_token_id": None}
    ck = build_synthetic(preset, overrides=tiny)
    write_checkpoint(ck, tmp_path / preset)
    back = load(tmp_path / preset)
    assert torch.equal(back.store.data, ck.store.data)
    hf = getattr(transformers, ck.arch.hf_class).from_pretrained(tmp_path / preset, attn_implementation="eager")
    ids = prompts(4)[0]
    ours = LLMEngine(ck, max_seqs=1, max_len=64).prefill_logits([ids])[0]
    assert rel_err(ours, hf(torch.tensor([ids])).logits[0].float()) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["olmoe", "phimoe", "gpt_oss"])
@torch.inference_mode()
def test_fp32_parity_and_decode_on_gpu(hf_checkpoint, model_type):
    """The whole model on the GPU: fp32 prefill logits as transformers' (on the CPU) and the CPU run's greedy
    tokens with CUDA graphs on (a lone sequence's decode steps replay one)."""
    path, hf = hf_checkpoint(model_type)
    ids = prompts(5)[0]
    gpu = LLMEngine(load(path, device="cuda", dtype="fp32"), max_seqs=2, max_len=128)
    assert rel_err(gpu.prefill_logits([ids])[0].cpu(), hf(torch.tensor([ids])).logits[0]) < 1e-3
    cpu = LLMEngine(load(path), max_seqs=2, max_len=128)
    params = SamplingParams(max_new_tokens=N_NEW, ignore_eos=True)
    assert gpu.generate([ids], params)[0].output_ids == cpu.generate([ids], params)[0].output_ids
    bf16 = LLMEngine(load(path, device="cuda"), max_seqs=2, max_len=128)
    assert len(bf16.generate([ids], params)[0].output_ids) == N_NEW
