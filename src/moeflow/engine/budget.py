"""The GPU budget of the latency regime shared out, as a pure function (the engine and the planner both use it).

The budget covers what moeflow allocates on the GPU: non-expert weights, the KV cache, a workspace for
activations, and the expert slots, which get whatever is left. (The CUDA context, ~0.5 GiB, is outside it.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moeflow import MoeflowError
from moeflow.config import ModelConfig
from moeflow.policy.base import OffloadPolicy, SlotSplit

WORKSPACE_FIXED = 384 << 20  # allocator slack, cuBLAS workspaces (one per stream), CUDA-graph pools, small buffers


def workspace_per_token(cfg: ModelConfig, itemsize: int, widest: bool = True) -> int:
    """Activations per token of a step: hidden-sized buffers, the widest MLP's intermediate activations (an
    expert's; with `widest`, a dense first layer's or the shared experts' where wider: DeepSeek-V2-Lite's dense
    layer 0 is 10944 wide, its experts 1408), attention projections, fp32 accumulators (a generous count)."""
    H, I = cfg.hidden_size, cfg.expert_intermediate_size
    if widest:
        I = max(I, cfg.dense_intermediate_size if cfg.dense_layers else 0, cfg.shared_intermediate_size)
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    return itemsize * (16 * H + 4 * I + 2 * qkv) + 4 * 4 * H + 4 * cfg.vocab_size // 64


def attention_bytes(cfg: ModelConfig, step_tokens: int, max_len: int, itemsize: int) -> int:
    """What one layer's attention holds beyond the per-token count, for a lone sequence of up to max_len
    positions: MLA's keys and values expanded from the cached latents; with sinks (models/sinks.py), the scores
    of one chunk of queries and the keys and values repeated to the query heads."""
    heads, out = cfg.num_attention_heads, 0
    if cfg.kv_lora_rank:
        out += max_len * heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * itemsize
    if cfg.attention_sinks:
        from moeflow.models.sinks import SCORE_TENSORS, chunk_queries

        rows = min(step_tokens, chunk_queries(1, heads, max_len, itemsize))
        out += SCORE_TENSORS * heads * rows * max_len * itemsize + 2 * heads * max_len * cfg.head_dim * itemsize
    return out


def workspace_bytes(cfg: ModelConfig, step_tokens: int, itemsize: int, max_len: int | None = None) -> int:
    """Activations of one step of `step_tokens` tokens (attending over max_len positions, default as many)."""
    attn = attention_bytes(cfg, step_tokens, max_len or step_tokens, itemsize)
    return WORKSPACE_FIXED + step_tokens * workspace_per_token(cfg, itemsize) + attn


def pass_entry_bytes(cfg: ModelConfig, itemsize: int) -> int:
    """GPU bytes one routing entry holds at the peak of a grouped pass (experts/waves.py wave_ops): its token's
    row gathered [H], the gate/up output [2I], SiLU(gate) and the activations [I] each, the expert's output [H],
    its weighted fp32 copy [H] and two int64 indices. Biased experts (experts/biased.py) also gather their group's
    biases [2I + H] and hold the clamped SwiGLU's temporaries [4I] and the biased output [H], and a group index."""
    H, I = cfg.hidden_size, cfg.expert_intermediate_size
    biased = itemsize * (6 * I + 2 * H) + 8 if cfg.expert_bias else 0
    return itemsize * (2 * H + 4 * I) + 4 * H + 16 + biased


def pass_entries_per_token(cfg: ModelConfig, itemsize: int) -> float:
    """Routing entries per token of a step that one grouped pass of the GPU's experts may hold: the workspace's
    bytes per token less what the layer keeps beside the pass (hidden states in and out, the fp32 accumulator
    and the CPU's share, the router's logits), over an entry's. At least 1: the workspace always held one
    expert's activations on every token. Qwen3-30B-A3B: 4.5 (a 512-token prompt's 4,096 entries in two passes
    instead of eight); Mixtral-8x7B: 1.8."""
    live = itemsize * 4 * cfg.hidden_size + 4 * 2 * cfg.hidden_size + 4 * cfg.num_experts
    return max((workspace_per_token(cfg, itemsize, widest=False) - live) / pass_entry_bytes(cfg, itemsize), 1.0)


