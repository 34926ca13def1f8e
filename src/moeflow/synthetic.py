"""Random weights of published shapes, built in memory for benchmarks, and written as HF folders.

Drawing one random number per weight runs at ~0.06 GB/s in bf16 on a CPU; instead one random pool
(64 Mi values) is drawn once and every tensor is tiled from it at random offsets: a memory copy, so
a 93 GB Mixtral fills at memory bandwidth, and no two experts hold the same values in the same places.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from moeflow import MoeflowError
from moeflow.config import ModelConfig
from moeflow.experts.local import LocalExperts
from moeflow.experts.store import ExpertStore
from moeflow.loaded import Checkpoint, check_fits, resolve_device, resolve_dtype
from moeflow.models import get_architecture
from moeflow.quant.format import QuantSpec, quantize
from moeflow.tokenizer import CHATML_TEMPLATE, MIXTRAL_TEMPLATE, synthetic_tokenizer

_MIXTRAL_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}

_DEEPSEEK_YARN = dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, original_max_position_embeddings=4096)

# Published configs (Hugging Face config.json) and the tiny ones the tests and the embedded default use.
PRESETS: dict[str, dict] = {
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                         rope_theta=1e6, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         torch_dtype="bfloat16"),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6,
                          rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16"),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
                             routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                             qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
                             moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False,
                             scoring_func="softmax", max_position_embeddings=163840, rms_norm_eps=1e-6,
                             rope_theta=10000, rope_scaling=_DEEPSEEK_YARN | {"mscale": 0.707, "mscale_all_dim": 0.707},
                             bos_token_id=100000, eos_token_id=100001, torch_dtype="bfloat16"),
    "deepseek-v2": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
                        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
                        num_key_value_heads=128, n_shared_experts=2, n_routed_experts=160, num_experts_per_tok=6,
                        routed_scaling_factor=16.0, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        qk_nope_head_dim=128, v_head_dim=128, topk_method="group_limited_greedy", n_group=8,
                        topk_group=3, moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False,
                        scoring_func="softmax", max_position_embeddings=163840, rms_norm_eps=1e-6,
                        rope_theta=10000, rope_scaling=_DEEPSEEK_YARN | {"mscale": 0.707, "mscale_all_dim": 0.707},
                        bos_token_id=100000, eos_token_id=100001, torch_dtype="bfloat16"),
    "deepseek-v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        qk_nope_head_dim=128, v_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4,
                        moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid",
                        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
                        rope_scaling=_DEEPSEEK_YARN | {"mscale": 1.0, "mscale_all_dim": 1.0},
                        bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16"),
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                              num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                              num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1,
                              max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6,
                              use_sliding_window=False, bos_token_id=151643, eos_token_id=151643,
                              torch_dtype="bfloat16"),
    "tiny-deepseek-v2": dict(model_type="deepseek_v2", vocab_size=4096, hidden_size=256, intermediate_size=512,
                             moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                             n_shared_experts=2, n_routed_experts=16, num_experts_per_tok=4, kv_lora_rank=64,
                             q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                             first_k_dense_replace=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
                             rope_theta=10000, rope_scaling=_DEEPSEEK_YARN | {"factor": 4, "mscale": 0.707,
                                                                             "mscale_all_dim": 0.707,
                                                                             "original_max_position_embeddings": 1024},
                             bos_token_id=4093, eos_token_id=4095, torch_dtype="float32"),
    "tiny-mixtral": dict(model_type="mixtral", vocab_size=4096, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
                         rope_theta=1e6, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         torch_dtype="float32"),
    "tiny-qwen3": dict(model_type="qwen3_moe", vocab_size=4096, hidden_size=256, intermediate_size=512,
                       moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=32, num_experts=16, num_experts_per_tok=4,
                       norm_topk_prob=True, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                       bos_token_id=4093, eos_token_id=4095, torch_dtype="float32"),
    "olmoe-1b-7b": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                        num_experts_per_tok=8, norm_topk_prob=False, max_position_embeddings=4096, rope_theta=1e4,
                        rms_norm_eps=1e-5, clip_qkv=None, bos_token_id=None, eos_token_id=50279,
                        torch_dtype="bfloat16"),
    # longrope's published short/long factors are replaced by ones: random weights make no use of them
    "phi-3.5-moe": dict(model_type="phimoe", vocab_size=32064, hidden_size=4096, intermediate_size=6400,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=16,
                        num_experts_per_tok=2, max_position_embeddings=131072, rope_theta=1e4, rms_norm_eps=1e-5,
                        attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01, sliding_window=131072,
                        original_max_position_embeddings=4096,
                        rope_scaling={"type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.0] * 64,
                                      "short_mscale": 1.1902380714238083, "long_mscale": 1.243163121016122,
                                      "original_max_position_embeddings": 4096},
                        bos_token_id=1, eos_token_id=32000, torch_dtype="bfloat16"),
    **{name: dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                  num_hidden_layers=layers, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                  num_local_experts=experts, num_experts_per_tok=4, sliding_window=128,
                  max_position_embeddings=131072, rope_theta=150000.0, rms_norm_eps=1e-5, attention_bias=True,
                  rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "original_max_position_embeddings": 4096, "truncate": False},
                  swiglu_limit=7.0, bos_token_id=199998, eos_token_id=200002, torch_dtype="bfloat16")
       for name, layers, experts in (("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128))},
}

POOL_SIZE = 64 << 20
INIT_STD = 0.02  # transformers' initializer_range for both architectures


class RandomFiller:
    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = 0, numel: int = POOL_SIZE):
        self.gen = torch.Generator().manual_seed(seed)
        self.size = max(1 << 16, min(POOL_SIZE, numel))  # small models need no 64 Mi draws
        pool = torch.randn(self.size, generator=self.gen) * INIT_STD
        self.pool = pool.to(device=device, dtype=dtype)

    def fill(self, t: torch.Tensor) -> None:
        flat, i = t.view(-1), 0
        while i < flat.numel():
            off = int(torch.randint(0, self.size // 2, (1,), generator=self.gen))
            n = min(self.size - off, flat.numel() - i)
            flat[i:i + n].copy_(self.pool[off:off + n])
            i += n


def fill_store(filler: RandomFiller, store: ExpertStore) -> None:
    """Random experts, the same values whatever the device: drawn in the host layout (down transposed) and,
    for a store that keeps down as published, transposed into place."""
    I, H = store.cfg.expert_intermediate_size, store.cfg.hidden_size
    if store.fmt.quantized:
        return fill_quantized(filler, store)
    tmp = None if store.down_transposed else torch.empty_like(store.data[0, 0])  # [3IH]
    for layer in store.layers:
        for e in range(store.cfg.num_experts):
            block = store.block(layer, e)
            if tmp is None:
                filler.fill(block)
                continue
            filler.fill(tmp)
            block[:2 * I * H].copy_(tmp[:2 * I * H])
            block[2 * I * H:3 * I * H].view(H, I).copy_(tmp[2 * I * H:3 * I * H].view(I, H).t())
            block[3 * I * H:].copy_(tmp[3 * I * H:])  # expert biases, if any


def fill_quantized(filler: RandomFiller, store: ExpertStore) -> None:
    """Random quantized experts: the filler's pool quantized once into rows, each expert a run of them from a
    random start (a copy, not a quantization, per expert: a Mixtral-sized store fills at memory speed)."""
    fmt = store.fmt
    pool = quantize(filler.pool[:filler.size // fmt.hidden * fmt.hidden].view(-1, fmt.hidden).cpu(), fmt)
    pool = pool.to(store.data.device).flatten()  # [P * record]
    pool_rows, rows = pool.numel() // fmt.record, 3 * fmt.inter
    for layer in store.layers:
        for e in range(store.cfg.num_experts):
            block, i = store.block(layer, e), 0
            while i < rows:
                r0 = int(torch.randint(0, pool_rows // 2, (1,), generator=filler.gen))
                n = min(pool_rows - r0, rows - i)
                block[i * fmt.record:(i + n) * fmt.record].copy_(pool[r0 * fmt.record:(r0 + n) * fmt.record])
                i += n


def _tokenizer_for(hf: dict):
    if hf["model_type"] == "mixtral":
        return synthetic_tokenizer(hf["vocab_size"], _MIXTRAL_SPECIALS, "<s>", "</s>", MIXTRAL_TEMPLATE)
    end, im_start, im_end = hf["eos_token_id"] - 2, hf["eos_token_id"] - 1, hf["eos_token_id"]
    specials = {"<|endoftext|>": end, "<|im_start|>": im_start, "<|im_end|>": im_end}
    return synthetic_tokenizer(hf["vocab_size"], specials, None, "<|im_end|>", CHATML_TEMPLATE)


def build_synthetic(name: str, device="cpu", dtype=None, expert_device=None, seed: int = 0,
                    overrides: dict | None = None, quant: QuantSpec | None = None) -> Checkpoint:
    """overrides: config.json fields over the preset's (a tiny model with more layers, for instance)."""
    if name not in PRESETS:
        raise MoeflowError(f"unknown synthetic model {name!r}; choose one of {', '.join(PRESETS)}")
    return build_from_hf(name, PRESETS[name] | (overrides or {}), device, dtype, expert_device, seed, quant)


