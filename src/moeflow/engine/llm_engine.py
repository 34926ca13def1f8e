"""LLMEngine: add_request / step / generate / stream over a loaded Checkpoint.

Every step runs all running sequences in one forward pass, each with the tokens it has not cached yet
(the whole prompt on its first step, then one token), so new requests join a running batch at once.
"""

from __future__ import annotations

import resource
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moeflow import MoeflowError
from moeflow.checkpoint import Checkpoint
from moeflow.config import OffloadConfig
from moeflow.engine.cuda_graph import DecodeGraph, PiecewiseDecodeGraph, graphs_possible
from moeflow.engine.kv_cache import KVCache
from moeflow.engine.offload import ProcessSettings, attach_offload
from moeflow.engine.sampler import sample
from moeflow.engine.sequence import SamplingParams, Sequence, Status
from moeflow.models.layers import AttnBatch
from moeflow.perf.costs import ExpertCosts
from moeflow.tokenizer import TextTokenizer

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


@dataclass
class GenerationResponse:
    """One streamed step of one request: the new text and the request's figures so far."""

    seq_id: int
    text: str                 # text produced by this step (may be empty while a character is incomplete)
    token: int
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    generation_tokens: int
    ttft_s: float             # arrival to first token
    prefill_tps: float        # prompt tokens / time of the step that processed them
    decode_tps: float         # tokens after the first / time since the first
    peak_memory: int          # bytes: GPU memory allocated on CUDA, resident set size on the CPU
    experts: dict | None = None  # offloading figures so far (hit rate, bytes copied, CPU/GPU shares)


