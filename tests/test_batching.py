"""Continuous batching in LLMEngine: requests join a running batch, leave it, are aborted; a step's size is capped."""

from __future__ import annotations

import pytest

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


def test_padded_batch_stays_within_max_len(ck):
    """A batched step pads every sequence to the longest: three decoding sequences and a 20-token prompt
    would pad to 4 x 20 > 64 tokens, so the prompt waits until fewer sequences run."""
    eng = LLMEngine(ck, max_seqs=4, max_len=64)
    short = SamplingParams(max_new_tokens=3, ignore_eos=True)
    for _ in range(3):
        eng.add_request(list(range(10, 14)), short)
    eng.step()
    assert len(eng.running) == 3
    late = eng.add_request(list(range(10, 30)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    eng.step()
    assert late in eng.waiting
    while eng.has_unfinished:
        eng.step()
    assert late.finished and len(late.output_ids) == 2
