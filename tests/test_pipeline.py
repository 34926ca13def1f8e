"""The pipeline engine (throughput regime): the same greedy tokens as the single-request engine, plans checked."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moeflow import MoeflowError
from moeflow.checkpoint import load, read_model_config
from moeflow.cli import main
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.perf.profile import reference_profile
from moeflow.perf.throughput_model import PipelineRates, ThroughputPolicy
from moeflow.pipeline.engine import PipelineEngine
from moeflow.pipeline.plan import check_fits, machine_profile, parse_plan

PROMPTS = ["hello world", "the cat sat on the mat and", "a", "import sys", "once upon a time there", "zz top"]
NEW = [5, 8, 3, 6, 7, 4]


def single_request(ck) -> list:
    engine = LLMEngine(ck, max_seqs=1, max_len=64)
    return [engine.generate([p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0] for p, n in zip(PROMPTS, NEW)]


def single_request_tokens(ck) -> list[list[int]]:
    return [s.output_ids for s in single_request(ck)]


def pipeline_tokens(ck, plan: ThroughputPolicy, native: bool | None = None) -> tuple[list[list[int]], PipelineEngine]:
    engine = PipelineEngine(ck, plan, 64, native=native)
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(PROMPTS, NEW)]
    while engine.has_unfinished:
        engine.step()
        assert len(engine.running) <= plan.N
    engine.close()
    return [s.output_ids for s in seqs], engine


@pytest.mark.parametrize("model,plan,native", [("tiny-mixtral", (3, 2, 0.5), None), ("tiny-qwen3", (4, 1, 0.0), False)])
def test_pipeline_matches_the_single_request_engine(model, plan, native):
    """6 requests through N slots (later ones join as earlier finish), micro-batches of mu, r_w resident; CPU
    attention by the native kernel (where it builds) or PyTorch."""
    ck = load(f"synthetic:{model}")
    N, mu, r_w = plan
    got, engine = pipeline_tokens(ck, ThroughputPolicy(N, mu, r_w, 0.0, False), native)
    assert got == single_request_tokens(ck)
    streamed = ck.cfg.num_experts - engine.weights.resident
    assert engine.weights.bytes_h2d >= streamed * ck.store.expert_bytes * len(ck.cfg.moe_layers)
    assert engine.cpu_attention_s > 0
    # K and V of every position each decode step attends to, in every layer: tokens 2..n at prompt + 1.. positions
    prompt = [len(engine.encode(p)) for p in PROMPTS]
    positions = sum(p + j for p, n in zip(prompt, NEW) for j in range(1, n))
    row = ck.cfg.num_key_value_heads * ck.cfg.head_dim * engine.cache[0][0].element_size()
    assert engine.cpu_attention_bytes == ck.cfg.num_hidden_layers * 2 * positions * row


@pytest.mark.parametrize("model_type,native", [("olmoe", None), ("phimoe", None), ("qwen2_moe", None),
                                               ("gpt_oss", None), ("gpt_oss", False)])
def test_pipeline_runs_the_other_architectures_as_the_single_request_engine(model_type, native, hf_checkpoint):
    """OLMoE (q/k norms over the whole projection), Phi-3.5-MoE (LayerNorm, biases, sparsemixer), Qwen2-MoE
    (the gated shared expert), GPT-OSS (sinks in the CPU attention's softmax, by the native kernel or PyTorch;
    per-layer windows; biased experts streamed): the attention's own projections feed the CPU attention."""
    ck = load(hf_checkpoint(model_type)[0])
    got, engine = pipeline_tokens(ck, ThroughputPolicy(3, 2, 0.5, 0.0, False), native)
    assert got == single_request_tokens(ck)
    assert engine.cpu_attention_s > 0


