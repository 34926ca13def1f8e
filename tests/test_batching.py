"""Continuous batching in LLMEngine: requests join a running batch, leave it, are aborted; a step's size is capped."""

from __future__ import annotations

import pytest
import torch

from moeflow.checkpoint import load
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams

PROMPTS = ["The router picks", "two experts per token", "and the rest stay idle while", "PCIe"]


@pytest.fixture(scope="module")
def ck():
    return load("synthetic:tiny-mixtral")


def test_requests_join_leave_and_abort_without_changing_outputs(ck):
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone = [LLMEngine(ck, max_seqs=1, max_len=128).generate([x], p)[0].output_ids for x in PROMPTS]
    eng = LLMEngine(ck, max_seqs=3, max_len=128)
    a = eng.add_request(PROMPTS[0], p)
    eng.step()
    eng.step()
    b = eng.add_request(PROMPTS[1], p)  # joins mid-decode: one step runs b's prompt beside a's next token
    c = eng.add_request(PROMPTS[2], p)
    d = eng.add_request(PROMPTS[3], p)  # no slot left: waits
    assert len(eng.step()) == 3 and d in eng.waiting
    eng.abort(c)  # frees its slot; d takes it at the next step
    assert c.finish_reason == "abort" and c not in eng.running
    eng.step()
    assert d in eng.running and len(eng.running) == 3
    while eng.has_unfinished:
        eng.step()
    assert [a.output_ids, b.output_ids, d.output_ids] == [alone[0], alone[1], alone[3]]
    assert len(eng.cache.free) == 3


def test_a_step_runs_at_most_max_len_tokens(ck):
    eng = LLMEngine(ck, max_seqs=4, max_len=64)
    p = SamplingParams(max_new_tokens=4, ignore_eos=True)
    seqs = [eng.add_request(list(range(10, 50)), p) for _ in range(3)]  # 40-token prompts, 64 per step
    eng.step()
    assert len(eng.running) == 1 and len(eng.waiting) == 2
    while eng.has_unfinished:
        eng.step()
    assert all(s.output_ids == seqs[0].output_ids for s in seqs)


def test_a_prompt_beside_decoding_sequences_attends_on_its_own(ck):
    """A prompt joining three decoding sequences runs in the same step without padding them to its length
    (AttnBatch.ragged), and every sequence gives the tokens it gives alone."""
    from moeflow.models.layers import AttnBatch

    b = AttnBatch.build([0, 1, 2, 3], [7, 7, 7, 0], [1, 1, 1, 20], torch.device("cpu"))
    assert b.ragged == ((0, 7, 1), (1, 7, 1), (2, 7, 1), (3, 0, 20)) and b.mask is None
    p = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompts = [list(range(10, 14)), list(range(20, 24)), list(range(30, 34)), list(range(40, 60))]
    alone = [LLMEngine(ck, max_seqs=1, max_len=64).generate([x], p)[0].output_ids for x in prompts]
    eng = LLMEngine(ck, max_seqs=4, max_len=64)
    seqs = [eng.add_request(x, p) for x in prompts[:3]]
    eng.step()
    seqs.append(eng.add_request(prompts[3], p))
    eng.step()
    assert len(eng.running) == 4 and not eng.waiting
    while eng.has_unfinished:
        eng.step()
    assert [s.output_ids for s in seqs] == alone
