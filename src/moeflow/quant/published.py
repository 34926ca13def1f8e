"""Quantized checkpoints as published: GPTQ and AWQ (GEMM) linear layers read from an HF folder and dequantized.

GPTQ (`quantization_config` or quantize_config.json: bits 4/8, group_size, desc_act, sym): per linear layer
  qweight int32 [in * bits / 32, out]  codes packed along the input dimension, lowest bits first
  qzeros  int32 [G, out * bits / 32]   zero points packed along the output dimension, stored minus one
  scales  fp16  [G, out]               g_idx int32 [in]: each input channel's group (act order permutes them)
  w[o, i] = (q[i, o] - (z[g_idx[i], o] + 1)) * s[g_idx[i], o]
AWQ GEMM (bits 4): qweight int32 [in, out / 8] and qzeros int32 [in / g, out / 8], eight codes a word in the
order 0 2 4 6 1 3 5 7 (nibble k holds column ORDER[k]), scales fp16 [in / g, out]; w[o, i] = (q - z) * s.

Non-expert layers load dequantized in the model's dtype; experts are requantized round-to-nearest into moeflow's
block format (quant/format.py) with the checkpoint's bits and group size, asymmetric, fp16 scales: moeflow's
groups run along H for down as well, where the published ones run along I, so a second rounding is unavoidable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow import MoeflowError
from moeflow.config import read_json
from moeflow.quant.format import QuantSpec

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of eight is nibble AWQ_REVERSE_ORDER[j]


@dataclass(frozen=True)
class PublishedQuant:
    method: str       # gptq | awq
    bits: int
    group_size: int   # -1: one group over the whole input
    desc_act: bool = False
    sym: bool = True
    zero_offset: int = 1  # GPTQ's (v1) zero points are stored minus one; v2 and AWQ store them as they are

    @staticmethod
    def read(path: Path, hf: dict) -> PublishedQuant | None:
        """The folder's quantization, or None for a dense checkpoint; one line naming what is not supported."""
        qc = hf.get("quantization_config")
        if qc is None and (path / "quantize_config.json").exists():
            qc = read_json(path / "quantize_config.json") | {"quant_method": "gptq"}
        if qc is None:
            return None
        method, bits = str(qc.get("quant_method", "gptq")).lower(), int(qc.get("bits", qc.get("w_bit", 0)))
        group = int(qc.get("group_size", qc.get("q_group_size", -1)))
        if method == "gptq":
            if bits not in (4, 8):
                raise MoeflowError(f"GPTQ with {bits} bits is not supported; moeflow reads 4 and 8")
            offset = 0 if qc.get("checkpoint_format") == "gptq_v2" else 1
            return PublishedQuant("gptq", bits, group, bool(qc.get("desc_act")), bool(qc.get("sym", True)), offset)
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if bits != 4 or version != "gemm":
                raise MoeflowError(f"AWQ {version} with {bits} bits is not supported; moeflow reads 4-bit GEMM")
            return PublishedQuant("awq", 4, group, zero_offset=0)
        raise MoeflowError(f"quantization method {method!r} is not supported; moeflow reads GPTQ and AWQ (GEMM)")

    def spec(self) -> QuantSpec:
        """moeflow's format for the experts: the same bits and group size (128 where it is outside 32..128)."""
        group = self.group_size if 32 <= self.group_size <= 128 else 128
        return QuantSpec(self.bits, group, False, torch.float16)

    def dequantize(self, get, base: str, shape: tuple[int, int]) -> torch.Tensor:
        """The weight [out, in] fp32 of the linear layer `base` (its qweight, qzeros, scales, g_idx read by
        get(name) -> tensor or None)."""
        out_f, in_f = shape
        qweight, qzeros, scales = get(base + ".qweight"), get(base + ".qzeros"), get(base + ".scales")
        if qweight is None or qzeros is None or scales is None:
            raise MoeflowError(f"quantized layer {base!r} lacks qweight, qzeros or scales")
        scales = scales.float()
        if self.method == "awq":
            q, z = unpack_awq(qweight), unpack_awq(qzeros)         # [in, out], [G, out]
            gi = torch.arange(in_f) // (self.group_size if self.group_size > 0 else in_f)
        else:
            q, z = unpack(qweight, self.bits, 0), unpack(qzeros, self.bits, 1) + self.zero_offset
            gi = get(base + ".g_idx")
            if gi is None:
                if self.desc_act:
                    raise MoeflowError(f"GPTQ act-order (desc_act) without g_idx in {base!r} is not supported")
                gi = torch.arange(in_f) // (self.group_size if self.group_size > 0 else in_f)
            gi = gi.long()
        if tuple(q.shape) != (in_f, out_f) or tuple(scales.shape) != tuple(z.shape):
            raise MoeflowError(f"quantized layer {base!r} unpacks to {list(q.shape)}, expected {[in_f, out_f]}")
        return ((q.float() - z.float()[gi]) * scales[gi]).t().contiguous()


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words of 32 / bits codes, lowest bits first, along `dim` (0 or 1) -> uint8 codes."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    p = packed.to(torch.int32)
    v = (p.unsqueeze(dim + 1) >> shifts.view((-1, 1) if dim == 0 else (-1,))) & ((1 << bits) - 1)
    return v.flatten(dim, dim + 1).to(torch.uint8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ's [n, m / 8] int32 -> [n, m] codes, undoing its interleaved column order."""
    v = unpack(packed, 4, 1).view(packed.shape[0], -1, 8)
    return v[..., list(AWQ_REVERSE_ORDER)].flatten(1)
