"""GPTQ and AWQ checkpoints as published: tiny folders written here with tensors packed by hand from each format's
specification (quant/published.py's docstring); non-expert layers dequantize exactly, experts land in moeflow's
int4 format within its rounding bound, and what is not supported fails with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moeflow import MoeflowError
from moeflow.checkpoint import load
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.quant.format import QuantSpec

G = 32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column AWQ_ORDER[k]


def pack_words(codes: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """Rows of 4-bit codes [n, 8m] -> int32 [n, m], word j's nibble k = codes[:, 8j + order[k]]."""
    n, m = codes.shape[0], codes.shape[1] // 8
    out = np.zeros((n, m), dtype=np.uint64)
    for j in range(m):
        for k in range(8):
            out[:, j] |= codes[:, 8 * j + order[k]].astype(np.uint64) << np.uint64(4 * k)
    return out.astype(np.uint32).view(np.int32)


def gptq_tensors(out_f: int, in_f: int, rng: np.random.Generator, act_order: bool):
    """(tensors, the weight [out, in] they stand for): codes, zero points (stored minus one), scales, g_idx."""
    groups = in_f // G
    q = rng.integers(0, 16, (in_f, out_f))
    z = rng.integers(1, 16, (groups, out_f))
    s = (0.01 + 0.02 * rng.random((groups, out_f))).astype(np.float16)
    g_idx = rng.permutation(in_f) // G if act_order else np.arange(in_f) // G
    w = (q - z[g_idx]) * s[g_idx].astype(np.float32)                  # [in, out]
    t = {"qweight": pack_words(q.T).T.copy(), "qzeros": pack_words(z - 1), "scales": s,
         "g_idx": g_idx.astype(np.int32)}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}, torch.from_numpy(w.T.copy())


def awq_tensors(out_f: int, in_f: int, rng: np.random.Generator):
    groups = in_f // G
    q = rng.integers(0, 16, (in_f, out_f))
    z = rng.integers(0, 16, (groups, out_f))
    s = (0.01 + 0.02 * rng.random((groups, out_f))).astype(np.float16)
    gi = np.arange(in_f) // G
    w = (q - z[gi]) * s[gi].astype(np.float32)
    t = {"qweight": pack_words(q, AWQ_ORDER), "qzeros": pack_words(z, AWQ_ORDER), "scales": s}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}, torch.from_numpy(w.T.copy())


def quantized_folder(path, method: str, qc: dict, act_order: bool = False, drop: str | None = None) -> dict:
    """Turn the folder's expert and q_proj weights into `method` tensors; returns name -> the weight they mean."""
    f = next(path.glob("*.safetensors"))
    tensors, want, rng = load_file(f), {}, np.random.default_rng(0)
    for name in [n for n in tensors if ".experts." in n or n.endswith("q_proj.weight")]:
        out_f, in_f = tensors.pop(name).shape
        base = name.removesuffix(".weight")
        t, want[name] = gptq_tensors(out_f, in_f, rng, act_order) if method == "gptq" else awq_tensors(out_f, in_f, rng)
        tensors.update({f"{base}.{k}": v for k, v in t.items() if k != drop})
    save_file(tensors, f, metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"quantization_config": {"quant_method": method, **qc}}))
    return want


def check_loaded(path, want: dict) -> None:
    ck = load(path, dtype="fp32")
    assert ck.store.fmt.spec == QuantSpec(4, G, False, torch.float16)
    params = {ck.arch.hf_name(n): p for n, p in ck.model.named_parameters()}
    dense = [n for n in want if n.endswith("q_proj.weight")]
    assert dense and all(torch.equal(params[n], want[n]) for n in dense)  # dequantized exactly
    for layer in ck.store.layers:
        for e in range(ck.cfg.num_experts):
            for part in ("gate", "up", "down"):
                w = want[ck.arch.expert_name(layer, e, part)]
                rows = w if part != "down" else w.t()                    # moeflow's groups run along H
                got = ck.store.part(layer, e, part)
                got = got if part != "down" else got.t()
                g = rows.reshape(rows.shape[0], -1, G)
                step = (g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)) / 15  # asymmetric: one step
                err = (got - rows).abs().reshape(g.shape).amax(-1)
                assert (err <= step * 1.01 + 1e-6).all()
    out = LLMEngine(ck, max_seqs=1, max_len=32).generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(out[0].output_ids) == 3


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_folder_loads_dequantized_and_requantized(hf_checkpoint, act_order):
    path, _ = hf_checkpoint("mixtral")
    want = quantized_folder(path, "gptq", {"bits": 4, "group_size": G, "desc_act": act_order, "sym": False},
                            act_order)
    check_loaded(path, want)
    # what the planners count before loading (plan, the pipeline's plan, batch's engine choice) is the store's
    from moeflow.checkpoint import model_quant

    assert model_quant(path) == load(path, dtype="fp32").store.fmt.spec
    assert model_quant(path, "int8").bits == 8  # --quantize wins


def test_awq_gemm_folder_loads_dequantized_and_requantized(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    want = quantized_folder(path, "awq", {"bits": 4, "group_size": G, "version": "gemm", "zero_point": True})
    check_loaded(path, want)


def test_unsupported_published_options_fail_with_one_line(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    quantized_folder(path, "gptq", {"bits": 4, "group_size": G, "desc_act": True}, True, drop="g_idx")
    with pytest.raises(MoeflowError, match="act-order .desc_act. without g_idx"):
        load(path)
    cfg = json.loads((path / "config.json").read_text())
    for qc, msg in (({"quant_method": "gptq", "bits": 3}, "GPTQ with 3 bits"),
                    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ gemv"),
                    ({"quant_method": "bitsandbytes"}, "'bitsandbytes' is not supported")):
        (path / "config.json").write_text(json.dumps(cfg | {"quantization_config": qc}))
        with pytest.raises(MoeflowError, match=msg):
            load(path)