def build_like(cfg: ModelConfig, device="cpu", dtype=None, expert_device=None, seed: int = 0) -> Checkpoint:
    """Random weights for any ModelConfig (a real model's shapes with fewer layers or experts, say)."""
    hf = get_architecture(cfg.model_type).hf_config(cfg)
    return build_from_hf(f"{cfg.model_type}-like", hf, device, dtype, expert_device, seed)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_host_fits(name: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                    expert_device: torch.device) -> None:
    """Refuse, with the bytes, random weights that cannot fit this host's memory (DeepSeek-V2/V3 in bf16)."""
    experts = len(cfg.moe_layers) * cfg.num_experts * cfg.expert_bytes(dtype)
    need = (cfg.dense_numel * dtype.itemsize if device.type == "cpu" else 0) + \
        (experts if expert_device.type == "cpu" else 0)
    have = host_memory_bytes()
    if need > 0.9 * have:
        raise MoeflowError(f"{name} needs {need / 2**30:.1f} GiB of weights in host memory ({str(dtype)[6:]}) but "
                           f"this host has {have / 2**30:.1f} GiB; `moeflow plan --model {name}` works from its "
                           f"config alone")


def build_from_hf(name: str, hf: dict, device="cpu", dtype=None, expert_device=None, seed: int = 0,
                  quant: QuantSpec | None = None) -> Checkpoint:
    arch = get_architecture(hf["model_type"])
    cfg = arch.config(hf)
    device = resolve_device(device)
    expert_device = resolve_device(expert_device or device)
    dtype = resolve_dtype(dtype, cfg, device)
    check_fits(f"synthetic:{name}", arch, cfg, dtype, device, expert_device, quant)
    check_host_fits(f"synthetic:{name}", cfg, dtype, device, expert_device)
    store = ExpertStore(cfg, dtype, expert_device, quant=quant)
    with torch.device("meta"):
        model = arch.build(cfg, LocalExperts(store))
    model.to_empty(device=device).to(dtype)
    filler = RandomFiller(device, dtype, seed, store.data.numel())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.fill_(1.0) if pname.endswith("norm.weight") else filler.fill(p)
        fill_store(RandomFiller(expert_device, dtype, seed + 1, store.data.numel()), store)
    model.tie_weights()
    suffix = f"-{quant.name}" if quant else ""
    return Checkpoint(f"synthetic:{name}{suffix}", arch, cfg, model.eval(), store, _tokenizer_for(hf),
                      {"bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id")},
                      synthetic=True)


