"""One expert's weights as one contiguous block: bf16/fp16/fp32 as published, or group-wise int4/int8.

Every expert is three matrices of I rows of H values in the host layout: gate [I, H], up [I, H] and down
transposed (down_t [I, H]). A quantized block stores each row as one record of bytes,

    record = [q: H * bits / 8 bytes][scales: H / g values][zero points: H / g values, asymmetric only]

quantized in groups of g consecutive values along H (for down_t: along down's output dimension), scales and zero
points in bf16 or fp16. A row w [H] dequantizes as w[h] = (q[h] - z[h // g]) * s[h // g], with z = 2^(bits-1)
when symmetric. int4 packs two values a byte, the even index in the low nibble. The block is [3, I, record], so
rows r0:r1 of an expert are three contiguous runs whatever the format: part of an expert copies in three
transfers and the CPU computes the rest, as with bf16.

Legend: I = intermediate rows, H = hidden, g = group size, G = H / g groups per row, R = rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moeflow import MoeflowError

SCALE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class QuantSpec:
    """Group-wise integer weights: bits 4 or 8, groups of group_size values sharing a scale (and, asymmetric, a
    zero point)."""

    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise MoeflowError(f"{self.bits}-bit experts are not supported; use int4 or int8")
        if not 32 <= self.group_size <= 128 or self.group_size % 2:
            raise MoeflowError(f"quantization group size {self.group_size} is not supported; use 32 to 128")
        if self.scale_dtype not in SCALE_DTYPES.values():
            raise MoeflowError(f"quantization scales in {self.scale_dtype} are not supported; use bf16 or fp16")

    @property
    def name(self) -> str:
        scale = next(k for k, v in SCALE_DTYPES.items() if v == self.scale_dtype)
        return (f"int{self.bits}-g{self.group_size}" + ("" if self.symmetric else "-asym")
                + ("" if scale == "bf16" else f"-{scale}"))

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def parse_quant(text: str | None) -> QuantSpec | None:
    """`int4`, `int8`, optionally with `-g32`..`-g128`, `-asym`, `-fp16` (e.g. int4-g128-asym); none/None: None."""
    if text is None or text in ("none", "", "bf16"):
        return None
    m = re.fullmatch(r"int(\d+)((?:-g\d+|-asym|-sym|-bf16|-fp16)*)", text)
    if not m:
        raise MoeflowError(f"--quantize {text!r}: use int4 or int8, optionally with -g32..-g128, -asym, -fp16")
    opts = m.group(2).split("-")[1:]
    group = next((int(o[1:]) for o in opts if o.startswith("g")), 64)
    scale = next((SCALE_DTYPES[o] for o in opts if o in SCALE_DTYPES), torch.bfloat16)
    return QuantSpec(int(m.group(1)), group, "asym" not in opts, scale)


class ExpertFormat:
    """The block layout of one expert (I, H) for a store: dense in `dtype`, or quantized by `spec` with `dtype`
    the compute dtype its rows dequantize to. storage_dtype and block_numel size the store's [L, E, block] tensor."""

    biased = False  # experts/biased.py BiasedFormat: biases after the matrices, the clamped SwiGLU

    def __init__(self, inter: int, hidden: int, dtype: torch.dtype, spec: QuantSpec | None = None):
        self.inter, self.hidden, self.dtype, self.spec = inter, hidden, dtype, spec
        if spec is None:
            self.storage_dtype, self.record = dtype, hidden  # record: storage elements per row
            return
        if hidden % spec.group_size:
            raise MoeflowError(f"hidden size {hidden} is not a multiple of the quantization group size "
                               f"{spec.group_size}")
        self.groups = hidden // spec.group_size
        self.q_bytes = hidden * spec.bits // 8
        self.scale_bytes = self.groups * spec.scale_dtype.itemsize
        self.storage_dtype = torch.uint8
        self.record = self.q_bytes + self.scale_bytes * (1 if spec.symmetric else 2)

    @property
    def quantized(self) -> bool:
        return self.spec is not None

    @property
    def block_numel(self) -> int:
        return 3 * self.inter * self.record

    @property
    def row_bytes(self) -> int:
        """Bytes of one intermediate row of all three matrices."""
        return 3 * self.record * self.storage_dtype.itemsize

    @property
    def block_bytes(self) -> int:
        return self.inter * self.row_bytes

    def runs(self, block: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        """Rows r0:r1 of a block [block_numel] as stored: (gate, up, down_t) runs [R, record], each contiguous."""
        m = block.view(3, self.inter, self.record)
        return m[0, r0:r1], m[1, r0:r1], m[2, r0:r1]

    def clear(self, block: torch.Tensor, r: int) -> None:
        """A slot that got rows r:I only: gate rows 0:r zeroed, so the whole expert's FFN there is the part's
        (silu(0) = 0; a quantized row zeroed has scale 0)."""
        self.runs(block, 0, r)[0].zero_()

    def rows(self, block: torch.Tensor, r0: int, r1: int, dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, ...]:
        """Rows r0:r1 as weights: (gate, up, down_t) [R, H] each; views of a dense block, dequantized (in `dtype`,
        default the format's) from a quantized one."""
        if self.spec is None:
            return self.runs(block, r0, r1)
        w = dequantize(block.view(3, self.inter, self.record)[:, r0:r1], self, dtype or self.dtype)  # [3, R, H]
        return w[0], w[1], w[2]

    def pack(self, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor, out: torch.Tensor) -> None:
        """Write one expert (gate, up, down_t [I, H] each) into the block `out` [block_numel]."""
        m = out.view(3, self.inter, self.record)
        for i, w in enumerate((gate, up, down_t)):
            m[i].copy_(w if self.spec is None else quantize(w, self))


def expert_bytes(inter: int, hidden: int, spec: QuantSpec | None, itemsize: int = 2) -> int:
    """Bytes of one expert block: quantized by spec, else dense at itemsize bytes a value."""
    if spec is None:
        return 3 * inter * hidden * itemsize
    return ExpertFormat(inter, hidden, torch.bfloat16, spec).block_bytes


def quantize(w: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """Round-to-nearest per group: w [R, H] -> records [R, record] uint8."""
    spec, R = fmt.spec, w.shape[0]
    g = w.float().reshape(R, fmt.groups, spec.group_size)  # [R, G, g]
    if spec.symmetric:
        zero = torch.full((R, fmt.groups), float(1 << (spec.bits - 1)), device=w.device)
        half = (1 << (spec.bits - 1)) - 1  # int4: codes -7..7 around the zero point 8 (8 keeps -8 unused)
        scale = g.abs().amax(-1) / half
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = (hi - lo) / spec.qmax
        zero = torch.where(scale > 0, (-lo / scale.clamp(min=1e-30)).round(), torch.zeros_like(lo)).clamp(0, spec.qmax)
    scale = scale.to(spec.scale_dtype)  # rounded first: the codes are chosen against the scale that is stored
    s = scale.float()
    q = torch.where(s[..., None] > 0, (g / s.clamp(min=1e-30)[..., None]).round() + zero[..., None],
                    zero[..., None]).clamp(0, spec.qmax).to(torch.uint8).reshape(R, -1)  # [R, H]
    if spec.bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)  # [R, H/2]
    parts = [q, scale.view(torch.uint8)]
    if not spec.symmetric:
        parts.append(zero.to(spec.scale_dtype).view(torch.uint8))
    return torch.cat(parts, dim=1)


def dequantize(rec: torch.Tensor, fmt: ExpertFormat, dtype: torch.dtype) -> torch.Tensor:
    """Records [..., R, record] uint8 -> weights [..., R, H] in dtype (fp32 arithmetic, one rounding)."""
    spec = fmt.spec
    q = rec[..., :fmt.q_bytes]
    if spec.bits == 4:
        q = torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2)  # [..., R, H]
    sd = spec.scale_dtype
    scale = rec[..., fmt.q_bytes:fmt.q_bytes + fmt.scale_bytes].contiguous().view(sd).float()  # [..., R, G]
    if spec.symmetric:
        zero = float(1 << (spec.bits - 1))
    else:
        zero = rec[..., fmt.q_bytes + fmt.scale_bytes:].contiguous().view(sd).float()[..., None]
    grouped = q.float().unflatten(-1, (fmt.groups, spec.group_size))  # [..., R, G, g]
    return ((grouped - zero) * scale[..., None]).flatten(-2).to(dtype)
