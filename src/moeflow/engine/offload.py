"""Put a loaded model into the latency regime: share the GPU budget out (engine/budget.py) and attach the
offloaded experts. On CUDA the caching allocator is also capped at the budget, so an underestimate fails
loudly instead of passing it; that cap and PyTorch's thread count are process-wide, recorded in
ProcessSettings for LLMEngine.close() to put back. Expert costs are the caller's (the CLI, a benchmark or
the server resolves them from the cached hardware profile: perf.profile.engine_costs); without them a
policy that plans by costs has the backend measure them at start.
"""

from __future__ import annotations

import gc

import torch

from moeflow import MoeflowError
from moeflow.checkpoint import Checkpoint
from moeflow.config import OffloadConfig
from moeflow.engine.budget import share_budget
from moeflow.experts.cpu import thread_split
from moeflow.experts.offload import OffloadedExperts
from moeflow.experts.trace import TraceRouting, load_trace
from moeflow.experts.waves import GRAPH_MAX_ENTRIES
from moeflow.perf.costs import ExpertCosts
from moeflow.policy import get_policy
from moeflow.policy.placement import Placement, even_rates, even_resident
from moeflow.quant import grouped as qgrouped


class ProcessSettings:
    """Process-wide settings changed for the engine (PyTorch's threads, the allocator's cap), each with how
    to put it back; restore() undoes them, newest first."""

    def __init__(self):
        self._undo: list = []

    def set_threads(self, n: int) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        self._undo.append(lambda: torch.set_num_threads(before))

    def cap_memory(self, fraction: float, device: torch.device) -> None:
        before = torch.cuda.get_per_process_memory_fraction(device)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        self._undo.append(lambda: torch.cuda.set_per_process_memory_fraction(before, device))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def held_bytes(device: torch.device, own: int) -> int:
    """The allocator's cap counts the whole process. What it already holds beyond this model's weights and KV
    cache (`own`: other tensors, fragments of earlier work that cannot be given back) is not the budget's: the cap
    is raised by it, once the garbage of earlier work is collected and given back (with cuBLAS's workspaces, one
    per stream ever used, which outlive an earlier engine's streams: one offloaded engine runs at a time, as the
    process-wide cap already assumes, so no live graph still points into them)."""
    gc.collect()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    return max(torch.cuda.memory_reserved(device) - own, 0)


def attach_offload(ck: Checkpoint, oc: OffloadConfig, kv_bytes: int, step_tokens: int,
                   costs: ExpertCosts | None = None, max_seqs: int = 1, graphs: bool = True,
                   settings: ProcessSettings | None = None) -> dict:
    """Build the offloaded expert backend into ck.model; returns the budget's breakdown. graphs: decode's
    small waves of GPU experts replay CUDA graphs. settings: where the process-wide changes are recorded."""
    settings = settings or ProcessSettings()
    cfg, store = ck.cfg, ck.store
    device = next(ck.model.parameters()).device
    if store.data.device.type != "cpu":
        raise MoeflowError("offloading needs the experts in host memory (load with expert_device='cpu')")
    policy = get_policy(oc.policy)
    if oc.expert_maps:
        policy.use_maps(oc.expert_maps, len(cfg.moe_layers), cfg.num_experts)
    held = held_bytes(device, ck.dense_bytes + kv_bytes) if device.type == "cuda" else 0
    trace = load_trace(oc.routing_trace) if oc.routing_trace else None
    trace_bytes = 0
    if trace is not None and device.type == "cuda":  # on the GPU whole: ids, and weights in fp32 (TraceRouting)
        trace_bytes = trace.ids.numel() * (trace.ids.element_size() + 4)
    dequant = qgrouped.workspace_bytes(store.fmt, GRAPH_MAX_ENTRIES, cfg.num_experts) if device.type == "cuda" else 0
    budget = share_budget(ck.name, cfg, policy, oc.gpu_memory, ck.dense_bytes, store.expert_bytes, kv_bytes,
                          step_tokens, store.dtype.itemsize, max_seqs, trace_bytes, dequant)
    split = budget.split
    if oc.placement:
        placement = Placement.load(oc.placement)
        placement.check(ck.name, cfg)
        resident = placement.resident(split.resident)
        prior = placement.rates(cfg.num_experts_per_tok)
    else:
        resident = even_resident(split.resident, len(cfg.moe_layers), cfg.num_experts)
        prior = even_rates(len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok)
    if device.type == "cuda":  # one core stays with the thread that drives the GPU (thread_split)
        settings.set_threads(thread_split(driver=True).torch)
        store.pin()
        total = torch.cuda.get_device_properties(device).total_memory
        settings.cap_memory(min(1.0, (oc.gpu_memory + held) / total), device)
    backend = OffloadedExperts(store, device, policy, split, resident, costs=costs, eviction=oc.eviction,
                               graphs=graphs, prior=prior)
    if trace is not None:
        backend = TraceRouting(backend, trace, cfg)
    ck.model.set_experts(backend)
    return {"gpu_memory": oc.gpu_memory, "dense_bytes": budget.dense_bytes, "kv_bytes": kv_bytes,
            "workspace_bytes": budget.workspace_bytes, "expert_bytes": budget.expert_bytes,
            "trace_bytes": budget.other_bytes,
            "slots": len(resident) + split.cache, "resident": len(resident), "cache": split.cache,
            "policy": policy.name}