@pytest.mark.parametrize("native", [None, False])
def test_pipeline_runs_latent_attention_as_the_single_request_engine(native):
    """DeepSeek-V2's MLA on the CPU in the latent space: one arena of [latent | rope key] rows per layer, read once
    for keys and values (native kernel where it builds, else PyTorch); dense first layers, shared experts."""
    ck = load("synthetic:tiny-deepseek-v2")
    got, engine = pipeline_tokens(ck, ThroughputPolicy(3, 2, 0.5, 0.0, False), native)
    assert got == single_request_tokens(ck)
    cfg = ck.cfg
    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert [tuple(a.shape[1:]) for a in engine.cache.arenas(0)] == [(1, row)]
    prompt = [len(engine.encode(p)) for p in PROMPTS]
    positions = sum(p + j for p, n in zip(prompt, NEW) for j in range(1, n))
    assert engine.cpu_attention_bytes == cfg.num_hidden_layers * positions * row * engine.cache[0][0].element_size()


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["olmoe", "phimoe", "qwen2_moe", "gpt_oss"])
def test_pipeline_on_the_gpu_runs_the_other_architectures(model_type, hf_checkpoint):
    """The same on the GPU (fp32): streams and events, q/k/v and the attention's output across PCIe, sinks and
    windows on the host, biased experts in the GPU buffers."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    path = hf_checkpoint(model_type)[0]
    ck = load(path, device="cuda", dtype="fp32", expert_device="cpu")
    ck.store.pin()
    got, _ = pipeline_tokens(ck, ThroughputPolicy(3, 2, 0.5, 0.0, False))
    assert got == single_request_tokens(load(path, device="cuda", dtype="fp32"))


def test_pipeline_refuses_longrope_past_its_short_range(hf_checkpoint):
    """Phi-3.5-MoE's longrope switches scale past original_max_position_embeddings (the continuous engine re-runs
    such a sequence): the pipeline takes --max-len within it, and says so beyond."""
    from test_archs import LONGROPE

    ck = load(hf_checkpoint("phimoe", **LONGROPE)[0])
    with pytest.raises(MoeflowError, match="longrope within its first 40 positions"):
        PipelineEngine(ck, ThroughputPolicy(2, 1, 0.0, 0.0, False), 64)
    PipelineEngine(ck, ThroughputPolicy(2, 1, 0.0, 0.0, False), 40).close()


def test_pipeline_prefills_rounds_of_chunks(monkeypatch):
    """Prompts in rounds of at most 20 tokens, each round layer by layer in chunks of at most 8: the same tokens."""
    from moeflow.pipeline import engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(engine_module, "PREFILL_GROUP", 20)
    chunks = engine_module.split_prompts([type("S", (), {"prompt_ids": [0] * n})() for n in (3, 4, 9, 2, 8)], 8)
    assert [[len(s.prompt_ids) for s in c] for c in chunks] == [[3, 4], [9], [2], [8]]
    ck = load("synthetic:tiny-mixtral")
    got, _ = pipeline_tokens(ck, ThroughputPolicy(6, 2, 0.5, 0.0, False))
    assert got == single_request_tokens(ck)


def test_a_filling_batch_takes_prefill_rounds_until_full(monkeypatch):
    """16 requests of 4 tokens for 16 sequences, prompts in rounds of 2-3: every request joins before the
    first decode step, so the batch decodes its 3 steps once (not the last request alone afterwards)."""
    from moeflow.pipeline import engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_GROUP", 15)
    ck = load("synthetic:tiny-qwen3")
    engine = PipelineEngine(ck, ThroughputPolicy(16, 4, 0.0, 0.0, False), 64, native=False)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    seqs = [engine.add_request(f"prompt {i}", params) for i in range(16)]
    while engine.has_unfinished:
        engine.step()
    engine.close()
    assert all(len(s.output_ids) == 4 for s in seqs)
    assert engine.decode_steps == 3


@pytest.mark.gpu
@pytest.mark.parametrize("model,dtype", [("tiny-mixtral", "fp32"), ("tiny-qwen3", "fp32"), ("tiny-mixtral", "bf16"),
                                         ("tiny-mixtral-int4", "fp32"), ("tiny-deepseek-v2", "fp32")])
def test_pipeline_on_the_gpu_matches_the_single_request_engine(model, dtype):
    """Streams, events, pinned copies; in bf16 the experts run as grouped GEMMs, as the reference's do; int4
    blocks stream whole layers into the buffers; MLA's latent rows cross to the host and back."""
    ck = load(f"synthetic:{model}", device="cuda", dtype=dtype, expert_device="cpu")
    ck.store.pin()
    got, engine = pipeline_tokens(ck, ThroughputPolicy(3, 2, 0.5, 0.0, False))
    assert engine.weights.grouped == (dtype == "bf16")
    assert engine.weights.whole == (dtype == "bf16" or ck.store.fmt.quantized)
    ref = load(f"synthetic:{model}", device="cuda", dtype=dtype)
    assert got == single_request_tokens(ref)


