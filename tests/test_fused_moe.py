"""The fused-MoE Triton kernels (experts/fused_moe.py, quant/triton_moe.py) against experts/ffn.py's PyTorch maths.

Tolerance: relative Frobenius error below 1e-2 in bf16/fp16 (one rounding of the intermediate, a different
accumulation order); the interpreter runs fp16 (it reads bf16 tensors wrongly), the GPU tests bf16 and fp16."""

from __future__ import annotations


import pytest
import torch
from conftest import run_interpreted

from moeflow.experts.ffn import looped_experts, quantized_experts
from moeflow.experts.fused_moe import align
from moeflow.quant.format import ExpertFormat, QuantSpec


def routing(n: int, k: int, e: int, device: str, seed: int = 0, skew: bool = True):
    """topk ids and weights [n, k]; skewed: a few experts take most tokens (several blocks each), some none."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g) + (torch.linspace(3, -3, e) if skew else 0)
    w, ids = logits.softmax(-1).topk(k)
    return ids.to(device), w.to(device)


ALIGN_CASES = [(1, 8, 128, 16), (40, 2, 6, 16), (300, 4, 16, 64), (3, 2, 2, 16), (64, 8, 128, 16), (5, 8, 256, 16)]


def check_blocks(ids: torch.Tensor, e: int, bm: int, sorted_ids, block_expert, total) -> None:
    """What the GEMMs need of an align: every routing pair exactly once in the blocks in use, each block in use
    holding pairs of its block_expert only (at least one), padding the invalid pair id M, and the padded total of
    the per-expert counts. The order of an expert's pairs across its blocks is free: a GEMM's rows are independent."""
    M, flat = ids.numel(), ids.flatten().cpu()
    sorted_ids, block_expert, total = sorted_ids.cpu().long(), block_expert.cpu().long(), int(total)
    assert sorted_ids.numel() % bm == 0 and block_expert.numel() == sorted_ids.numel() // bm
    counts = torch.bincount(flat, minlength=e)
    assert total == int(((counts + bm - 1) // bm * bm).sum()) and total <= sorted_ids.numel()
    used = sorted_ids[:total]
    assert bool((used <= M).all()) and sorted(used[used < M].tolist()) == list(range(M))  # each pair once
    assert bool((sorted_ids[total:] == M).all())
    for b in range(total // bm):
        pairs = sorted_ids[b * bm:(b + 1) * bm]
        pairs = pairs[pairs < M]
        assert pairs.numel() > 0 and bool((flat[pairs] == block_expert[b]).all()), b


@pytest.mark.parametrize("n,k,e,bm", ALIGN_CASES)
def test_align_puts_every_pair_once_in_blocks_of_one_expert(n, k, e, bm):
    ids, _ = routing(n, k, e, "cpu")
    check_blocks(ids, e, bm, *align(ids, e, bm))


def check_align(device: str) -> None:
    """The one-launch align: align()'s invariants, its padded total and block experts. Which of an expert's
    blocks a pair lands in is the atomics' order on a GPU (the interpreter runs them in order), so blocks are not
    compared with align()'s."""
    from moeflow.experts.fused_moe import align_on_device

    for n, k, e, bm in ALIGN_CASES:
        ids, _ = routing(n, k, e, device)
        want, got = align(ids, e, bm), align_on_device(ids, e, bm)
        check_blocks(ids, e, bm, *got)
        assert int(want[2]) == int(got[2]) and torch.equal(want[1], got[1]), (n, k, e, bm)


def check_dense(device: str, dtype: torch.dtype, cases=((1, 8, 16), (5, 3, 6), (70, 2, 4))) -> None:
    """fused_experts against looped_experts for decode and prefill counts (several blocks an expert, empty ones)."""
    from moeflow.experts.fused_moe import fused_experts

    g = torch.Generator().manual_seed(1)
    H, inter = 64, 48  # I not a multiple of BN: the masks
    for n, k, e in cases:
        gate_up = (torch.randn(e, 2 * inter, H, generator=g) * 0.1).to(device, dtype)
        down = (torch.randn(e, H, inter, generator=g) * 0.1).to(device, dtype)  # as published: down_t a view
        x = torch.randn(n, H, generator=g).to(device, dtype)
        ids, w = routing(n, k, e, device, seed=n)
        want = looped_experts(x, ids, w, gate_up, down.transpose(1, 2)).float()
        got = fused_experts(x, ids, w, gate_up, down.transpose(1, 2)).float()
        assert got.shape == want.shape and float((got - want).norm() / want.norm()) < 1e-2, (n, k, e)


