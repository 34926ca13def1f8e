"""DistEngine: LLMEngine over several ranks. Rank 0 runs the requests (tokenizer, sampling, printing, HTTP);
before each forward it announces the step (each sequence's slot, cached length and new tokens) on the control
group, and every other rank runs the same forward on its own device with its share of the weights
(tp.py, ep.py), so the collectives inside the model meet. One rank is LLMEngine with no-op collectives.
Legend: B = sequences in the step, N = their new tokens, L = MoE layers, E = experts.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch

from moeflow import MoeflowError
from moeflow.checkpoint import Checkpoint
from moeflow.dist.ep import ExpertParallel, OwnedStore, local_ids, local_store, owners, placement_counts
from moeflow.dist.groups import Ranks
from moeflow.dist.tp import split_model
from moeflow.engine.llm_engine import LLMEngine
from moeflow.experts.local import LocalExperts

STOP, STEP, NEW = 0, 1, 2  # control messages [kind, B, N, all_logits]; NEW: an engine's settings follow
_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (this rank's checkpoint, local ids)


class _Mirror:
    """A follower's view of one sequence in a step: what LLMEngine._forward reads."""

    def __init__(self, slot: int, num_cached: int, total: int, new: list[int]):
        self.slot, self.num_cached, self.tokens, self.new_tokens = slot, num_cached, range(total), new


class DistEngine(LLMEngine):
    def __init__(self, ck: Checkpoint, ranks: Ranks, **kw):
        """kw: LLMEngine's (rank 0's; the other ranks receive them, in follow()). The experts must be in host
        memory when ranks.world > 1 (each rank keeps its own share); a checkpoint is split once, at its first
        engine, and later engines reuse the split."""
        self.ranks = ranks
        if ranks.world > 1:
            if ranks.leader:
                ranks.broadcast(torch.tensor([NEW, 0, 0, 0]))
            kw = ranks.broadcast_object(kw if ranks.leader else None)
        offload = kw.get("offload")
        if ranks.world > 1:
            if kw.get("deterministic"):
                raise MoeflowError("--deterministic runs on one device: not with --gpus above 1")
            if offload is not None and (offload.routing_trace or offload.expert_maps):
                raise MoeflowError("--routing-trace and --expert-maps are not supported with --gpus above 1 yet")
            if ck.model not in _SPLITS:
                _SPLITS[ck.model] = self._split(ck, offload)
            ck, local = _SPLITS[ck.model]
            if offload is None:
                ck = replace(ck, store=ck.store.to(ranks.device))
            ck.model.set_experts(LocalExperts(ck.store))
            kw = {**kw, "cuda_graphs": False}  # a graph would freeze the collectives' inputs; not measured yet
            if offload is not None:
                kw["offload"] = replace(offload, placement=None)  # ownership used it; residents spread evenly
        super().__init__(ck, **kw)
        if ranks.world > 1:
            self.model.set_experts(ExpertParallel(self.model.experts, local, ck.cfg.moe_layers, self.device))

    def _split(self, ck: Checkpoint, offload) -> tuple[Checkpoint, torch.Tensor]:
        """This rank's share: heads and dense rows (tp.py), the experts it owns (ep.py)."""
        cfg, ranks = ck.cfg, self.ranks
        if ck.store.data.device.type != "cpu":
            raise MoeflowError("--gpus above 1 loads the experts in host memory first (expert_device='cpu')")
        if isinstance(ck.store, OwnedStore):  # loaded with its share only: the ownership it was loaded by
            mine = torch.tensor(ck.store.owned)
        else:
            counts = placement_counts(offload.placement if offload is not None else None, ck.name, cfg)
            mine = owners(counts, len(cfg.moe_layers), cfg.num_experts, ranks.world) == ranks.rank
        local = local_ids(mine)
        store = local_store(ck.store, local)
        # the full store's memory given back (this rank keeps its share); one element seen in its shape, for
        # callers that read its sizes
        ck.store.data = ck.store.data.new_zeros(1).expand(ck.store.data.shape)
        kv_cfg = split_model(ck.model, cfg, ranks)
        cfg = replace(kv_cfg, num_experts=store.cfg.num_experts)  # the KV cache's heads, the local experts
        return replace(ck, cfg=cfg, store=store), local

    @property
    def leads(self) -> bool:
        return self.ranks.leader and self.ranks.world > 1

    def _forward(self, seqs, all_logits: bool = False) -> torch.Tensor:
        if self.leads:
            self._announce(seqs, all_logits)
        return super()._forward(seqs, all_logits)

    def _announce(self, seqs, all_logits: bool) -> None:
        for s in seqs:  # LLMEngine._forward's own re-run rule, applied first so the message carries its result
            if self.model.rerun_from_start(s.num_cached, len(s.tokens)):
                s.num_cached = 0
        new = [s.new_tokens for s in seqs]
        self.ranks.broadcast(torch.tensor([STEP, len(seqs), sum(map(len, new)), int(all_logits)]))
        body = [v for s in seqs for v in (s.slot, s.num_cached, len(s.tokens))] + [t for ts in new for t in ts]
        self.ranks.broadcast(torch.tensor(body, dtype=torch.long))  # [3B + N]

    def _follow_step(self, B: int, N: int, all_logits: bool) -> None:
        """Run the step rank 0 announced: B sequences, N new tokens."""
        body = self.ranks.broadcast(torch.zeros(3 * B + N, dtype=torch.long)).tolist()
        heads, toks, seqs = body[:3 * B], body[3 * B:], []
        for b in range(B):
            slot, cached, total = heads[3 * b:3 * b + 3]
            n = total - cached
            seqs.append(_Mirror(slot, cached, total, toks[:n]))
            toks = toks[n:]
        super()._forward(seqs, all_logits)

def stop_followers(ranks: Ranks) -> None:
    """Rank 0 is done: the other ranks' follow() returns."""
    if ranks.leader and ranks.world > 1:
        ranks.broadcast(torch.tensor([STOP, 0, 0, 0]))


def follow(ck: Checkpoint, ranks: Ranks) -> None:
    """The other ranks' loop: build each engine rank 0 builds (on ck), run each step it announces, until it
    says stop."""
    engine = None
    try:
        while True:
            kind, B, N, all_logits = ranks.broadcast(torch.zeros(4, dtype=torch.long)).tolist()
            if kind == STOP:
                return
            if kind == NEW:
                if engine is not None:
                    engine.close()
                engine = DistEngine(ck, ranks)
            else:
                engine._follow_step(B, N, bool(all_logits))
    finally:
        if engine is not None:
            engine.close()
