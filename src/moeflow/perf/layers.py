"""The engine's own layers timed on this machine, for the hardware profile: the host's share of an offloaded
layer (tiny models, whose GPU work is negligible), and a decode layer of a real model's shapes with its experts
resident (its non-expert part on the GPU as the engine runs it: graphs, small kernels, the per-layer sync)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from moeflow.config import ModelConfig
from moeflow.perf.costs import device_sync, paired_s

PREFILL_K = 2               # experts per token of the model the host's share is measured on (tiny synthetic Mixtral)
ALL_K = 8                   # the same model routing each token to all its experts (expert_overhead_s)
LAYER_EXPERT_BYTES = 3 << 29  # a resident layer holds all its model's experts up to this size, else K of them


def host_overheads(dev, steps: int, tokens: tuple[int, ...], repeats: int, many_layers: int = 36
                    ) -> tuple[float, float, float, tuple[float, ...]]:
    """The host-side cost of one offloaded layer, as the engine pays it, in decode and in prefills of each of
    `tokens` tokens, and a decode step's own: steps of the tiny synthetic Mixtral with every expert in a slot
    (policy gpu), whose GPU work is negligible, over its layers. A layer's holds the per-layer sync for
    routing, the planning and every launch of a decoder layer (a prefill's are eager, and its routing's
    bookkeeping grows with its tokens).
    A layer's time is the slope between the tiny model at 4 and at `many_layers` layers, and a decode step's
    own host work (sampling, the step's bookkeeping) what is left of the 4 layers' step: counted per layer, it
    came out a quarter per layer where a real model spreads it over dozens. What each routed expert adds to a
    decode layer (its lookup, its share of the plan and the wave) is the difference between `many_layers`
    layers routing each token to all 8 experts and to PREFILL_K, per layer and added expert.
    The models run in turns (paired_s, medians of `repeats`): timed one after the other, a shared host's drift
    lands on one model and not the other. A difference of two timings is still noisy both ways: the prefill
    points are fitted non-decreasing in tokens. Returns (decode layer, per added expert, decode step, prefill
    layer per token count)."""
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.engine.sequence import SamplingParams

    sync = device_sync(dev)
    decode_tokens = 2 * steps * (repeats + 1) + 2  # the many-layer model decodes in two pairings
    max_len = max(tokens) + decode_tokens + 16
    few_layers = 4
    engines: list[LLMEngine] = []
    try:
        engines += [tiny_engine(dev, n, max_len, k)
                    for n, k in ((few_layers, PREFILL_K), (many_layers, PREFILL_K), (many_layers, ALL_K))]
        few, many, all_k = engines
        seqs = [e.add_request(list(range(3, 11)), SamplingParams(max_new_tokens=decode_tokens, ignore_eos=True))
                for e in engines]
        for e in engines:
            e.step()  # the prefill: paired_s's warm-up is the first decode run
        few_step, many_step = (t / steps for t in paired_s(_steps(few, steps), _steps(many, steps), repeats, sync))
        k_step, all_step = (t / steps for t in paired_s(_steps(many, steps), _steps(all_k, steps), repeats, sync))
        for e, seq in zip(engines, seqs):
            if not seq.finished:
                e.abort(seq)
        prefill = [paired_s(_prompt(few, n), _prompt(many, n), repeats, sync) for n in tokens]
        slope = (many_step - few_step) / (many_layers - few_layers)
        layer = slope if slope > 0 else few_step / few_layers  # noise beyond the difference: all of it per layer
        per_expert = max(all_step - k_step, 0.0) / many_layers / (ALL_K - PREFILL_K)
        return layer, per_expert, max(few_step - few_layers * layer, 0.0), \
            tuple(isotonic([max(b - a, 0.0) / (many_layers - few_layers) for a, b in prefill]))
    finally:
        _close(engines, dev)


def _prompt(eng, n: int) -> Callable[[], None]:
    """A prefill of n tokens (and its one new token) on eng."""
    from moeflow.engine.sequence import SamplingParams

    return lambda: list(eng.stream([3 + i % 64 for i in range(n)], SamplingParams(max_new_tokens=1, ignore_eos=True)))


def tiny_engine(dev, layers: int, max_len: int, top_k: int = PREFILL_K):
    """The tiny synthetic Mixtral of `layers` layers routing each token to top_k experts, every expert in a GPU
    slot (policy gpu): the engine's host path, with negligible GPU work. It caps the allocator at its budget."""
    import torch

    from moeflow.config import OffloadConfig
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.synthetic import build_synthetic

    ck = build_synthetic("tiny-mixtral", device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else None,
                         expert_device="cpu", overrides={"num_hidden_layers": layers, "num_experts_per_tok": top_k})
    return LLMEngine(ck, max_seqs=1, max_len=max_len, offload=OffloadConfig(8 << 30, "gpu"))


def resident_engine(cfg: ModelConfig, dev, dtype, layers: int, experts: int, max_len: int, policy: str = "gpu"):
    """cfg's shapes at `layers` layers of `experts` experts each (no dense layers), random weights, every expert
    in a GPU slot, under `policy`; the allocator's cap that the engine before set is lifted first."""
    from moeflow.config import OffloadConfig
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.synthetic import build_like

    _uncap(dev)
    ck = build_like(replace(cfg, num_hidden_layers=layers, num_experts=experts, dense_layers=()), device=dev,
                    dtype=dtype, expert_device="cpu")
    return LLMEngine(ck, max_seqs=1, max_len=max_len,
                     offload=OffloadConfig(ck.dense_bytes + ck.store.data.nbytes + (2 << 30), policy))


def layer_key(cfg: ModelConfig, dtype_name: str = "bfloat16") -> str:
    """What a resident decode layer's time depends on: the architecture, its attention and its experts (K routed
    of E, their size)."""
    return (f"{cfg.model_type}:{cfg.hidden_size}h{cfg.num_attention_heads}q{cfg.num_key_value_heads}kv"
            f"{cfg.head_dim}d:{cfg.num_experts_per_tok}of{cfg.num_experts}x{cfg.expert_intermediate_size}:{dtype_name}")


def time_resident_layer(cfg: ModelConfig, dev, dtype, steps: int, repeats: int, few: int = 2, many: int = 6
                        ) -> float:
    """Seconds of one decode layer of cfg's shapes with its K routed experts on the GPU, as the engine runs it
    (policy gpu): the per-layer sync, planning and launches, the non-expert part's kernels, the experts' wave.
    The slope between models of `few` and `many` such layers, timed in turns (paired_s, medians of `repeats`
    runs of `steps` steps). Each layer holds the model's experts where they fit in LAYER_EXPERT_BYTES (Qwen3's
    128 of 9.4 MB), else the K a token uses (Mixtral's 2 of 352 MB, so that the span fits beside the model's
    weights in host memory); routing among 128 rather than 8 adds a few percent to a Qwen3 layer
    (docs/history/2026-12-02.md). A decode layer's non-expert part is a chain of small kernels that its
    roofline (Mixtral's: 84 MB at 4 TB/s, 21 us) does not see, so the timing model takes the figure as a floor
    of the non-expert part only."""

    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.engine.sequence import SamplingParams

    sync = device_sync(dev)
    K, prompt = cfg.num_experts_per_tok, list(range(3, 11))
    E = cfg.num_experts if cfg.num_experts * cfg.expert_bytes(dtype) <= LAYER_EXPERT_BYTES else K
    decode_tokens = steps * (repeats + 1) + 2

    engines: list[LLMEngine] = []
    try:
        engines += [resident_engine(cfg, dev, dtype, n, E, len(prompt) + decode_tokens + 16) for n in (few, many)]
        for e in engines:
            e.add_request(prompt, SamplingParams(max_new_tokens=decode_tokens, ignore_eos=True))
            e.step()  # the prefill
        t_few, t_many = paired_s(_steps(engines[0], steps), _steps(engines[1], steps), repeats, sync)
        return max(t_many - t_few, 0.0) / steps / (many - few)
    finally:
        _close(engines, dev)


def _steps(eng, steps: int) -> Callable[[], None]:
    """A call that runs `steps` decode steps of eng's running sequence."""
    def run():
        for _ in range(steps):
            eng.step()
    return run


def _close(engines: list, dev) -> None:
    for eng in engines:
        eng.model.experts.close()
    _uncap(dev)


def _uncap(dev) -> None:
    """Lift the allocator's cap that an engine sets at its budget."""
    import torch

    if dev.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device() if dev.index is None
                                                   else dev.index)


def isotonic(values: list[float]) -> list[float]:
    """The least-squares non-decreasing fit of values (pool adjacent violators: a falling run becomes its mean)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, n = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += n
    return [total / n for total, n in blocks for _ in range(int(n))]
