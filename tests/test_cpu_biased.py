"""The native CPU kernel on biased experts (GPT-OSS: gate/up/down biases, the clamped SwiGLU) against
BiasedFormat.ffn in fp32 on the same bf16 blocks: every path this CPU runs, whole experts and row parts (the
down bias only in the part holding row 0), few tokens (down fused) and many (down by columns; on AMX, the
vector path), and the cost measurement timing that same kernel.

Tolerances, relative to the largest output: 1e-4 where tokens and activations stay fp32 (scalar, avx2, the AMX
emulation's vector path: only the summation order differs), 3e-2 where the tokens are rounded to bf16 (avx512,
amx)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moeflow.experts import native
from moeflow.experts.biased import BiasedFormat
from moeflow.experts.cpu import CpuExperts, Job, jobs_from_topk
from moeflow.perf.profile import shape_key

LIB = native.load()
KERNELS = [k for k in native.KERNELS if LIB.can_run(k)] if LIB else []
EXACT = {"scalar", "avx2", "amx-emu"}
pytestmark = pytest.mark.skipif(LIB is None, reason="no native kernel here")


def biased_blocks(E: int, H: int, I: int, limit: float, seed: int) -> tuple[torch.Tensor, BiasedFormat]:
    """E bf16 blocks [gate | up | down_t | biases] of random weights; biases of the sums' scale, so that a
    small limit clamps a good share of the gate and up sums at both ends."""
    fmt = BiasedFormat(I, H, torch.bfloat16, alpha=1.702, limit=limit)
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(E, fmt.block_numel, generator=g) / H**0.5
    data[:, fmt.matrix_numel:] *= H**0.5 / 2
    return data.bfloat16(), fmt


def reference(data: torch.Tensor, fmt: BiasedFormat, x: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
    """fp32 on the same bf16 blocks, through PyTorch (BiasedFormat.ffn)."""
    f32 = BiasedFormat(fmt.inter, fmt.hidden, torch.float32, fmt.alpha, fmt.limit)
    out = torch.zeros(x.shape[0], x.shape[1])
    for j in jobs:
        tok = torch.as_tensor(j.tok).long()
        y = f32.ffn(x.float()[tok], data[j.expert].float(), j.r0, fmt.inter if j.r1 is None else j.r1)
        out.index_add_(0, tok, y * torch.as_tensor(j.w).float()[:, None])
    return out


def check(got: torch.Tensor, want: torch.Tensor, kernel: str) -> None:
    tol = (1e-4 if kernel in EXACT else 3e-2) * max(want.abs().max().item(), 1e-3)
    err = (got - want).abs().max().item()
    assert err <= tol, (kernel, err, tol)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("H,I", [(128, 96), (200, 44)])  # H = 200: partial vectors at every width
def test_native_biased_experts_match_pytorch(kernel, fused, H, I):
    data, fmt = biased_blocks(5, H, I, limit=0.6, seed=H + I)
    ce = CpuExperts(threads=2, kernel=kernel, fmt=fmt)
    assert ce.uses_native(data)
    if not fused:  # down by column chunks, as with many tokens
        ce.fused_max_bytes = 0
    g = torch.Generator().manual_seed(7)
    for n in (1, 3, 20):  # 20 tokens: AMX would tile them; biased jobs stay on the vector path
        x = torch.randn(n, H, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(n)])
        w = torch.rand(n, 2, generator=g)
        check(ce.layer(data, x, ids, w), reference(data, fmt, x, jobs_from_topk(ids, w, 5)), kernel)
        assert ce.kernel_s > 0  # the native kernel ran it


@pytest.mark.parametrize("kernel", KERNELS)
def test_row_parts_add_up_with_one_down_bias(kernel):
    """An expert split into row parts (the CPU's share of a split expert, and the rest) sums to the whole; the
    output already in out is added to."""
    H, I = 128, 112
    data, fmt = biased_blocks(3, H, I, limit=0.8, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, H, generator=g)  # fp32 tokens are accepted too
    tok = [torch.tensor([0, 3, 4, 8]), torch.arange(9), torch.tensor([7])]
    ws = [torch.rand(len(t), generator=g) for t in tok]
    whole = [Job(e, tok[e], ws[e]) for e in range(3)]
    split = [Job(e, tok[e], ws[e], r0, r1) for e in range(3) for r0, r1 in ((0, 5), (5, 37), (37, 64), (64, I))]
    ce = CpuExperts(threads=2, kernel=kernel, fmt=fmt)
    base = torch.randn(9, H, generator=g)
    want = reference(data, fmt, x, whole)
    check(ce(data, x, split, base.clone()) - base, want, kernel)
    check(ce(data, x, [Job(1, tok[1], ws[1], 5, 37)]), reference(data, fmt, x, [Job(1, tok[1], ws[1], 5, 37)]),
          kernel)  # a part without row 0: no down bias


def test_torch_kernel_keeps_the_pytorch_path():
    data, fmt = biased_blocks(2, 64, 32, limit=0.6, seed=3)
    ce = CpuExperts(kernel="torch", fmt=fmt)
    assert not ce.uses_native(data)
    x = torch.randn(2, 64).bfloat16()
    got = ce(data, x, [Job(0, torch.arange(2), torch.ones(2))])
    want = reference(data, fmt, x, [Job(0, torch.arange(2), torch.ones(2))])
    torch.testing.assert_close(got, want, rtol=0, atol=3e-2 * want.abs().max().item())  # PyTorch in bf16


def test_the_measured_cpu_cost_of_a_biased_expert_times_the_kernel(monkeypatch):
    """The profile and the offloaded backend time a biased expert with the engine's CpuExperts for its format:
    the native kernel's biased path, the one the engine runs; the profile keys it apart from a plain expert."""
    from moeflow.models import get_architecture
    from moeflow.perf import measure

    cfg = get_architecture("gpt_oss").config({
        "model_type": "gpt_oss", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8, "max_position_embeddings": 64})
    seen = []
    real = measure.engine_cpu_experts

    def spy(fmt=None):
        ce = real(fmt)
        seen.append((fmt, ce))
        return ce

    monkeypatch.setattr(measure, "engine_cpu_experts", spy)
    costs = measure._expert_costs(cfg, torch.device("cpu"), "bfloat16", measure.QUICK, None,
                                  measure._Steps(["CPU expert"], False))
    (fmt, ce), = seen
    assert isinstance(fmt, BiasedFormat) and ce.uses_native(torch.empty(0, dtype=torch.bfloat16))
    assert ce.kernel_s > 0 and all(s > 0 for s in costs["cpu_s"])
    # the profile keeps them apart from a plain expert of the same shape (timed on another path)
    assert shape_key(cfg) == shape_key(replace(cfg, expert_bias=False)) + ":biased"


@torch.inference_mode()
def test_a_bf16_host_store_runs_biased_experts_in_the_kernel_locally():
    """LocalExperts on a bf16 GPT-OSS store in host memory (--device cpu) runs the kernel's biased path and
    gives the fp32 reference."""
    from test_gpt_oss_offload import biased_store

    from moeflow.experts.local import LocalExperts

    store = biased_store(hidden=64, inter=48, layers=2, std=0.2)
    local = LocalExperts(store)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])
    w = torch.rand(6, 2, generator=g)
    got = local(1, x, ids, w)
    assert got.dtype == torch.bfloat16 and local.cpu is not None and local.cpu.kernel_s > 0
    want = reference(store.data[1], store.fmt, x, jobs_from_topk(ids, w, 8))
    check(got.float(), want, "avx512")  # bf16 output: the bf16 tolerance
