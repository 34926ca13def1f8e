"""The shipped demo model (builtin:pydoc-moe, trained by `moeflow train-demo`): it loads and generates on a CPU,
its greedy text is fixed, transformers computes the same logits, and its routing is measurably
non-uniform (the expert-caching tests rely on that)."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow import MoeflowError
from moeflow.checkpoint import BUILTIN_DIR, load
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.models.layers import AttnBatch
from moeflow.train.routing import RouterTap, routing_stats

NAME = "builtin:pydoc-moe"
FOLDER = BUILTIN_DIR / "pydoc-moe"
shipped = pytest.mark.skipif(not (FOLDER / "model.safetensors").exists(),
                             reason=f"the trained demo model is not in {FOLDER} yet (README: the demo model)")

PROMPT = "The :mod:`json` module"
# the first 24 greedy tokens' text in fp32 on a CPU, recorded when the weights were committed
GREEDY = "\n================================\n\n.. module:: json\n   :synopsis: A module-level interface to the " \
         ":mod:`json`"
# Documentation-style text the model was not trained on (written for this test), for the routing figures.
TEXT = """\
:mod:`queue` --- A synchronized queue class
==========================================

The :mod:`queue` module implements multi-producer, multi-consumer queues. It is especially useful in
threaded programming when information must be exchanged safely between multiple threads. The
:class:`Queue` class in this module implements all the required locking semantics.

.. class:: Queue(maxsize=0)

   Constructor for a FIFO queue. *maxsize* is an integer that sets the upper bound limit on the number
   of items that can be placed in the queue. Insertion will block once this size has been reached,
   until queue items are consumed. If *maxsize* is less than or equal to zero, the queue size is
   infinite.

Example of how to wait for enqueued tasks to be completed::

    import threading
    import queue

    q = queue.Queue()

    def worker():
        while True:
            item = q.get()
            print(f'Working on {item}')
            q.task_done()

    threading.Thread(target=worker, daemon=True).start()
"""


@pytest.fixture(scope="module")
def demo():
    return load(NAME, dtype="fp32")


def test_unknown_builtin_is_a_clear_error():
    with pytest.raises(MoeflowError, match="no built-in model 'no-such-model'"):
        load("builtin:no-such-model")


@shipped
def test_loads_and_generates_on_cpu():
    ck = load(NAME)  # as `moeflow generate` does: the checkpoint's bf16 on the CPU
    assert ck.cfg.model_type == "mixtral" and not ck.synthetic and ck.name == NAME
    (seq,) = LLMEngine(ck, max_seqs=1, max_len=256).generate([PROMPT], SamplingParams(max_new_tokens=48))
    words = seq.text.split()
    assert len(words) >= 5 and sum(w.isalpha() for w in words) >= 3, seq.text  # text, not byte soup
    assert (FOLDER / "model.safetensors").stat().st_size < 40e6


@shipped
def test_greedy_output_is_stable(demo):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    (a,) = LLMEngine(demo, max_seqs=1, max_len=128).generate([PROMPT], params)
    (b,) = LLMEngine(load(NAME, dtype="fp32"), max_seqs=1, max_len=128).generate([PROMPT], params)
    assert a.output_ids == b.output_ids
    if GREEDY is not None:
        assert a.text == GREEDY


@shipped
@torch.no_grad()
def test_same_logits_as_transformers(demo):
    import transformers

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, output_loading_info=True)
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf = hf.float().eval()
    ids = demo.tokenizer.encode(TEXT)[:min(200, demo.cfg.max_position_embeddings)]
    ours = LLMEngine(demo, max_seqs=1, max_len=256).prefill_logits([ids])[0]
    ref = hf(torch.tensor([ids])).logits[0]
    assert float((ours.double() - ref.double()).norm() / ref.double().norm()) < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(FOLDER).encode(TEXT) == demo.tokenizer.encode(TEXT)


@shipped
@torch.no_grad()
def test_routing_is_not_uniform(demo):
    """Per layer, the expert usage on a text has less entropy than uniform use; consecutive tokens keep an
    expert more often than independent uniform top-2 of 8 would (25%) in most layers and on average (the
    first layer, which sees little more than the token itself, reuses at about the uniform rate)."""
    ids = torch.tensor(demo.tokenizer.encode(TEXT))
    with RouterTap(demo.model) as tap:
        demo.model(ids, AttnBatch.full(1, len(ids), ids.device))
        routes = [r.view(1, len(ids), -1) for r in tap.ids()]
    stats = routing_stats(routes, demo.cfg.num_experts)
    assert stats["uniform_reuse"] == 0.25
    for layer in stats["layers"]:
        assert layer["entropy"] < math.log(demo.cfg.num_experts) - 0.01, stats
    assert sum(layer["reuse"] > 0.27 for layer in stats["layers"]) > len(stats["layers"]) / 2, stats
    assert sum(layer["reuse"] for layer in stats["layers"]) / len(stats["layers"]) > 0.3, stats