@pytest.mark.parametrize("grouped", [False, True])
def test_layer_weights_run_each_layers_experts(grouped, monkeypatch):
    """Resident share + streamed buffers (double-buffered across layers), by expert or in grouped GEMMs: the same
    output as the reference backend with every expert in place."""
    from moeflow.experts.local import LocalExperts
    from moeflow.pipeline import weights

    if grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped GEMM")
    calls, real = [], weights.grouped_experts
    monkeypatch.setattr(weights, "grouped_experts", lambda *a: calls.append(1) or real(*a))
    ck = load("synthetic:tiny-mixtral", dtype="bf16")
    # 4 tokens per grouped call: 9 tokens in 3 calls, each over all experts
    monkeypatch.setattr(weights, "GROUPED_BYTES", 4 * 2 * ck.cfg.expert_intermediate_size * 2 * 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, ck.cfg.hidden_size, generator=g).bfloat16()
    ids = torch.randint(0, ck.cfg.num_experts, (9, 2), generator=g)
    w = torch.rand(9, 2, generator=g)
    ref = LocalExperts(ck.store)
    for r_w in (0.0, 0.5, 1.0):
        lw = weights.LayerWeights(ck.store, torch.device("cpu"), r_w, grouped=grouped)
        for layer in ck.cfg.moe_layers * 2:  # twice round: buffers reused
            row = ck.store.slot[layer]
            lw.prefetch(row)
            lw.acquire(row)
            torch.testing.assert_close(lw.ffn(row, x, ids, w).float(), ref(layer, x, ids, w).float(),
                                       rtol=2e-2, atol=2e-2)
            lw.release(row)
    assert len(calls) == (3 * 3 * 2 * len(ck.cfg.moe_layers) if grouped else 0)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_layer_weights_run_int4_experts_through_the_gpu_kernels(tokens):
    """int4 blocks streamed into the GPU buffers (bf16: decode's GEMVs at few tokens, the fused kernels beyond):
    the same output as the reference backend with the whole store on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from moeflow.experts.local import LocalExperts
    from moeflow.pipeline.weights import LayerWeights

    ck = load("synthetic:tiny-mixtral-int4", device="cuda", dtype="bf16", expert_device="cpu")
    ck.store.pin()
    ref = LocalExperts(ck.store.to("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, ck.cfg.hidden_size, generator=g, device="cuda").bfloat16()
    ids = torch.rand(tokens, ck.cfg.num_experts, generator=g, device="cuda").topk(2, dim=1).indices
    w = torch.rand(tokens, 2, generator=g, device="cuda")
    for r_w in (0.0, 0.5):
        lw = LayerWeights(ck.store, torch.device("cuda"), r_w)
        assert lw.whole and not lw.grouped
        for layer in ck.cfg.moe_layers:
            row = ck.store.slot[layer]
            lw.acquire(row)
            torch.testing.assert_close(lw.ffn(row, x, ids, w).float(), ref(layer, x, ids, w).float(),
                                       rtol=2e-2, atol=2e-2)
            lw.release(row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_attention_matches_pytorch(dtype):
    from moeflow.pipeline.attention import cpu_decode_attention
    from moeflow.pipeline.native import load as load_native
    from moeflow.pipeline.native import self_checked

    native = load_native()
    if native is None:
        pytest.skip("no C++ compiler builds the native kernel")
    g = torch.Generator().manual_seed(0)
    S, T, Hq, Hkv, D = 5, 90, 6, 2, 24  # GQA groups of 3; D not a multiple of the vector width; T > a V block
    cache = [torch.randn(S * T, Hkv, D, generator=g).to(dtype) for _ in "kv"]  # arenas of S runs of T
    q, k, v = (torch.randn(3, h, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    slots, starts = [4 * T, 0, 2 * T], [0, 17, 89]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for window in (None, 8):
        ref_cache = [c.clone() for c in cache]
        ref = cpu_decode_attention(q, k, v, *ref_cache, slots, starts, window)
        # every kernel; one thread, and more threads than sequences (a sequence's heads split between them);
        # q and the output in fp32 and in the cache's dtype
        for kernel, threads, out_dtype in [("scalar", 1, torch.float32), *[(f, t, o) for f in sorted(native.features)
                                           for t, o in ((1, torch.float32), (4, dtype))]]:
            kc, vc = (c.clone() for c in cache)
            out = torch.full(q.shape, float("nan"), dtype=out_dtype)
            got = native(q.float() if out_dtype == torch.float32 else q, kc, vc,
                         torch.tensor(slots, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32), window,
                         threads, k, v, out, kernel)
            assert got is out
            torch.testing.assert_close(got.float(), ref.float(), **tol)
            torch.testing.assert_close(kc, ref_cache[0], rtol=0, atol=0)  # the new rows written, nothing else
            torch.testing.assert_close(vc, ref_cache[1], rtol=0, atol=0)
        kc, vc = (c.clone() for c in cache)
        got = cpu_decode_attention(q, k, v, kc, vc, slots, starts, window, native, 2)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref.float(), **tol)
    assert self_checked(native) == native.features  # every vector path agrees with the scalar one
    with pytest.raises(RuntimeError, match="refused"):
        native(q[:1], *cache, torch.tensor([0], dtype=torch.int32), torch.tensor([-1], dtype=torch.int32), None, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_attention_takes_latent_rows_sinks_and_its_scale(dtype):
    """MLA's form (one arena read as K and V, 16 heads on one KV head: the tiled scores, a T not a multiple of the
    tile) and GPT-OSS's sinks, with a scale of their own: every kernel against PyTorch's fallback."""
    from moeflow.pipeline.attention import cpu_decode_attention
    from moeflow.pipeline.native import load as load_native

    native = load_native()
    if native is None:
        pytest.skip("no C++ compiler builds the native kernel")
    g = torch.Generator().manual_seed(1)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    slots, starts = [160, 0, 80], [0, 37, 78]
    for Hq, Hkv, D, shared, sinks in ((16, 1, 72, True, None), (6, 2, 24, False, torch.randn(6, generator=g))):
        arena = torch.randn(240, Hkv, D, generator=g).to(dtype)
        cache = (arena, arena) if shared else (arena, torch.randn(240, Hkv, D, generator=g).to(dtype))
        q, k = (torch.randn(3, h, D, generator=g).to(dtype) for h in (Hq, Hkv))
        v = k if shared else torch.randn(3, Hkv, D, generator=g).to(dtype)
        scale = 0.3 / D ** 0.5 if sinks is None else None  # the sinks' softmax takes the model's D^-0.5
        ref_cache = [c.clone() for c in cache]
        ref_cache = (ref_cache[0], ref_cache[0]) if shared else ref_cache
        ref = cpu_decode_attention(q, k, v, *ref_cache, slots, starts, scale=scale, sinks=sinks)
        for kernel in ("scalar", *sorted(native.features)):
            kc = arena.clone()
            kv = (kc, kc) if shared else (kc, cache[1].clone())
            got = native(q, *kv, torch.tensor(slots, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
                         None, 2, k, v, torch.empty(q.shape), kernel, scale=scale, sinks=sinks)
            torch.testing.assert_close(got, ref.float(), **tol)


def test_native_attention_keeps_its_threads_across_calls():
    """A call per micro-batch: the kernel's workers start once and wait for the next call (starting threads per
    call cost about as much as a small micro-batch's attention), and calls from two threads at once both stay
    right."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from moeflow.pipeline.attention import cpu_decode_attention
    from moeflow.pipeline.native import load as load_native

    native = load_native()
    if native is None:
        pytest.skip("no C++ compiler builds the native kernel")
    g = torch.Generator().manual_seed(1)
    B, T, Hq, Hkv, D = 8, 40, 4, 2, 32
    cache = [torch.randn(B * T, Hkv, D, generator=g) for _ in "kv"]
    q, k, v = (torch.randn(B, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    slots, starts = [b * T for b in range(B)], [T - 1 - b for b in range(B)]
    ref = cpu_decode_attention(q, k, v, *[c.clone() for c in cache], slots, starts)

    def call() -> torch.Tensor:
        return cpu_decode_attention(q, k, v, *[c.clone() for c in cache], slots, starts, None, native, 6)

    def workers() -> set[str]:  # the kernel's threads, by id
        return {t for t in os.listdir("/proc/self/task")
                if open(f"/proc/self/task/{t}/comm").read().strip() == "moeflow-attn"}

    call()
    first = workers()
    assert len(first) >= 5  # six threads a call: this one and five workers
    for _ in range(5):
        torch.testing.assert_close(call(), ref, rtol=1e-4, atol=1e-4)
    assert workers() == first
    with ThreadPoolExecutor(2) as pool:
        for got in pool.map(lambda _: call(), range(8)):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_the_grouped_prefill_rate_is_measured_only_where_it_runs_and_fits():
    """No rate on the CPU (no grouped GEMMs) or where one layer's experts and the call's buffers pass the budget
    (nothing allocated: it returns before)."""
    from moeflow.pipeline.weights import measured_grouped_flops

    from moeflow.quant.format import parse_quant

    for quant in (None, parse_quant("int4")):  # bf16 grouped GEMMs, the quantized fused kernels
        assert measured_grouped_flops(8, 2, 64, 32, 64, "cpu", None, quant) is None
        assert measured_grouped_flops(8, 2, 64, 32, 64, "cuda", 1 << 20, quant) is None  # 1 MiB: returns first


@pytest.mark.gpu
def test_the_grouped_prefill_rate_on_the_gpu_gives_its_memory_back():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from moeflow.pipeline.weights import measured_grouped_flops

    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    from moeflow.quant.format import parse_quant

    for quant in (None, parse_quant("int4")):
        flops = measured_grouped_flops(16, 4, 1024, 512, 4096, "cuda", 8 << 30, quant, repeats=3)
        assert flops is not None and 1e11 < flops < 1e16
        assert torch.cuda.memory_reserved() <= before


def test_a_gpu_runs_plan_takes_the_kernels_measured_rates(monkeypatch):
    """What a GPU run measures before planning, here with the CPU standing in for the device: the attention
    kernel's read rate and a call's fixed part (both CPU figures), and no grouped rate where one layer's experts
    would not fit the budget; on the CPU nothing is measured."""
    from moeflow.pipeline import load as pipeline_load

    cfg = read_model_config("synthetic:tiny-qwen3")[1]
    assert pipeline_load.measured_rates(cfg, "cpu", torch.bfloat16, None) == PipelineRates()
    monkeypatch.setattr(pipeline_load, "resolve_device", lambda device: torch.device("cuda"))
    rates = pipeline_load.measured_rates(cfg, "cuda", torch.bfloat16, 1 << 20)  # 1 MiB: no room for the grouped call
    assert rates.attn_bw is None or rates.attn_bw > 0
    assert 0 < rates.attn_call_s < 1 and rates.prefill_flops is None


def test_plans_are_parsed_and_checked():
    assert parse_plan("64,16,0.3,0,cpu") == ThroughputPolicy(64, 16, 0.3, 0.0, False)
    for bad in ("64,16,0.3,0", "64,128,0.3,0,cpu", "a,1,0,0,cpu", "4,2,1.5,0,cpu", "4,2,0,0,tpu"):
        with pytest.raises(MoeflowError, match="--plan"):
            parse_plan(bad)
    _, cfg = read_model_config("synthetic:mixtral-8x7b")
    with pytest.raises(MoeflowError, match=r"GPU memory .* short by"):
        check_fits(cfg, ThroughputPolicy(8, 4, 0.5, 0.0, False), 896, 128, 24 << 30)
    with pytest.raises(MoeflowError, match=r"host memory .* short by"):
        check_fits(cfg, ThroughputPolicy(10**6, 4, 0.0, 0.0, False), 896, 128, None)
    with pytest.raises(MoeflowError, match="attention on the CPU"):
        PipelineEngine(load("synthetic:tiny-mixtral"), ThroughputPolicy(2, 1, 0.0, 0.0, True), 64)


def test_batch_runs_on_the_pipeline_engine(tmp_path, monkeypatch):
    ck = load("synthetic:tiny-mixtral")
    monkeypatch.setattr("moeflow.pipeline.load.load", lambda *a, **k: ck)
    lines = [json.dumps({"custom_id": f"r{i}", "url": "/v1/completions",
                         "body": {"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}})
             for i, (p, n) in enumerate(zip(PROMPTS, NEW))]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["batch", "--model", "synthetic:tiny-mixtral", "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(out), "--device", "cpu", "--engine", "pipeline", "--plan", "3,2,0.5,0,cpu",
                 "--no-progress"]) == 0
    recs = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for i, seq in enumerate(single_request(ck)):
        body = recs[f"r{i}"]["response"]["body"]
        assert body["choices"][0]["text"] == seq.text
        assert body["usage"]["completion_tokens"] == len(seq.output_ids)


def test_running_out_of_gpu_memory_is_one_line(tmp_path, monkeypatch, capsys):
    """A plan whose count falls short meets the allocator's cap (or the device's end): one line naming the plan
    and the budget, exit 2 from `moeflow batch`, and the results finished before it kept."""
    from moeflow.pipeline import engine as engine_module

    calls = []

    def hidden(self, seqs):
        calls.append(len(seqs))
        if len(calls) > 2:  # the prefill and one decode step go through
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, seqs)

    real = engine_module.PipelineEngine._hidden
    monkeypatch.setattr(engine_module.PipelineEngine, "_hidden", hidden)
    lines = [json.dumps({"custom_id": f"r{i}", "url": "/v1/completions",
                         "body": {"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}})
             for i, (p, n) in enumerate([("hello", 1), ("the cat", 6)])]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["batch", "--model", "synthetic:tiny-mixtral", "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(out), "--device", "cpu", "--engine", "pipeline", "--plan", "2,1,0.5,0,cpu",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "plan N=2, mu=1, r_w=0.50 needed more memory than the GPU holds" in err and "Traceback" not in err
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == ["r0"]  # finished: kept


@pytest.mark.parametrize("model,quant,plan", [("tiny-mixtral-int4", None, (3, 2, 0.5)),
                                               ("tiny-qwen3", "int8", (4, 1, 0.0))])
def test_pipeline_runs_quantized_experts_as_the_single_request_engine(model, quant, plan):
    """int4/int8 blocks stream as they are (their own bytes) and run through the quantized kernels: the same
    greedy tokens as the single-request engine on the same quantized store."""
    ck = load(f"synthetic:{model}", quant=quant)
    assert ck.store.fmt.quantized
    N, mu, r_w = plan
    got, engine = pipeline_tokens(ck, ThroughputPolicy(N, mu, r_w, 0.0, False))
    assert got == single_request_tokens(ck)
    streamed = ck.cfg.num_experts - engine.weights.resident
    assert engine.weights.bytes_h2d >= streamed * ck.store.fmt.block_bytes * len(ck.cfg.moe_layers)


def test_batch_runs_quantized_experts_on_the_pipeline_but_auto_keeps_them_on_continuous(tmp_path, monkeypatch):
    """--engine pipeline loads the experts quantized as asked (--quantize or an -int4 preset): its answers are the
    single-request engine's on that store; --engine auto sends quantized experts to continuous."""
    import argparse

    from moeflow.batch import cli as batch_cli

    lines = [json.dumps({"custom_id": f"r{i}", "url": "/v1/completions",
                         "body": {"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}})
             for i, (p, n) in enumerate(zip(PROMPTS[:3], NEW[:3]))]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    ref = single_request(load("synthetic:tiny-mixtral-int4"))
    for n, model in enumerate((["synthetic:tiny-mixtral-int4"], ["synthetic:tiny-mixtral", "--quantize", "int4"])):
        out = tmp_path / f"out{n}.jsonl"
        assert main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--device", "cpu",
                     "--engine", "pipeline", "--plan", "2,1,0.5,0,cpu", "--no-progress", "--model", *model]) == 0
        recs = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert [recs[f"r{i}"]["response"]["body"]["choices"][0]["text"] for i in range(3)] == \
            [s.text for s in ref[:3]]
    monkeypatch.setattr("moeflow.launch.load_engine", lambda args, n: "continuous")
    monkeypatch.setattr("moeflow.pipeline.load.load_pipeline", lambda spec: ("pipeline", None))
    args = argparse.Namespace(model="synthetic:tiny-mixtral", quantize=None, device="cuda", engine="auto",
                              gpu_memory="1GiB", plan=None, max_running=4, policy=None, placement=None,
                              routing_trace=None, max_len=None, max_new_tokens=None, dtype="auto")
    assert batch_cli._engine(args)[0] == "pipeline"
    for change in ({"quantize": "int4"}, {"model": "synthetic:tiny-mixtral-int4"}):
        assert batch_cli._engine(argparse.Namespace(**{**vars(args), **change}))[0] == "continuous"


def test_bench_throughput_writes_pipeline_and_baseline_rows(tmp_path, monkeypatch):
    ck = load("synthetic:tiny-mixtral")
    monkeypatch.setattr("moeflow.checkpoint.load", lambda *a, **k: ck)
    out = tmp_path / "tp.json"
    assert main(["bench", "throughput", "--configs", "synthetic:tiny-mixtral@1GiB", "--device", "cpu",
                 "--gen-lens", "3", "--num-prompts", "3", "--plan", "2,1,0.5,0,cpu", "--baseline-batches", "2",
                 "--baseline-tokens", "2", "--out", str(out)]) == 0
    pipe, base = json.loads(out.read_text())["rows"]
    assert (pipe["engine"], pipe["tokens"], pipe["plan"]["N"]) == ("pipeline", 9, 2)
    assert pipe["predicted_tokens_per_s"] > 0 and 0 <= pipe["shares"]["cpu_attention"] <= 1
    assert (base["engine"], base["tokens"]) == ("continuous", 4)
    assert pipe["peak_host_bytes"] >= pipe["host_tensor_bytes"] > 0
    assert pipe["profile_source"] == machine_profile().source  # on the CPU: the cached or reference profile
    # a rerun resumes: the rows already written are kept, not run again; a new length is added
    monkeypatch.setattr("moeflow.bench.throughput.baseline_rows", lambda *a: pytest.fail("baseline rerun"))
    assert main(["bench", "throughput", "--configs", "synthetic:tiny-mixtral@1GiB", "--device", "cpu",
                 "--gen-lens", "3,2", "--num-prompts", "3", "--plan", "2,1,0.5,0,cpu", "--baseline-batches", "2",
                 "--baseline-tokens", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[:2] == [pipe, base] and (rows[2]["gen_len"], rows[2]["tokens"]) == (2, 6) and len(rows) == 3


def test_bench_throughput_takes_a_quantized_preset_with_fewer_layers(tmp_path):
    """--layers rebuilds a synthetic preset with fewer layers: an -int4 one keeps its quantization."""
    out = tmp_path / "tp.json"
    assert main(["bench", "throughput", "--configs", "synthetic:tiny-mixtral-int4@1GiB", "--device", "cpu",
                 "--layers", "2", "--gen-lens", "2", "--num-prompts", "2", "--plan", "2,1,0.5,0,cpu",
                 "--baseline-batches", "", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["engine"], row["layers"], row["tokens"]) == ("pipeline", 2, 4)
    assert row["host_tensor_bytes"] < 2 * 8 * 3 * 512 * 256 * 4  # int4 blocks, not the fp32 experts of two layers


def test_bench_throughput_plans_a_gpu_run_with_this_hosts_profile(monkeypatch):
    """On a GPU the plan's profile is this host's, measured for the model's shape (get_profile: cached after the
    first run), not the built-in reference host's."""
    from moeflow.bench.throughput import host_profile

    ck = load("synthetic:tiny-mixtral")
    here = replace(reference_profile(), gpu_name="this host's GPU", source="measured just now")
    asked = []
    monkeypatch.setattr("moeflow.perf.measure.get_profile",
                        lambda cfg, device, dtype_name: asked.append((cfg, device, dtype_name)) or (here, "measured"))
    assert host_profile(ck, "cuda") is here
    assert asked == [(ck.cfg, "cuda", str(ck.store.dtype).removeprefix("torch."))]
    assert host_profile(ck, "cpu") is not here
