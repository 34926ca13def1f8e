"""The decoder every architecture shares: attention over a slot KV cache (with sinks, per-layer windows where
asked), norms, RoPE, router.

Legend: N = packed tokens of the batch, B = sequences, Tq = longest new run, Tk = longest context,
H = hidden, Hq/Hkv = query/key-value heads, D = head dim, E = experts, K = experts per token.
Tokens of all sequences are packed into one [N, H] tensor so that norms, projections and experts never
see padding; only attention pads, per sequence, to [B, Tq]. Without a KV cache (training, scoring) the
packed tokens are B full rows of Tq tokens (AttnBatch.full) and attention runs on them directly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from moeflow.config import ModelConfig
from moeflow.experts.base import ExpertBackend  # noqa: F401  (the contract; importable here as before)
import moeflow.models.fused_ops as fused_ops
from moeflow.models.rope import rope_table
from moeflow.models.routers import make_router, route  # noqa: F401  (route: re-exported)
from moeflow.models.sinks import sink_attention


@dataclass
class AttnBatch:
    """Where each packed token sits: which cache slot, which position, which row of the padded query."""

    slots: torch.Tensor      # [B] cache slot of each sequence
    tok_seq: torch.Tensor    # [N] sequence index of each token
    tok_row: torch.Tensor    # [N] index of the token within its sequence's new run
    positions: torch.Tensor  # [N] absolute position of each token
    mask: torch.Tensor | None  # [B, 1, Tq, Tk] True where a query may attend; None: see `causal`
    causal: bool             # without a mask: plain causal (True) or attend to everything (False)
    kv_len: int              # Tk
    q_len: int               # Tq
    slot_range: tuple[int, int] | None  # slots form [a, b): read the cache as a view, not a gather
    single: tuple[int, int] | None = None  # (slot, start) when the batch is one sequence at a known start
    # (slot, start, new tokens) of each sequence when a prompt runs beside others: each attends on its own,
    # instead of every sequence padded to the longest (B x Tq x Tk scores); with the sliding window
    ragged: tuple[tuple[int, int, int], ...] | None = None
    window: int | None = None
    remake: Callable[[int | None], AttnBatch] | None = None  # the same tokens under another sliding window
    graph_slot: int | None = None  # graph_decode's slot: one sequence, its position on the device
    variants: dict = field(default_factory=dict)

    def for_window(self, window: int | None) -> AttnBatch:
        """This batch for a layer whose sliding window is `window` (built once per step and window)."""
        if window == self.window:
            return self
        if window not in self.variants:
            self.variants[window] = self.remake(window)
        return self.variants[window]

    @classmethod
    def build(cls, slots: list[int], starts: list[int], q_lens: list[int], device: torch.device,
              sliding_window: int | None = None, per_sequence: bool = False) -> AttnBatch:
        """starts[b] tokens of sequence b are already cached; q_lens[b] new ones follow them. per_sequence: several
        sequences attend one by one even in decode (batch-invariant mode), never padded to the longest."""
        B = len(slots)
        tok_seq = torch.repeat_interleave(torch.arange(B), torch.tensor(q_lens))
        tok_row = torch.cat([torch.arange(n) for n in q_lens])
        positions = tok_row + torch.tensor(starts)[tok_seq]
        q_len, kv_len = max(q_lens), max(s + n for s, n in zip(starts, q_lens))
        mask, causal, ragged = None, False, None
        window_binds = sliding_window is not None and kv_len > sliding_window
        if B == 1 and not window_binds and (q_len == 1 or starts[0] == 0):
            causal = q_len > 1  # one sequence: decode sees everything, a fresh prompt is plain causal
        elif B > 1 and (q_len > 1 or per_sequence) and all(s == 0 or n == 1 for s, n in zip(starts, q_lens)):
            ragged = tuple(zip(slots, starts, q_lens))
        else:
            q_pos = torch.tensor(starts)[:, None] + torch.arange(q_len)[None, :]  # [B, Tq]
            k_pos = torch.arange(kv_len)
            mask = k_pos[None, None, :] <= q_pos[:, :, None]                        # causal, [B, Tq, Tk]
            if sliding_window is not None:
                mask &= q_pos[:, :, None] - k_pos[None, None, :] < sliding_window
            mask = mask[:, None].to(device)
        # One host-to-device copy for the three index vectors.
        idx = torch.cat([tok_seq, tok_row, positions, torch.tensor(slots)]).to(device)
        tok_seq, tok_row, positions, slots_t = idx.split([len(tok_seq)] * 3 + [B])
        contiguous = slots == list(range(slots[0], slots[0] + B))
        return cls(slots=slots_t, tok_seq=tok_seq, tok_row=tok_row, positions=positions, mask=mask,
                   causal=causal, kv_len=kv_len, q_len=q_len,
                   slot_range=(slots[0], slots[0] + B) if contiguous else None,
                   single=(slots[0], starts[0]) if B == 1 else None, ragged=ragged, window=sliding_window,
                   remake=lambda w: cls.build(slots, starts, q_lens, device, w))

    @classmethod
    def full(cls, B: int, T: int, device: torch.device, sliding_window: int | None = None) -> AttnBatch:
        """B sequences of T tokens from position 0 and no KV cache (training, scoring): the packed tokens
        are the [B, T] batch in row-major order."""
        rows = torch.arange(T, device=device)
        mask = None
        if sliding_window is not None and T > sliding_window:
            d = rows[:, None] - rows[None, :]                                    # [Tq, Tk] query - key
            mask = ((d >= 0) & (d < sliding_window))[None, None]
        seqs = torch.arange(B, device=device)
        return cls(slots=seqs, tok_seq=seqs.repeat_interleave(T), tok_row=rows.repeat(B), positions=rows.repeat(B),
                   mask=mask, causal=mask is None, kv_len=T, q_len=T, slot_range=None, window=sliding_window,
                   remake=lambda w: cls.full(B, T, device, w))

    @classmethod
    def graph_decode(cls, slot: int, positions: torch.Tensor, max_len: int,
                     sliding_window: int | None = None) -> AttnBatch:
        """A decode step of one sequence whose position lives on the device (for CUDA graphs): the
        attention spans the whole slot and a mask, computed from `positions` on the device, cuts it."""
        dev = positions.device
        k_pos = torch.arange(max_len, device=dev)
        mask = k_pos[None, :] <= positions[:, None]                       # [1, Tk]
        if sliding_window is not None:
            mask &= positions[:, None] - k_pos[None, :] < sliding_window
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        return cls(slots=zero + slot, tok_seq=zero, tok_row=zero, positions=positions, mask=mask[:, None, None],
                   causal=False, kv_len=max_len, q_len=1, slot_range=(slot, slot + 1), window=sliding_window,
                   remake=lambda w: cls.graph_decode(slot, positions, max_len, w), graph_slot=slot)


_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_backends(device: torch.device):
    # cuDNN attention rebuilds its plan whenever the KV length changes (every decode step): ~10 ms of CPU
    # per call measured on an H100. The flash and memory-efficient kernels have no such cost.
    return sdpa_kernel(_NO_CUDNN) if device.type == "cuda" else nullcontext()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (transformers uses five); it computes in fp32 and rounds once, so bf16 is as close.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """The architecture's norm: RMSNorm, or LayerNorm with bias (cfg.layer_norm)."""
    return nn.LayerNorm(dim, eps=cfg.rms_norm_eps) if cfg.layer_norm else RMSNorm(dim, cfg.rms_norm_eps)