def encode_prompt(tokenizer: TextTokenizer, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if prompt and isinstance(prompt[0], dict):
        return tokenizer.apply_chat_template(prompt)
    return list(prompt)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LLMEngine:
    def __init__(self, ck: Checkpoint, max_seqs: int = 8, max_len: int | None = None, cuda_graphs: bool = True,
                 offload: OffloadConfig | None = None, expert_costs: ExpertCosts | None = None,
                 deterministic: bool = False):
        """offload: the latency regime (experts in host memory under a GPU budget); expert_costs: its
        planner's costs, resolved by the caller (perf.profile.engine_costs), else measured where needed;
        deterministic: batch-invariant forward (engine/invariant.py; converts ck.model in place), no CUDA graphs."""
        self.ck, self.model, self.tokenizer = ck, ck.model, ck.tokenizer
        self.deterministic = deterministic
        if deterministic:
            if offload is not None:
                raise MoeflowError("--deterministic runs every expert on one device: not with --gpu-memory")
            from moeflow.engine.invariant import make_batch_invariant
            make_batch_invariant(ck.model, ck.store)
            cuda_graphs = False
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        ctx = ck.cfg.max_position_embeddings
        self.max_len = min(max_len or ctx, ctx)
        self.cache = KVCache(ck.cfg, max_seqs, self.max_len, self.dtype, self.device)
        self.eos = set(ck.eos_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[int, DecodeGraph] = {}  # slot -> captured decode step
        self.graph_pool = None
        self.budget = None
        self.process = ProcessSettings()  # what the engine changes process-wide; close() puts it back
        if offload is not None:
            self.budget = attach_offload(ck, offload, self.cache.nbytes, self.max_len, expert_costs, max_seqs,
                                         graphs=cuda_graphs, settings=self.process)

    # -- requests ------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def add_request(self, prompt: Prompt, params: SamplingParams = SamplingParams()) -> Sequence:
        ids = self.encode(prompt)
        if not ids:
            raise MoeflowError("the prompt is empty")
        if len(ids) >= self.max_len:
            raise MoeflowError(f"the prompt has {len(ids)} tokens; the context holds {self.max_len} "
                               f"(model limit {self.ck.cfg.max_position_embeddings})")
        if bad := [i for i in ids if not 0 <= i < self.ck.cfg.vocab_size]:
            raise MoeflowError(f"token id {bad[0]} is outside the vocabulary (size {self.ck.cfg.vocab_size})")
        seq = Sequence(ids, params, self.tokenizer)
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request (e.g. its client went away) and free its cache slot."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self._retire(seq)
        if not seq.finished:
            seq.finish("abort")

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------------------
    def step(self) -> list[GenerationResponse]:
        self._admit()
        if not self.running:
            return []
        seqs = list(self.running)
        tokens = sample(self._forward(seqs), seqs)
        return self._postprocess_all(seqs, tokens)

    def _admit(self) -> None:
        # A step runs at most max_len tokens (the activation workspace is sized for that), unless a lone
        # prompt needs the step to itself; prompts that do not fit wait, in arrival order. (A prompt beside
        # other sequences attends on its own, AttnBatch.ragged: nothing is padded to the longest.)
        room = self.max_len - len(self.running)
        while self.waiting and self.cache.free:
            n = len(self.waiting[0].new_tokens)
            if n > room and self.running:
                break
            seq = self.waiting.popleft()
            seq.slot, seq.status, seq.t_start = self.cache.allocate(), Status.RUNNING, time.perf_counter()
            self.running.append(seq)
            room -= n

    @torch.inference_mode()
    def _forward(self, seqs: list[Sequence], all_logits: bool = False) -> torch.Tensor:
        """Run every sequence's uncached tokens; logits of each sequence's last token [B, V] (or all, [N, V])."""
        for s in seqs:
            if self.model.rerun_from_start(s.num_cached, len(s.tokens)):
                s.num_cached = 0
        new = [s.new_tokens for s in seqs]
        q_lens = [len(t) for t in new]
        if len(seqs) == 1 and q_lens == [1] and not all_logits and self._graphs_on():
            (s,) = seqs
            if s.slot not in self.graphs:
                kind = DecodeGraph if graphs_possible(self.model) else PiecewiseDecodeGraph
                self.graph_pool = self.graph_pool or torch.cuda.graph_pool_handle()
                self.graphs[s.slot] = kind(self.model, self.cache, s.slot, self.max_len, self.ck.cfg.sliding_window,
                                           self.graph_pool)
            logits = self.graphs[s.slot](new[0][0], s.num_cached)
            s.num_cached += 1
            return logits
        batch = AttnBatch.build([s.slot for s in seqs], [s.num_cached for s in seqs], q_lens, self.device,
                                self.ck.cfg.sliding_window, per_sequence=self.deterministic)
        tokens = torch.tensor([t for ts in new for t in ts], device=self.device)  # [N]
        hidden = self.model(tokens, batch, self.cache)                             # [N, H]
        for s, n in zip(seqs, q_lens):
            s.num_cached += n
        if not all_logits:
            hidden = hidden[torch.tensor(q_lens, device=self.device).cumsum(0) - 1]  # [B, H]
        return self.model.logits(hidden)

    def _graphs_on(self) -> bool:
        return self.cuda_graphs and self.device.type == "cuda"

    def _postprocess_all(self, seqs: list[Sequence], tokens: list[int]) -> list[GenerationResponse]:
        """Each sequence's token taken; the step's peak memory and expert counters read once for all of them
        (per sequence they cost a large batch ~0.1 s a step)."""
        step = (peak_memory(self.device), self.expert_stats())
        return [self._postprocess(s, t, step) for s, t in zip(seqs, tokens)]

    def _postprocess(self, seq: Sequence, token: int, step: tuple[int, dict | None]) -> GenerationResponse:
        now = time.perf_counter()
        if not seq.output_ids:
            seq.t_first = now
        eos = token in self.eos and not seq.params.ignore_eos
        text = "" if eos else seq.append(token)
        if eos:
            seq.output_ids.append(token)
            seq.finish("stop")
        elif not seq.finished and (len(seq.output_ids) >= seq.params.max_new_tokens
                                   or seq.num_tokens >= self.max_len):
            seq.finish("length")
        if seq.finished:
            text += seq.flush()
            self._retire(seq)
        return self._response(seq, token, text, step)

    def _retire(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.release(seq.slot)

    def _response(self, seq: Sequence, token: int, text: str, step: tuple[int, dict | None]) -> GenerationResponse:
        end = seq.t_end if seq.finished else time.perf_counter()
        n_out = len(seq.output_ids)
        return GenerationResponse(
            seq_id=seq.id, text=text, token=token, finished=seq.finished, finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids), generation_tokens=n_out, ttft_s=seq.t_first - seq.t_arrival,
            prefill_tps=len(seq.prompt_ids) / max(seq.t_first - seq.t_start, 1e-9),
            decode_tps=(n_out - 1) / (end - seq.t_first) if n_out > 1 and end > seq.t_first else 0.0,
            peak_memory=step[0], experts=step[1])

    def expert_stats(self) -> dict | None:
        stats = self.model.experts.stats
        return stats.as_dict() if stats is not None else None

    def close(self) -> None:
        """Stop the expert backend's threads and put back what the engine set process-wide (PyTorch's
        threads, the allocator's cap). The engine is not used after."""
        self.graphs.clear()
        self.model.experts.close()
        self.process.restore()

    # -- conveniences --------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams = SamplingParams()) -> Iterator[GenerationResponse]:
        seq = self.add_request(prompt, params)
        while not seq.finished:
            for r in self.step():
                if r.seq_id == seq.id:
                    yield r

    def generate(self, prompts: list[Prompt], params: SamplingParams = SamplingParams()) -> list[Sequence]:
        seqs = [self.add_request(p, params) for p in prompts]
        while self.has_unfinished:
            self.step()
        return seqs

    def prefill_logits(self, prompts: list[Prompt]) -> list[torch.Tensor]:
        """Logits of every prompt position [T_i, V] (for parity checks); leaves the cache free."""
        seqs = [Sequence(self.encode(p), SamplingParams(), self.tokenizer) for p in prompts]
        for s in seqs:
            s.slot = self.cache.allocate()
        try:
            logits = self._forward(seqs, all_logits=True)
        finally:
            for s in seqs:
                self.cache.release(s.slot)
        return list(logits.split([len(s.prompt_ids) for s in seqs]))