def check_quantized(device: str, dtype: torch.dtype, specs=None, counts=(1, 20)) -> None:
    """quantized_fused_experts against quantized_experts (rows dequantized, dense FFN in x's dtype)."""
    from moeflow.quant.triton_moe import quantized_fused_experts

    g = torch.Generator().manual_seed(2)
    specs = specs or (QuantSpec(4, 64), QuantSpec(8, 32, False, torch.float16))
    H, inter, e, k = 128, 48, 6, 3
    for spec in specs:
        fmt = ExpertFormat(inter, H, dtype, spec)
        blocks = torch.empty(e, fmt.block_numel, dtype=torch.uint8)
        for b in blocks:
            fmt.pack(*(torch.randn(inter, H, generator=g) * 0.1 for _ in range(3)), b)
        blocks = blocks.to(device)
        for n in counts:
            x = torch.randn(n, H, generator=g).to(device, dtype)
            ids, w = routing(n, k, e, device, seed=n)
            want = quantized_experts(x, ids, w, blocks, fmt).float()
            got = quantized_fused_experts(x, ids, w, blocks, fmt).float()
            assert float((got - want).norm() / want.norm()) < 1e-2, (spec, n)


def test_kernels_in_the_interpreter():
    """Both kernels' logic on the CPU through TRITON_INTERPRET=1, where Triton is installed (not a dependency)."""
    code = ("import torch, test_fused_moe as t; t.check_align('cpu');"
            "t.check_dense('cpu', torch.float16, ((40, 2, 4),)); t.check_quantized('cpu', torch.float16, counts=(6,))")
    run_interpreted(code)


@pytest.mark.gpu
def test_align_on_cuda():
    check_align("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernels_match_pytorch_on_cuda(dtype):
    check_dense("cuda", dtype, ((1, 8, 128), (8, 8, 128), (5, 3, 6), (70, 2, 4), (512, 8, 16)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_fused_kernels_match_pytorch_on_cuda(dtype):
    check_quantized("cuda", dtype, (QuantSpec(4, 64), QuantSpec(4, 128, False), QuantSpec(8, 32, True, torch.float16)))


@pytest.mark.gpu
@torch.inference_mode()
@pytest.mark.parametrize("quant", [None, "int4"])
def test_fused_local_experts_decode_in_a_graph_like_the_pytorch_path(quant):
    """A tiny Qwen3 on the GPU: the fused backend is graph-safe (the decode step one CUDA graph) and its
    teacher-forced logits are the PyTorch path's, int4 too. In fp16: bf16's rounding noise alone flips tiny
    random models' greedy tokens (test_fused_ops.py)."""
    from test_fused_ops import assert_logits_close, forced_logits

    from moeflow.checkpoint import load
    from moeflow.engine.cuda_graph import DecodeGraph, PiecewiseDecodeGraph
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.experts.local import LocalExperts

    ck = load("synthetic:tiny-qwen3", device="cuda", dtype="fp16", quant=quant)
    backends = [LocalExperts(ck.store, fused=f) for f in (False, True)]
    assert not backends[0].fused and backends[1].fused and backends[1].graph_safe
    engines = [LLMEngine(ck, max_seqs=1, max_len=64) for _ in backends]
    want, got = forced_logits(engines, "Fused experts replay the same tokens", 24,
                              lambda i: ck.model.set_experts(backends[i]))
    kinds = [type(next(iter(e.graphs.values()))) for e in engines]
    assert kinds[1] is DecodeGraph and (kinds[0] is DecodeGraph) == backends[0].graph_safe
    assert kinds[0] in (DecodeGraph, PiecewiseDecodeGraph)
    assert_logits_close(want, got)
