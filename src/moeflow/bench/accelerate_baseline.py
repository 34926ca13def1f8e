"""`bench latency`'s baseline: transformers with accelerate's device_map="auto" under the same GPU budget, on the
same weights."""

from __future__ import annotations

import gc
import time

import torch

from moeflow.loaded import Checkpoint


def accelerate_baseline(ck: Checkpoint, gpu_memory: int, prompt: list[int], new_tokens: int) -> dict:
    """transformers' MixtralForCausalLM with accelerate's device_map='auto' under the same max_memory,
    on the same weights (experts shared with moeflow's store, not copied)."""
    import transformers
    from accelerate import dispatch_model, infer_auto_device_map

    hf_cfg = transformers.AutoConfig.for_model(**ck.arch.hf_config(ck.cfg))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=ck.store.dtype)
    state = {ck.arch.hf_name(n): p.detach().cpu() for n, p in ck.model.named_parameters()}
    for i, layer in enumerate(ck.store.layers):
        pre = f"model.layers.{layer}.mlp.experts."
        state[pre + "gate_up_proj"] = ck.store.gate_up(layer)
        state[pre + "down_proj"] = ck.store.down_t(layer).transpose(1, 2)
    expected = set(hf.state_dict())
    # transformers 5 renamed Mixtral's block_sparse_moe to mlp (it converts checkpoints at load time)
    state = {k if k in expected else k.replace(".block_sparse_moe.", ".mlp."): v for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"baseline weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    # buffers that are not in a state dict (RoPE's inverse frequencies) are still on the meta device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)
    left = [n for n, b in hf.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"baseline buffers left unset: {left[:3]}")
    device_map = infer_auto_device_map(hf, max_memory={0: gpu_memory, "cpu": 1 << 40},
                                       no_split_module_classes=hf._no_split_modules)
    hf = dispatch_model(hf.eval(), device_map)
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        total = time.perf_counter() - t
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return {"policy": "transformers+accelerate", "gpu_memory_gib": gpu_memory / 2**30, "routing": "native",
            "decode_tps": (new_tokens - 1) / max(total - ttft, 1e-9), "ttft_s": ttft,
            "ttft_prompt_tokens": len(prompt), "new_tokens": new_tokens}