class Rotary(nn.Module):
    """cos/sin tables from positions. The frequencies are computed on the CPU, as transformers does, and
    cached per device rather than kept as a buffer, so a model built on the meta device needs no fix-up."""

    def __init__(self, head_dim: int, theta: float, scaling: tuple = (), max_pos: int = 0):
        super().__init__()
        with torch.device("cpu"):  # not the meta device a model is built on
            self.table = rope_table(head_dim, theta, scaling, max_pos)
        self._inv_freq = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                tok_seq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions, tok_seq [N] (tok_seq: the token's sequence; None: one sequence) -> cos, sin [N, D]."""
        dev, t = positions.device, self.table
        if dev not in self._inv_freq:
            self._inv_freq[dev] = t.inv_freq.to(dev)
        freqs = positions[:, None].float() * self._inv_freq[dev][None, :]  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                              # [N, D]
        cos, sin = emb.cos(), emb.sin()
        if t.long_scale is not None:  # longrope: the scale by the length of each token's sequence
            last = positions.max() if tok_seq is None else \
                torch.zeros_like(positions).scatter_reduce_(0, tok_seq, positions, "amax")[tok_seq]  # [N]
            scale = torch.where(last >= t.switch_at, t.long_scale, t.scale)
            cos, sin = cos * scale[..., None], sin * scale[..., None]
        elif t.scale != 1.0:
            cos, sin = cos * t.scale, sin * t.scale
        return cos.to(dtype), sin.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]; cos, sin [N, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, D, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        qkv_bias = bias or cfg.qkv_bias
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv * D, bias=qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv * D, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=bias)
        self.sinks = nn.Parameter(torch.empty(self.n_heads)) if cfg.attention_sinks else None
        self.qk_whole = cfg.qk_norm_whole  # one norm over the whole projection (OLMoE), else per head (Qwen3)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.n_heads * D if self.qk_whole else D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.n_kv * D if self.qk_whole else D, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projections, q/k norms and RoPE: x [N, H] -> q [N, Hq, D], k and v [N, Hkv, D]."""
        N, D = x.shape[0], self.head_dim
        q, k = self.q_proj(x), self.k_proj(x)      # [N, Hq*D], [N, Hkv*D]
        if hasattr(self, "q_norm") and self.qk_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(N, self.n_heads, D), k.view(N, self.n_kv, D)  # [N, Hq, D], [N, Hkv, D]
        v = self.v_proj(x).view(N, self.n_kv, D)
        q, k = self._norm_rope(q, k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttnBatch,
                kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        N, D = x.shape[0], self.head_dim
        q, k, v = self.project(x, rope)

        if kv is None:
            return self.o_proj(self._uncached(q, k, v, batch).reshape(N, self.n_heads * D))
        k_cache, v_cache = kv                        # [slots, max_len, Hkv, D]
        if batch.single is not None:
            return self.o_proj(self._single(q, k, v, k_cache, v_cache, batch).reshape(N, self.n_heads * D))
        if batch.ragged is not None:
            return self.o_proj(self._ragged(q, k, v, k_cache, v_cache, batch).reshape(N, self.n_heads * D))
        if batch.graph_slot is not None and self.sinks is None and fused_ops.decode_attention_runs(q, k_cache):
            s = batch.graph_slot  # the cache write and the attention in two launches
            o = fused_ops.decode_attention(q[0], k[0], v[0], k_cache[s], v_cache[s], batch.positions, batch.window)
            return self.o_proj(o.reshape(N, self.n_heads * D))
        tok_slot = batch.slots[batch.tok_seq]
        k_cache[tok_slot, batch.positions] = k
        v_cache[tok_slot, batch.positions] = v
        if batch.slot_range is not None:
            a, b = batch.slot_range
            K, V = k_cache[a:b, :batch.kv_len], v_cache[a:b, :batch.kv_len]  # views: no copy
        else:
            K, V = k_cache[batch.slots, :batch.kv_len], v_cache[batch.slots, :batch.kv_len]

        B = batch.slots.shape[0]
        Q = q.new_zeros(B, batch.q_len, self.n_heads, D)                     # [B, Tq, Hq, D]
        Q[batch.tok_seq, batch.tok_row] = q
        O = self._attend(Q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), batch.mask,
                         batch.causal, self.n_heads != self.n_kv)  # [B, Hq, Tq, D]
        o = O.transpose(1, 2)[batch.tok_seq, batch.tok_row]                  # [N, Hq, D]
        return self.o_proj(o.reshape(N, self.n_heads * D))

    def _norm_rope(self, q, k, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-head q/k norms (Qwen3) and RoPE: q [N, Hq, D], k [N, Hkv, D]; one launch each on CUDA."""
        per_head = hasattr(self, "q_norm") and not self.qk_whole
        if fused_ops.norm_rope_runs(q, rope[0]):
            norms = (self.q_norm, self.k_norm) if per_head else (None, None)
            return tuple(fused_ops.norm_rope(t, norm, *rope) for t, norm in zip((q, k), norms))
        if per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        return rotate(q, *rope), rotate(k, *rope)

    def _uncached(self, q, k, v, batch: AttnBatch) -> torch.Tensor:
        """No KV cache: the packed tokens are B rows of Tq (AttnBatch.full). -> [N, Hq, D]"""
        T = batch.q_len
        B = q.shape[0] // T
        # K/V heads repeated rather than enable_gqa: every SDPA backend takes equal head counts, backward included
        k, v = (t.repeat_interleave(self.n_heads // self.n_kv, dim=1) for t in (k, v))  # [N, Hq, D]
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, Hq, T, D]
        O = self._attend(q, k, v, batch.mask, batch.causal, False)
        return O.transpose(1, 2).reshape(B * T, self.n_heads, self.head_dim)

    def _single(self, q, k, v, k_cache, v_cache, batch: AttnBatch) -> torch.Tensor:
        """One sequence: cache writes are slices and the query needs no padding. -> [N, Hq, D]"""
        slot, start = batch.single
        mask = batch.mask[0] if batch.mask is not None else None
        return self._one(q, k, v, k_cache, v_cache, slot, start, mask, batch.causal)

    def _ragged(self, q, k, v, k_cache, v_cache, batch: AttnBatch) -> torch.Tensor:
        """Each sequence on its own (a prompt from position 0, or one decode token). -> [N, Hq, D]"""
        out, o = [], 0
        for slot, start, n in batch.ragged:
            mask, causal, w = None, n > 1, batch.window
            if w is not None and start + n > w:  # the window binds: causal and within w, as a mask
                q_pos = torch.arange(start, start + n, device=q.device)[:, None]
                k_pos = torch.arange(start + n, device=q.device)[None, :]
                mask, causal = ((k_pos <= q_pos) & (q_pos - k_pos < w))[None], False  # [1, n, Tk]
            out.append(self._one(q[o:o + n], k[o:o + n], v[o:o + n], k_cache, v_cache, slot, start, mask, causal))
            o += n
        return torch.cat(out)

    def _one(self, q, k, v, k_cache, v_cache, slot: int, start: int, mask, causal: bool) -> torch.Tensor:
        """n new tokens of the sequence in `slot` from position `start`: written to the cache, attending to it
        (slices and views, no padding). q [n, Hq, D], k/v [n, Hkv, D], mask [1, n, Tk] or None -> [n, Hq, D]"""
        end = start + q.shape[0]
        k_cache[slot, start:end] = k
        v_cache[slot, start:end] = v
        K, V = k_cache[slot, :end], v_cache[slot, :end]  # [Tk, Hkv, D] views
        O = self._attend(q.transpose(0, 1)[None], K.transpose(0, 1)[None], V.transpose(0, 1)[None],
                         mask if mask is None else mask[None], causal, self.n_heads != self.n_kv)
        return O[0].transpose(0, 1)

    def _attend(self, q, k, v, mask, causal: bool, gqa: bool) -> torch.Tensor:
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> [B, Hq, Tq, D]: SDPA, or with sinks their own softmax."""
        if self.sinks is not None:
            return sink_attention(q, k, v, mask, causal, self.sinks)
        with sdpa_backends(q.device):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoe(nn.Module):
    """Router plus a handle to the expert backend (a plain object, so it is not part of the module tree).
    The router is cfg.router's (models/routers.py); an architecture may set `shared_experts` (a module every
    token runs, added to the routed experts' output)."""

    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertBackend):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router_bias)
        self.experts = experts
        self.router = make_router(cfg)
        self.shared_experts = None

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed experts of each token: x [N, H] -> ids, weights [N, K]."""
        return self.router(self.gate(x), self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.select(x)  # [N, K] each
        out = self.experts(self.layer, x, ids, weights)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertBackend, attention: type[nn.Module] = Attention):
        super().__init__()
        self.self_attn = attention(cfg)
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        if layer in cfg.dense_layers:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size)
        else:
            self.mlp = SparseMoe(cfg, layer, experts)

    def forward(self, x, rope, batch: AttnBatch, kv) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoeTransformer(nn.Module):
    """Decoder-only MoE language model over packed tokens. Holds every weight except the routed experts."""

    def __init__(self, cfg: ModelConfig, experts: ExpertBackend, attention: type[nn.Module] = Attention):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, experts, attention) for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        rope_dim = cfg.qk_rope_head_dim if cfg.kv_lora_rank else cfg.head_dim  # MLA rotates a part of each head
        self.rotary = Rotary(rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.experts = experts
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, batch: AttnBatch, kv_cache=None) -> torch.Tensor:
        """tokens [N] -> final hidden states [N, H]; kv_cache[i] is layer i's (k, v); None: no cache, and
        `batch` is an AttnBatch.full."""
        x = self.embed_tokens(tokens)
        rope = self.rotary(batch.positions, x.dtype, batch.tok_seq)
        windows = self.cfg.layer_windows
        for i, layer in enumerate(self.layers):
            b = batch.for_window(windows[i]) if windows else batch
            x = layer(x, rope, b, None if kv_cache is None else kv_cache[i])
        return self.norm(x)

    def rerun_from_start(self, cached: int, total: int) -> bool:
        """longrope: a sequence whose step takes it past original_max_position_embeddings re-runs from position
        0, its earlier layers' states having been computed at the short scale (transformers' generate does so)."""
        t = self.rotary.table
        return t.long_scale is not None and 0 < cached <= t.switch_at < total

    def set_experts(self, experts: ExpertBackend) -> None:
        """Swap the expert backend (e.g. from all-local to offloaded) without touching the weights."""
        self.experts = experts
        for m in self.modules():
            if isinstance(m, SparseMoe):
                m.experts = experts

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, V]
