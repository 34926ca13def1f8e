"""PipelineEngine: the throughput regime (MoE-Lightning's CGOPipe, arXiv 2411.11217) behind LLMEngine's API.

Decode runs layer by layer over micro-batches of `mu` sequences: QKV on the GPU, q/k/v to the host, attention on
the CPU over the host KV cache (a worker thread), the result back, O projection, router and experts on the GPU.
All micro-batches' attention is handed to the CPU at once, so the CPU attends to micro-batch j+1 while the GPU
finishes micro-batch j; the next layer's streamed experts copy in meanwhile (LayerWeights). Prompts run on the
GPU, whole, layer by layer in rounds (a layer's experts stream in once per round), their K/V moved to the host.
Requests join as others finish (add_request / step as in LLMEngine). On the CPU both tiers are the host, and
the schedule is the same.
The host KV cache (HostKV) gives each sequence a run of positions for its prompt and the tokens it may generate;
a request waits while no run is free or N sequences run.
Legend: B = sequences, N = packed tokens, H = hidden, Hq/Hkv = heads, D = head dim, T = longest prompt.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from moeflow import MoeflowError
from moeflow.checkpoint import Checkpoint
from moeflow.engine.budget import gib
from moeflow.engine.llm_engine import GenerationResponse, LLMEngine
from moeflow.engine.offload import ProcessSettings, held_bytes
from moeflow.engine.sampler import sample
from moeflow.engine.sequence import Sequence, Status
from moeflow.models.layers import Attention, AttnBatch, SparseMoe
from moeflow.perf.throughput_model import LOGITS_ROWS, PREFILL_CHUNK, PREFILL_GROUP, STAGED, ThroughputPolicy
from moeflow.experts.cpu import physical_cores
from moeflow.models.mla import MlaAttention
from moeflow.pipeline.attention import cpu_decode_attention, cpu_form
from moeflow.pipeline.kv import HostKV
from moeflow.pipeline.native import load as load_native
from moeflow.pipeline.weights import LayerWeights


class PipelineEngine(LLMEngine):
    def __init__(self, ck: Checkpoint, plan: ThroughputPolicy, max_len: int, native: bool | None = None,
                 kv_positions: int | None = None, gpu_memory: int | None = None):
        """max_len: prompt + generated tokens of one sequence at most; kv_positions: the host KV cache's
        positions over all sequences (default N x max_len; at least max_len); native: the native CPU attention
        kernel (None: where it builds; False: PyTorch); gpu_memory: the budget (bytes) the plan fits, which the
        allocator is capped at on a GPU, as the latency regime's is (the non-expert weights already loaded)."""
        if plan.attn_gpu:
            raise MoeflowError("the pipeline engine runs attention on the CPU; a plan with attention on the GPU "
                               "is not implemented (use attn=cpu)")
        if any(type(layer.self_attn) not in (Attention, MlaAttention) for layer in ck.model.layers):
            raise MoeflowError(f"the pipeline engine does not support {ck.cfg.model_type}'s attention")
        self.ck, self.model, self.tokenizer = ck, ck.model, ck.tokenizer
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_len = min(max_len, ck.cfg.max_position_embeddings)
        rope = self.model.rotary.table
        if rope.long_scale is not None and self.max_len > rope.switch_at:  # no re-run at the long scale here
            raise MoeflowError(f"the pipeline engine runs {ck.cfg.model_type}'s longrope within its first "
                               f"{rope.switch_at} positions: --max-len {self.max_len} is longer (use --max-len "
                               f"{rope.switch_at} or --engine continuous)")
        self.cache = HostKV(ck.cfg, max(kv_positions or plan.N * self.max_len, self.max_len), self.dtype,
                            plan.N)
        self.eos = set(ck.eos_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cuda_graphs, self.graphs, self.graph_pool, self.budget = False, {}, None, None
        self.plan, self.gpu_memory, self.process = plan, gpu_memory, ProcessSettings()
        if gpu_memory is not None and self.device.type == "cuda":  # before the experts' GPU share is allocated
            total = torch.cuda.get_device_properties(self.device).total_memory
            held = held_bytes(self.device, ck.dense_bytes)  # what this process holds beyond the budget's weights
            self.process.cap_memory(min(1.0, (gpu_memory + held) / total), self.device)
        self.weights = LayerWeights(ck.store, self.device, plan.r_w)
        self.rows = [ck.store.slot.get(i) for i in range(ck.cfg.num_hidden_layers)]  # layer -> store row or None
        self.forms = [cpu_form(layer.self_attn) for layer in ck.model.layers]  # each attention on the CPU
        windows = ck.cfg.layer_windows  # each layer's sliding window (GPT-OSS alternates), else the model's
        self.windows = list(windows) if windows else [ck.cfg.sliding_window] * ck.cfg.num_hidden_layers
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moeflow-attention")
        self.native = load_native() if native is not False else None
        if native and self.native is None:
            raise MoeflowError("the native CPU attention kernel could not be built")
        self.threads = physical_cores()
        self.cpu_attention_s = 0.0  # the attention worker's busy time
        self.cpu_attention_bytes = 0  # and the K/V it read
        self.prefill_s = self.decode_s = 0.0
        self.kv_store_s = 0.0  # the worker's time writing prefill K/V into the host arenas
        self.kv_wait_s = 0.0  # the prefill's time waiting for those writes (more than STAGED in flight)
        self.decode_steps = 0
        self.stores: deque = deque()  # prefill K/V on their way to the host arenas (futures of the worker)

    def close(self) -> None:
        self.pool.shutdown()
        self.weights.close()
        self.process.restore()

    def _admit(self) -> None:
        # A prefill round takes whole prompts up to PREFILL_GROUP tokens (one prompt alone may exceed it). It
        # streams every layer's weights as a decode step does: while a batch decodes, wait for an eighth of it to
        # free. A batch still filling (none of it decoded yet) takes rounds until full, else the last few
        # requests would decode alone afterwards, each step as slow as a full batch's.
        decoding = any(s.num_cached > len(s.prompt_ids) for s in self.running)
        if decoding and self.cache.max_seqs - len(self.running) < max(1, self.cache.max_seqs // 8):
            return
        room = PREFILL_GROUP
        while self.waiting and len(self.running) < self.cache.max_seqs:
            head = self.waiting[0]
            n = len(head.prompt_ids)
            if n > room and room < PREFILL_GROUP:
                break
            start = self.cache.allocate(min(n + head.params.max_new_tokens, self.max_len))
            if start is None:
                break
            seq = self.waiting.popleft()
            seq.slot, seq.status, seq.t_start = start, Status.RUNNING, time.perf_counter()
            self.running.append(seq)
            room -= n

    @torch.inference_mode()
    def step(self) -> list[GenerationResponse]:
        """Prompts first: a step with newly admitted requests prefills them alone, so the weights stream once
        per prefill round and decode runs on the whole batch (not on a batch that ramps up and down)."""
        self._admit()
        seqs = [s for s in self.running if s.num_cached == 0] or list(self.running)
        if not seqs:
            return []
        try:
            tokens = self._tokens(seqs)
        except torch.OutOfMemoryError:
            p = self.plan
            budget = f"--gpu-memory {gib(self.gpu_memory)}" if self.gpu_memory is not None else "the GPU"
            raise MoeflowError(f"the pipeline's plan N={p.N}, mu={p.mu}, r_w={p.r_w:.2f} needed more memory than "
                               f"{budget} holds (its count fell short): rerun with a smaller --plan") from None
        return self._postprocess_all(seqs, tokens)

    def _tokens(self, seqs: list[Sequence]) -> list[int]:
        h, tokens = self._hidden(seqs), []                                    # [B, H]
        for a in range(0, len(seqs), LOGITS_ROWS):  # fp32 logits of a whole batch [N, V] would outgrow the workspace
            tokens += sample(self.model.logits(h[a:a + LOGITS_ROWS]), seqs[a:a + LOGITS_ROWS])
        return tokens

    def _retire(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.release(seq.slot)

    @torch.inference_mode()
    def _forward(self, seqs: list[Sequence], all_logits: bool = False) -> torch.Tensor:
        """Prompts of new sequences (prefilled), one token of the others (decoded): logits [B, V] in seqs' order."""
        if all_logits:
            raise MoeflowError("the pipeline engine computes the last position's logits only")
        groups = [g for g in ([s for s in seqs if s.num_cached == 0], [s for s in seqs if s.num_cached > 0]) if g]
        h = {s.id: row for g in groups for s, row in zip(g, self._hidden(g))}
        return self.model.logits(torch.stack([h[s.id] for s in seqs]))

    def _hidden(self, seqs: list[Sequence]) -> torch.Tensor:
        """seqs all new (their prompts prefilled) or all running (one token decoded): final hidden states [B, H]."""
        prefill, t = seqs[0].num_cached == 0, time.perf_counter()
        h = self.model.norm(self._prefill(seqs) if prefill else self._decode(seqs))
        self._sync()
        if prefill:
            self.prefill_s += time.perf_counter() - t
        else:
            self.decode_s += time.perf_counter() - t
            self.decode_steps += 1
        return h

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the MoE FFN ---------------------------------------------------------------------------------------
    def _mlp(self, i: int, layer, h: torch.Tensor) -> torch.Tensor:
        """Layer i's FFN on h [N, H]: dense, or the router and the layer's experts from LayerWeights."""
        if not isinstance(layer.mlp, SparseMoe):
            return layer.mlp(h)
        row = self.rows[i]
        self.weights.acquire(row)
        ids, w = layer.mlp.select(h)  # [N, K] each
        out = self.weights.ffn(row, h, ids, w)
        return out if layer.mlp.shared_experts is None else out + layer.mlp.shared_experts(h)

    def _prefetch_after(self, i: int) -> None:
        """Start copying the next MoE layer's streamed experts while layer i computes."""
        nxt = next((r for r in self.rows[i + 1:] if r is not None), None)
        if nxt is not None:
            self.weights.prefetch(nxt)

    def _done_with(self, i: int) -> None:
        if self.rows[i] is not None:
            self.weights.release(self.rows[i])

    # -- prefill: whole prompts on the GPU, K/V to the host ----------------------------------------------------
    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Layer by layer, every chunk of up to PREFILL_CHUNK prompt tokens in turn: the layer's experts stream
        in once for all the chunks of the round."""
        cfg, dev = self.ck.cfg, self.device
        chunks = [Chunk(self.model, part, dev, cfg.sliding_window) for part in split_prompts(seqs, PREFILL_CHUNK)]
        B, T = max(len(c.seqs) for c in chunks), max(c.T for c in chunks)
        scratch = [torch.zeros((B, T, *shape), dtype=self.dtype, device=dev)
                   for shape in cfg.kv_token_shapes]          # one chunk's cache as the attention writes it [B, T, ...]
        for i, layer in enumerate(self.model.layers):
            self._prefetch_after(i)
            for c in chunks:
                batch = c.batch.for_window(self.windows[i])
                c.x = c.x + layer.self_attn(layer.input_layernorm(c.x), c.rope, batch, scratch)
                rows = self.forms[i].rows([kv[:len(c.seqs), :c.T][c.valid] for kv in scratch])
                for arena, kv in zip(self.cache.arenas(i), rows):
                    self._to_host(c, arena, kv)  # [N, Hkv, D] (or [N, 1, R + Dr]) in one copy each
                c.x = c.x + self._mlp(i, layer, layer.post_attention_layernorm(c.x))
            self._done_with(i)
        t = time.perf_counter()
        while self.stores:
            self.stores.popleft().result()
        self.kv_wait_s += time.perf_counter() - t
        for s in seqs:
            s.num_cached = len(s.prompt_ids)
        return torch.cat([c.x[c.last] for c in chunks])

    def _to_host(self, c: Chunk, arena: torch.Tensor, kv: torch.Tensor) -> None:
        """kv [N, Hkv, D] into the chunk's runs of arena: from a GPU, copied into pinned memory with no sync and
        stored by the worker thread once landed, while the GPU goes on (at most STAGED copies in flight)."""
        if self.device.type != "cuda":
            c.store(arena, kv.cpu())
            return
        t = time.perf_counter()
        while len(self.stores) >= STAGED:
            self.stores.popleft().result()
        self.kv_wait_s += time.perf_counter() - t
        host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
        host.copy_(kv, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self.stores.append(self.pool.submit(self._store_when_ready, ready, c, arena, host))

    def _store_when_ready(self, ready: torch.cuda.Event, c: Chunk, arena: torch.Tensor, host: torch.Tensor) -> None:
        ready.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():  # as the engine's steps run
            c.store(arena, host)
        self.kv_store_s += time.perf_counter() - t

    # -- decode: micro-batches, CPU attention beside the GPU ---------------------------------------------------
    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        dev, mu = self.device, self.plan.mu
        starts = [s.num_cached for s in seqs]
        x = self.model.embed_tokens(torch.tensor([s.new_tokens[0] for s in seqs], device=dev))  # [B, H]
        cos, sin = self.model.rotary(torch.tensor(starts, device=dev), x.dtype)
        mbs = [slice(a, min(a + mu, len(seqs))) for a in range(0, len(seqs), mu)]
        slots = [s.slot for s in seqs]
        for i, layer in enumerate(self.model.layers):
            self._prefetch_after(i)
            x = self._decode_layer(i, layer, x, (cos, sin), mbs, slots, starts)
            self._done_with(i)
        for s in seqs:
            s.num_cached += 1
        return x

    def _decode_layer(self, i, layer, x, rope, mbs, slots, starts) -> torch.Tensor:
        form = self.forms[i]
        jobs = []
        for sl in mbs:  # every micro-batch's QKV, each handed to the CPU as soon as it is on the host
            q, k, v = form.inputs(layer.input_layernorm(x[sl]), (rope[0][sl], rope[1][sl]))
            q_h, k_h = (t.to("cpu", non_blocking=True) for t in (q, k))
            host = (q_h, k_h, k_h if v is k else v.to("cpu", non_blocking=True))  # one row for K and V: one copy
            ready = torch.cuda.Event() if dev_is_cuda(x) else None
            if ready is not None:
                ready.record()
            jobs.append(self.pool.submit(self._attend, ready, host, i, slots[sl], starts[sl]))
        out = []
        for sl, job in zip(mbs, jobs):  # the GPU's share of micro-batch j while the CPU attends to j+1
            o = job.result().to(x.device, non_blocking=True)                      # [b, Hq, D]
            h = x[sl] + layer.self_attn.o_proj(form.output(o))
            out.append(h + self._mlp(i, layer, layer.post_attention_layernorm(h)))
        return torch.cat(out)

    def _attend(self, ready, host, i, slots, starts) -> torch.Tensor:
        if ready is not None:
            ready.synchronize()  # q/k/v have landed in host memory (waiting is not the CPU's work)
        t = time.perf_counter()
        pinned, form, (k_cache, v_cache) = self.device.type == "cuda", self.forms[i], self.cache[i]
        q, k, v = host
        out = torch.empty(q.shape, dtype=q.dtype, pin_memory=pinned)  # the native kernel writes here
        with torch.inference_mode():
            o = cpu_decode_attention(q, k, v, k_cache, v_cache, slots, starts, self.windows[i], self.native,
                                     self.threads, out, form.scale, form.sinks)
        self.cpu_attention_s += time.perf_counter() - t
        w = self.windows[i]
        positions = sum(min(p + 1, w) if w else p + 1 for p in starts)
        reads = 1 if form.shared_kv else 2  # K and V, or the one arena of both
        self.cpu_attention_bytes += reads * positions * k_cache.stride(0) * k_cache.element_size()
        return o if o is out or not pinned else o.pin_memory()


def dev_is_cuda(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def split_prompts(seqs: list[Sequence], tokens: int) -> list[list[Sequence]]:
    """seqs in order, in runs of at most `tokens` prompt tokens (a longer prompt alone)."""
    out, n = [[]], 0
    for s in seqs:
        if out[-1] and n + len(s.prompt_ids) > tokens:
            out.append([])
            n = 0
        out[-1].append(s)
        n += len(s.prompt_ids)
    return out


class Chunk:
    """One prefill chunk's prompts: hidden states x [N, H], their attention batch and rotary tables, where
    their K/V go in the host arena (dst [N]) and which rows of a padded [B, T] scratch hold them (valid)."""

    def __init__(self, model, seqs: list[Sequence], dev: torch.device, window: int | None):
        lens = [len(s.prompt_ids) for s in seqs]
        self.seqs, self.T = seqs, max(lens)
        self.batch = AttnBatch.build(list(range(len(seqs))), [0] * len(seqs), lens, dev, window)
        self.valid = torch.arange(self.T, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]  # [B, T]
        self.dst = torch.cat([torch.arange(s.slot, s.slot + n) for s, n in zip(seqs, lens)])      # [N]
        self.x = model.embed_tokens(torch.tensor([t for s in seqs for t in s.prompt_ids], device=dev))  # [N, H]
        self.rope = model.rotary(self.batch.positions, self.x.dtype)
        self.last = torch.tensor(lens, device=dev).cumsum(0) - 1                                   # [B]
        follow = all(s.slot + n == t.slot for s, n, t in zip(seqs, lens, seqs[1:]))  # runs taken in order
        self.span = slice(seqs[0].slot, seqs[-1].slot + lens[-1]) if follow else None

    def store(self, arena: torch.Tensor, kv: torch.Tensor) -> None:
        """kv [N, Hkv, D] into the sequences' runs of arena [P, Hkv, D]."""
        if self.span is not None:
            arena[self.span].copy_(kv)
        else:
            arena[self.dst] = kv
