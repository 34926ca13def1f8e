"""Put a loaded model into the latency regime: share the GPU budget out and attach the offloaded experts.

The budget covers what moeflow allocates on the GPU: non-expert weights, the KV cache, a workspace for
activations, and the expert slots, which get whatever is left. On CUDA the caching allocator is also capped
at the budget, so an underestimate fails loudly instead of passing it. (The CUDA context itself, ~0.5 GiB,
is outside any allocator and outside the budget.)
"""

from __future__ import annotations

import torch

from moeflow import MoeflowError
from moeflow.checkpoint import Checkpoint
from moeflow.config import ModelConfig, OffloadConfig
from moeflow.experts.offload import OffloadedExperts
from moeflow.experts.trace import TraceRouting, load_trace
from moeflow.perf.costs import ExpertCosts
from moeflow.policy import get_policy
from moeflow.policy.placement import Placement, even_resident

WORKSPACE_FIXED = 384 << 20  # allocator slack, cuBLAS workspaces (one per stream), CUDA-graph pools, small buffers
CPU_THREADS = torch.get_num_threads()  # PyTorch's default: the physical cores


def workspace_bytes(cfg: ModelConfig, step_tokens: int, itemsize: int) -> int:
    """Activations of one step of `step_tokens` tokens: hidden-sized buffers, one expert's intermediate
    activations, attention projections, fp32 accumulators (a generous per-token count)."""
    H, I = cfg.hidden_size, cfg.expert_intermediate_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    per_token = itemsize * (16 * H + 4 * I + 2 * qkv) + 4 * 4 * H + 4 * cfg.vocab_size // 64
    return WORKSPACE_FIXED + step_tokens * per_token


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def attach_offload(ck: Checkpoint, oc: OffloadConfig, kv_bytes: int, step_tokens: int,
                   costs: ExpertCosts | None = None) -> dict:
    """Build the offloaded expert backend into ck.model; returns the budget's breakdown."""
    cfg, store = ck.cfg, ck.store
    device = next(ck.model.parameters()).device
    if store.data.device.type != "cpu":
        raise MoeflowError("offloading needs the experts in host memory (load with expert_device='cpu')")
    policy = get_policy(oc.policy)
    L, E, K = len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok
    dense, expert = ck.dense_bytes, store.expert_bytes
    work = workspace_bytes(cfg, step_tokens, store.data.element_size())
    fixed = dense + kv_bytes + work
    slots = max(oc.gpu_memory - fixed, 0) // expert
    need = policy.min_slots(L, E, K)
    if slots < need:
        raise MoeflowError(
            f"--gpu-memory {gib(oc.gpu_memory)} is too small for {ck.name} with policy {policy.name}: non-expert "
            f"weights {gib(dense)} + KV cache {gib(kv_bytes)} + workspace {gib(work)} + {need} expert slot(s) of "
            f"{gib(expert)} need at least {gib(fixed + need * expert)}")
    split = policy.split(slots, L, E, K)
    if oc.placement:
        placement = Placement.load(oc.placement)
        placement.check(ck.name, cfg)
        resident = placement.resident(split.resident)
    else:
        resident = even_resident(split.resident, L, E)
    if device.type == "cuda":
        # One core stays with the thread that drives the GPU: a CPU expert split over all cores waits for
        # its slowest thread, and that thread would share a core with the driver.
        torch.set_num_threads(max(CPU_THREADS - 1, 1))
        store.pin()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, oc.gpu_memory / total), device)
    backend = OffloadedExperts(store, device, policy, split, resident, costs=costs, eviction=oc.eviction)
    if oc.routing_trace:
        backend = TraceRouting(backend, load_trace(oc.routing_trace), cfg)
    ck.model.set_experts(backend)
    return {"gpu_memory": oc.gpu_memory, "dense_bytes": dense, "kv_bytes": kv_bytes, "workspace_bytes": work,
            "expert_bytes": expert, "slots": len(resident) + split.cache, "resident": len(resident),
            "cache": split.cache, "policy": policy.name}
