"""All routed experts of a model in one tensor, each expert one contiguous block.

One block per expert means copying an expert to another device is one transfer, and one big
allocation can be pinned at once (per-expert pinned tensors waste memory to power-of-two rounding).
Block layout: [gate (I x H) | up (I x H) | down]. In host memory, down is stored transposed (I x H) so that a
range of intermediate rows r0:r1 of an expert is three contiguous runs: part of an expert can be copied to
the GPU while the CPU computes the rest (the partial outputs add up). A store on the GPU keeps down as
published (H x I): the grouped GEMM wants its second operand column-major (with a row-major one PyTorch
falls back to a per-group loop that reads the group sizes on the host, which a CUDA graph then freezes).
A quantized store (quant/format.py) holds uint8 blocks in the host layout on every device; `fmt` describes them.
"""

from __future__ import annotations

import math
import weakref

import torch

from moeflow import MoeflowError
from moeflow.config import ModelConfig
from moeflow.models.base import EXPERT_PARTS
from moeflow.experts.ffn import expert_rows  # noqa: F401  (the host layout's rows; callers import it here)
from moeflow.quant.format import ExpertFormat, QuantSpec, dequantize


class ExpertStore:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                 data: torch.Tensor | None = None, down_transposed: bool | None = None,
                 quant: QuantSpec | None = None):
        self.cfg, self.layers = cfg, cfg.moe_layers
        self.slot = {layer: i for i, layer in enumerate(self.layers)}  # model layer -> row of data
        if quant is not None and cfg.expert_bias:
            raise MoeflowError(f"quantized experts with biases ({cfg.model_type}) are not supported yet")
        self.fmt = ExpertFormat(cfg.expert_intermediate_size, cfg.hidden_size, dtype, quant)
        if cfg.expert_bias:  # biases after each block's matrices (imported here: biased.py imports this module)
            from moeflow.experts.biased import BiasedFormat

            self.fmt = BiasedFormat.of(cfg, dtype)
        # a plain block may carry the expert's biases after its matrices (cfg.expert_numel)
        shape = (len(self.layers), cfg.num_experts, self.fmt.block_numel if quant else cfg.expert_numel)
        self.data = torch.empty(shape, dtype=self.fmt.storage_dtype, device=device) if data is None else data
        assert tuple(self.data.shape) == shape, (tuple(self.data.shape), shape)  # [L, E, 3IH] or [L, E, block]
        self.down_transposed = (self.data.device.type == "cpu" or self.fmt.quantized if down_transposed is None
                                else down_transposed)
        self.pinned = False

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def expert_bytes(self) -> int:
        return self.data.shape[-1] * self.data.element_size()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the experts compute in (a quantized store's data is uint8)."""
        return self.fmt.dtype

    def set_expert(self, layer: int, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """One expert from its published matrices (gate, up [I, H], down [H, I]), quantized if the store is."""
        if self.fmt.quantized:
            self.fmt.pack(gate, up, down.t(), self.block(layer, expert))
            return
        for part, w in zip(EXPERT_PARTS, (gate, up, down)):
            self.part(layer, expert, part).copy_(w)

    def block(self, layer: int, expert: int) -> torch.Tensor:
        """[3IH] the whole expert: what one copy moves."""
        return self.data[self.slot[layer], expert]

    def part(self, layer: int, expert: int, part: str) -> torch.Tensor:
        """A view of one matrix of one expert in the published [out, in] orientation (down: a transposed view);
        dequantized (a copy) from a quantized store."""
        if self.fmt.quantized:
            w = self.fmt.rows(self.block(layer, expert), 0, self.fmt.inter)[EXPERT_PARTS.index(part)]
            return w.t() if part == "down" else w
        I, H = self.cfg.expert_intermediate_size, self.cfg.hidden_size
        i = EXPERT_PARTS.index(part)
        flat = self.data[self.slot[layer], expert, i * I * H:(i + 1) * I * H]
        if part != "down":
            return flat.view(I, H)
        return flat.view(I, H).t() if self.down_transposed else flat.view(H, I)

    def gate_up(self, layer: int) -> torch.Tensor:
        """[E, 2I, H] view of one layer's fused gate and up projections (dequantized: a copy)."""
        I, H = self.cfg.expert_intermediate_size, self.cfg.hidden_size
        if self.fmt.quantized:
            return torch.cat([self._dequantized(layer, i) for i in (0, 1)], dim=1)
        return self.data[self.slot[layer], :, :2 * I * H].view(-1, 2 * I, H)

    def down_t(self, layer: int) -> torch.Tensor:
        """[E, I, H] view of one layer's down projections, transposed (row-major on the host, column-major on
        the GPU; dequantized: a copy)."""
        I, H = self.cfg.expert_intermediate_size, self.cfg.hidden_size
        if self.fmt.quantized:
            return self._dequantized(layer, 2)
        d = self.data[self.slot[layer], :, 2 * I * H:3 * I * H]
        return d.view(-1, I, H) if self.down_transposed else d.view(-1, H, I).transpose(1, 2)

    def bias(self, layer: int) -> torch.Tensor:
        """[E, 2I + H] view of one layer's gate, up and down biases (cfg.expert_bias), after the matrices."""
        I, H = self.cfg.expert_intermediate_size, self.cfg.hidden_size
        return self.data[self.slot[layer], :, 3 * I * H:]

    def _dequantized(self, layer: int, i: int) -> torch.Tensor:
        """[E, I, H] matrix i (gate, up, down_t) of every expert of a layer, dequantized."""
        fmt = self.fmt
        rec = self.data[self.slot[layer]].view(-1, 3, fmt.inter, fmt.record)[:, i]  # [E, I, record]
        return dequantize(rec, fmt, fmt.dtype)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ExpertStore:
        """A copy on `device`, in that device's layout (a quantized store: the same blocks)."""
        if self.fmt.quantized:
            out = ExpertStore(self.cfg, dtype or self.dtype, device, quant=self.fmt.spec)
            out.data.copy_(self.data)
            return out
        out = ExpertStore(self.cfg, dtype or self.data.dtype, device)
        for layer in self.layers:
            out.gate_up(layer).copy_(self.gate_up(layer))
            out.down_t(layer).copy_(self.down_t(layer))
            if self.cfg.expert_bias:
                out.bias(layer).copy_(self.bias(layer))
        return out

    def pin(self) -> None:
        """Page-lock the store so copies from it run asynchronously at full PCIe speed. A big store is
        registered in place (cudaHostRegister: one registration, no second copy, none of the pinned allocator's
        power-of-two rounding) and unregistered when the store goes; a small one (which may share pages with
        other tensors, and a page can be registered only once) is copied into pinned memory instead."""
        if self.pinned or self.data.device.type != "cpu" or not torch.cuda.is_available():
            return
        if self.nbytes < PIN_IN_PLACE_BYTES:
            self.data = self.data.pin_memory()
        else:
            cudart, ptr = torch.cuda.cudart(), self.data.data_ptr()
            err = int(cudart.cudaHostRegister(ptr, self.nbytes, 0))
            if err != 0:
                raise RuntimeError(f"cudaHostRegister of {self.nbytes / 2**30:.1f} GiB failed with CUDA error {err}")
            # the memory may be freed and reused by the next store: a page stays registered until unregistered
            weakref.finalize(self.data, cudart.cudaHostUnregister, ptr)
        self.pinned = True


PIN_IN_PLACE_BYTES = 256 * 2**20


class HostBuffers:
    """Host tensors reused by key, grown on demand; pinned where a GPU copies to or from them (asynchronously:
    the caller keeps a buffer until those copies are done)."""

    def __init__(self, pinned: bool):
        self.pinned, self._bufs = pinned, {}

    def get(self, key, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            grown = max(n, 2 * buf.numel() if buf is not None else 0)
            buf = self._bufs[key] = torch.empty(grown, dtype=dtype, pin_memory=self.pinned)
        return buf[:n].view(shape)
