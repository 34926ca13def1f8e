"""Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434): keys and values come from one low-rank latent per
token plus a decoupled RoPE key shared by all heads; the KV cache keeps only those two (kv_token_shapes).

Legend: N = packed tokens, B = sequences, Tq/Tk = padded query / attended lengths, Hq = heads, R = kv_lora_rank,
Dn / Dr / Dv = the no-rope, rope and value head dims, Dqk = Dn + Dr.
A prompt expands K and V from the cached latents of the attended span (kv_b_proj); a decode step (one query per
sequence) instead attends in the latent space, kv_b_proj's key part absorbed into the query and its value part
applied after (the paper's decode form: no per-step expansion of the whole context). Both serve every AttnBatch
form the engine builds: one sequence, ragged prompts, padded with a mask, the CUDA-graph decode mask, no cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.config import ModelConfig
from moeflow.models.layers import AttnBatch, RMSNorm, rotate, sdpa_backends
from moeflow.models.rope import softmax_scale_mscale

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: the published code leaves them at the default eps


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (x0, x1), (x2, x3)...; the output lays the pairs' first then second halves out
    (a fixed permutation of q and k alike, so q.k is unchanged). x [N, h, Dr]; cos, sin [N, Dr]."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class MlaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, bias, qr = cfg.hidden_size, cfg.attention_bias, cfg.q_lora_rank
        self.n_heads, self.rank = cfg.num_attention_heads, cfg.kv_lora_rank
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        dqk = self.dn + self.dr
        if qr is None:
            self.q_proj = nn.Linear(H, self.n_heads * dqk, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, qr, bias=bias)
            self.q_a_layernorm = RMSNorm(qr, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(qr, self.n_heads * dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.rank + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.dv, H, bias=bias)
        self.scale = dqk ** -0.5 * softmax_scale_mscale(cfg.rope_scaling)
        self.rotate = rotate_pairs if cfg.rope_interleave else rotate

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> q [N, Hq, Dqk] (RoPE on its last Dr), the latent [N, R] (normed) and k_rot [N, Dr]."""
        N = x.shape[0]
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(N, self.n_heads, -1).split([self.dn, self.dr], dim=-1)  # [N, Hq, Dn], [N, Hq, Dr]
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.dr], dim=-1)   # [N, R], [N, Dr]
        latent = self.kv_a_layernorm(latent)
        q = torch.cat((q_nope, self.rotate(q_rot, *rope)), dim=-1)                       # [N, Hq, Dqk]
        return q, latent, self.rotate(k_rot[:, None], *rope)[:, 0]

    def latent_query(self, q: torch.Tensor) -> torch.Tensor:
        """q [..., Hq, Dqk] -> [..., Hq, R + Dr]: its no-rope part through kv_b_proj's key part (q_nope W_uk), so
        that it scores the cached [latent | k_rot] rows directly."""
        W = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.rank)
        q_nope, q_rot = q.split([self.dn, self.dr], dim=-1)
        return torch.cat((torch.einsum("...hd,hdr->...hr", q_nope, W[:, :self.dn]), q_rot), dim=-1)

    def latent_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """The attention's output in the latent space [..., Hq, R] -> per head values [..., Hq, Dv] (W_uv)."""
        W = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.rank)
        return torch.einsum("...hr,hvr->...hv", o_lat, W[:, self.dn:])

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttnBatch,
                kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        N = x.shape[0]
        q, latent, k_rot = self.project(x, rope)
        with sdpa_backends(x.device):
            if kv is None:
                o = self._uncached(q, latent, k_rot, batch)
            elif batch.single is not None:
                slot, start = batch.single
                mask = batch.mask[0] if batch.mask is not None else None
                o = self._one(q, latent, k_rot, kv, slot, start, mask, batch.causal)
            elif batch.ragged is not None:
                o = self._ragged(q, latent, k_rot, kv, batch)
            else:
                o = self._padded(q, latent, k_rot, kv, batch)
        return self.o_proj(o.reshape(N, self.n_heads * self.dv))

    def expand(self, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [..., R], k_rot [..., Dr] -> K [..., Hq, Dqk], V [..., Hq, Dv]."""
        kv = self.kv_b_proj(latent).unflatten(-1, (self.n_heads, self.dn + self.dv))
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k_rot = k_rot.unsqueeze(-2).expand(*k_nope.shape[:-1], self.dr)
        return torch.cat((k_nope, k_rot), dim=-1), v

    def _absorbed(self, q, C, Kr, mask) -> torch.Tensor:
        """One query per sequence against the cached latents: q [B, 1, Hq, Dqk], C [B, Tk, R], Kr [B, Tk, Dr],
        mask [B, 1, 1, Tk] or None -> [B, 1, Hq, Dv]. q_nope . (W_uk c) = (q_nope W_uk) . c, and likewise for V."""
        q_lat, q_rot = self.latent_query(q[:, 0]).split([self.rank, self.dr], dim=-1)   # [B, Hq, R], [B, Hq, Dr]
        scores = (torch.einsum("bhr,btr->bht", q_lat, C) + torch.einsum("bhd,btd->bht", q_rot, Kr)) * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0], float("-inf"))                      # [B, Hq, Tk]
        p = torch.softmax(scores.float(), dim=-1).to(C.dtype)
        o_lat = torch.einsum("bht,btr->bhr", p, C)                                       # [B, Hq, R]
        return self.latent_output(o_lat)[:, None]                                        # [B, 1, Hq, Dv]

    def _attend(self, q, K, V, mask, causal: bool) -> torch.Tensor:
        """q [B, Tq, Hq, Dqk], K [B, Tk, Hq, Dqk], V [B, Tk, Hq, Dv], mask [B, 1, Tq, Tk] -> [B, Tq, Hq, Dv]."""
        O = F.scaled_dot_product_attention(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2),
                                           attn_mask=mask, is_causal=causal, scale=self.scale)
        return O.transpose(1, 2)

    def _uncached(self, q, latent, k_rot, batch: AttnBatch) -> torch.Tensor:
        """No KV cache: the packed tokens are B rows of Tq (AttnBatch.full). -> [N, Hq, Dv]"""
        T = batch.q_len
        B = q.shape[0] // T
        K, V = self.expand(latent, k_rot)
        o = self._attend(q.view(B, T, self.n_heads, -1), K.view(B, T, self.n_heads, -1),
                         V.view(B, T, self.n_heads, -1), batch.mask, batch.causal)
        return o.reshape(B * T, self.n_heads, self.dv)

    def _one(self, q, latent, k_rot, kv, slot: int, start: int, mask, causal: bool) -> torch.Tensor:
        """n new tokens of the sequence in `slot` from `start`: cached, then attending to the slot's span.
        mask [1, n, Tk] or None -> [n, Hq, Dv]"""
        end = start + q.shape[0]
        kv[0][slot, start:end] = latent
        kv[1][slot, start:end] = k_rot
        if q.shape[0] == 1:
            return self._absorbed(q[None], kv[0][slot, None, :end], kv[1][slot, None, :end],
                                  mask if mask is None else mask[None])[0]
        K, V = self.expand(kv[0][slot, :end], kv[1][slot, :end])  # [Tk, Hq, D]
        return self._attend(q[None], K[None], V[None], mask if mask is None else mask[None], causal)[0]

    def _ragged(self, q, latent, k_rot, kv, batch: AttnBatch) -> torch.Tensor:
        """Each sequence on its own (a prompt from position 0, or one decode token). -> [N, Hq, Dv]"""
        out, o = [], 0
        for slot, start, n in batch.ragged:
            mask, causal, w = None, n > 1, batch.window
            if w is not None and start + n > w:  # the window binds: causal and within w, as a mask
                q_pos = torch.arange(start, start + n, device=q.device)[:, None]
                k_pos = torch.arange(start + n, device=q.device)[None, :]
                mask, causal = ((k_pos <= q_pos) & (q_pos - k_pos < w))[None], False  # [1, n, Tk]
            out.append(self._one(q[o:o + n], latent[o:o + n], k_rot[o:o + n], kv, slot, start, mask, causal))
            o += n
        return torch.cat(out)

    def _padded(self, q, latent, k_rot, kv, batch: AttnBatch) -> torch.Tensor:
        """Sequences padded to [B, Tq] against [B, Tk] of cache under batch.mask. -> [N, Hq, Dv]"""
        tok_slot = batch.slots[batch.tok_seq]
        kv[0][tok_slot, batch.positions] = latent
        kv[1][tok_slot, batch.positions] = k_rot
        if batch.slot_range is not None:
            a, b = batch.slot_range
            C, Kr = kv[0][a:b, :batch.kv_len], kv[1][a:b, :batch.kv_len]  # [B, Tk, R], [B, Tk, Dr]
        else:
            C, Kr = kv[0][batch.slots, :batch.kv_len], kv[1][batch.slots, :batch.kv_len]
        Q = q.new_zeros(batch.slots.shape[0], batch.q_len, self.n_heads, q.shape[-1])  # [B, Tq, Hq, Dqk]
        Q[batch.tok_seq, batch.tok_row] = q
        if batch.q_len == 1:  # decode steps (the CUDA graph's too)
            return self._absorbed(Q, C, Kr, batch.mask)[batch.tok_seq, batch.tok_row]
        K, V = self.expand(C, Kr)
        return self._attend(Q, K, V, batch.mask, batch.causal)[batch.tok_seq, batch.tok_row]