def context_of(cfg: ModelConfig, kv_bytes: int, itemsize: int, max_seqs: int) -> int:
    """Tokens per sequence of a KV cache of kv_bytes for max_seqs sequences."""
    return kv_bytes // max(cfg.kv_bytes_per_token(itemsize) * max_seqs, 1)


def step_workspace(cfg: ModelConfig, kv_bytes: int, step_tokens: int, itemsize: int, max_seqs: int = 1) -> int:
    """The workspace of an engine with max_seqs KV slots (kv_bytes in all) and steps of up to step_tokens."""
    max_len = context_of(cfg, kv_bytes, itemsize, max_seqs)
    work = workspace_bytes(cfg, step_tokens, itemsize, max_len or None)
    if max_seqs > 1:
        # A batched step gathers one layer's K and V of every running sequence (SDPA may widen them to the
        # query heads) and, with padding masks, may materialize the fp32 scores and probabilities of up to
        # step_tokens queries against max_len keys per head. A lone sequence reads its cache in place.
        gqa = cfg.num_attention_heads // cfg.num_key_value_heads
        work += kv_bytes // cfg.num_hidden_layers * (1 + gqa)
        work += step_tokens * cfg.num_attention_heads * max_len * 4 * 2
    return work


def _context_hint(cfg: ModelConfig, kv_bytes: int, itemsize: int, max_seqs: int) -> str:
    """Where the context alone could make room: what the KV cache and workspace were sized for."""
    return (f"; the KV cache and workspace are sized for {max_seqs} sequence(s) of "
            f"{context_of(cfg, kv_bytes, itemsize, max_seqs)} tokens: a shorter context or fewer sequences "
            "(--max-len, --max-running) need less")


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True)
class Budget:
    gpu_memory: int
    dense_bytes: int
    kv_bytes: int
    workspace_bytes: int
    expert_bytes: int
    slots: int          # expert slots the rest holds
    split: SlotSplit    # how the policy uses them
    other_bytes: int = 0  # other tensors the engine keeps on the GPU (a routing trace replayed)

    @property
    def fixed(self) -> int:
        return self.dense_bytes + self.kv_bytes + self.workspace_bytes + self.other_bytes

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "split"} | asdict(self.split)


def share_budget(name: str, cfg: ModelConfig, policy: OffloadPolicy, gpu_memory: int, dense_bytes: int,
                 expert_bytes: int, kv_bytes: int, step_tokens: int, itemsize: int, max_seqs: int = 1,
                 other_bytes: int = 0, extra_work: int = 0) -> Budget:
    """Slots for the experts once the rest is paid for; MoeflowError with the figures when too few.
    other_bytes: other tensors the engine keeps on the GPU (a routing trace replayed there); extra_work:
    temporaries of the expert path beyond the activations (quantized slots dequantized for a grouped pass)."""
    L, E, K = len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok
    work = step_workspace(cfg, kv_bytes, step_tokens, itemsize, max_seqs) + extra_work
    fixed = dense_bytes + kv_bytes + work + other_bytes
    slots = max(gpu_memory - fixed, 0) // expert_bytes
    need = policy.min_slots(L, E, K)
    if slots < need:
        short = fixed + need * expert_bytes - gpu_memory
        raise MoeflowError(
            f"--gpu-memory {gib(gpu_memory)} is too small for {name} with policy {policy.name}: non-expert "
            f"weights {gib(dense_bytes)} + KV cache {gib(kv_bytes)} + workspace {gib(work)} + "
            + (f"routing trace {gib(other_bytes)} + " if other_bytes else "") + f"{need} expert slot(s) "
            f"of {gib(expert_bytes)} need at least {gib(fixed + need * expert_bytes)} ({gib(short)} more)"
            + (_context_hint(cfg, kv_bytes, itemsize, max_seqs) if kv_bytes + work - WORKSPACE_FIXED > short else ""))
    return Budget(gpu_memory, dense_bytes, kv_bytes, work, expert_bytes, slots, policy.split(slots, L, E, K),
                  other_bytes)