def write_checkpoint(ck: Checkpoint, out: Path, shard_bytes: int = 4 << 30) -> None:
    """Write `ck` as a Hugging Face folder (sharded safetensors + index, config, tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = ck.store.dtype  # a quantized store writes its experts dequantized
    tensors = [(ck.arch.hf_name(n), p) for n, p in ck.model.named_parameters()]
    tensors += ck.arch.expert_tensors(ck.store)
    shards, cur, size = [], {}, 0
    for name, t in tensors:
        if cur and size + t.numel() * t.element_size() > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * t.element_size()
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm(shards, desc=f"writing {out.name}", disable=len(shards) < 2)):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # clone: the expert views share one storage, which safetensors refuses to write
        save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in shard.items()}, str(out / fname),
                  metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = ck.arch.hf_config(ck.cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    (out / "generation_config.json").write_text(json.dumps(ck.generation, indent=2))
    ck.tokenizer.save(out)


def add_parser(sub) -> None:
    from moeflow.flags import DTYPES

    s = sub.add_parser("synth", help="write random weights of a published shape as a Hugging Face folder")
    s.add_argument("name", help="mixtral-8x7b, qwen3-30b-a3b, tiny-mixtral or tiny-qwen3")
    s.add_argument("--out", required=True, help="folder to write")
    s.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: the preset's own")
    s.set_defaults(func=run)


def run(args) -> int:
    """`moeflow synth NAME --out DIR`."""
    from moeflow.engine.budget import gib

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MoeflowError(f"--out {out} exists and is not a folder")
    ck = build_synthetic(args.name.removeprefix("synthetic:"), dtype=args.dtype)
    write_checkpoint(ck, out)
    print(f"wrote {ck.name} ({gib(ck.store.nbytes + ck.dense_bytes)}) to {args.out}")
    return 0
