"""Decode attention on the CPU over the host KV cache (MoE-Lightning, arXiv 2411.11217): one new token per sequence,
and the forms an attention module takes there (HeadsForm: grouped-query heads; LatentForm: DeepSeek's MLA).

Legend: B = sequences of the micro-batch, Hq/Hkv = query/key-value heads, D = head dim, P = arena positions,
T = cached positions, R = MLA's latent rank, Dr = its rope key dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.models.sinks import sink_attention
from moeflow.pipeline.native import KINDS, NativeAttention


def cpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, runs: list[int], starts: list[int],
                         window: int | None = None, native: NativeAttention | None = None,
                         threads: int = 1, out: torch.Tensor | None = None,
                         scale: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Write each sequence's new k/v at its position of its run, then attend over the run (the last `window`
    positions): by the native kernel where given (one call, the writes included), else in one PyTorch call
    padded to the longest context.

    q [B, Hq, D], k/v [B, Hkv, D], k_cache/v_cache [P, Hkv, D] (host arenas; a run starts at runs[b]);
    out: where the native kernel writes (fp32 or bf16, e.g. pinned for the copy back); scale: the scores' (default
    D^-0.5); sinks [Hq]: a logit per head that joins each softmax (GPT-OSS) -> [B, Hq, D] in q's dtype."""
    if native is not None and native.supports(k_cache):
        if out is None or out.dtype not in KINDS:
            out = torch.empty(q.shape, dtype=q.dtype if q.dtype in KINDS else torch.float32)
        i32 = [torch.tensor(x, dtype=torch.int32) for x in (runs, starts)]
        return native(q, k_cache, v_cache, *i32, window, threads, k, v, out, scale=scale, sinks=sinks).to(q.dtype)
    run, pos = torch.tensor(runs), torch.tensor(starts)
    k_cache[run + pos] = k
    v_cache[run + pos] = v
    T = max(starts) + 1
    k_pos = torch.arange(T)
    idx = run[:, None] + torch.minimum(k_pos[None, :], pos[:, None])        # [B, T] past the end: a valid row
    K, V = k_cache[idx], v_cache[idx]                                        # [B, T, Hkv, D]
    mask = k_pos[None, :] <= pos[:, None]                                     # [B, T]
    if window is not None:
        mask &= pos[:, None] - k_pos[None, :] < window
    if sinks is not None:  # the sinks' softmax (its scale D^-0.5, as the model's)
        return sink_attention(q[:, :, None], K.transpose(1, 2), V.transpose(1, 2), mask[:, None, None], False,
                              sinks)[:, :, 0]
    o = F.scaled_dot_product_attention(q[:, :, None], K.transpose(1, 2), V.transpose(1, 2),
                                       attn_mask=mask[:, None, None], enable_gqa=q.shape[1] != k.shape[1],
                                       scale=scale)
    return o[:, :, 0]                                                         # [B, Hq, D]


class HeadsForm:
    """Grouped-query attention on the CPU as the model computes it: its q/k/v heads, K and V arenas apart."""

    shared_kv = False  # K and V rows in one arena

    def __init__(self, attn):
        self.attn, self.scale = attn, None
        sinks = getattr(attn, "sinks", None)  # [Hq] (GPT-OSS) or None; the CPU reads a host copy
        self.sinks = None if sinks is None else sinks.detach().to("cpu", torch.float32)

    def inputs(self, h: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [b, H] -> q [b, Hq, D], the new k and v rows [b, Hkv, D]."""
        return self.attn.project(h, rope)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """The kernel's output [b, Hq, D] -> the o projection's input [b, Hq x D]."""
        return o.reshape(o.shape[0], -1)

    def rows(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """A prefill's cache rows (the attention's own cache tensors, [N, Hkv, D] each) -> each arena's rows."""
        return parts


class LatentForm(HeadsForm):
    """MLA in the latent space (the paper's decode form): the query absorbs kv_b_proj's key part and scores rows
    [latent | k_rot] of one arena, read as keys and as values (the values' last Dr dims are dropped), then the
    latent output goes through the value part. One KV head of R + Dr: every query head reads each row once."""

    shared_kv = True

    def __init__(self, attn):
        self.attn, self.scale, self.sinks = attn, attn.scale, None

    def inputs(self, h, rope):
        q, latent, k_rot = self.attn.project(h, rope)
        row = torch.cat((latent, k_rot), dim=-1)[:, None]                           # [b, 1, R + Dr]
        return self.attn.latent_query(q), row, row                                  # q [b, Hq, R + Dr]

    def output(self, o):
        return self.attn.latent_output(o[..., :self.attn.rank]).reshape(o.shape[0], -1)  # [b, Hq x Dv]

    def rows(self, parts):
        return [torch.cat(parts, dim=-1)[:, None]]                                   # [N, 1, R + Dr]


def cpu_form(attn) -> HeadsForm:
    """The form attention module `attn` takes on the CPU (LatentForm for MLA)."""
    from moeflow.models.mla import MlaAttention

    return LatentForm(attn) if isinstance(attn, MlaAttention) else HeadsForm(attn)
