"""The demo model's training code, on a tiny model and a generated corpus: the cache-free forward against
transformers, the routing statistics, a few training steps (the loss falls, the balance loss is there), and
an export that moeflow and transformers read to the same logits."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch

from moeflow.checkpoint import load
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.models.layers import AttnBatch
from moeflow.train import data
from moeflow.train.demo import SIZES, CastExperts, grouped_backward_works, train
from moeflow.train.routing import balance_loss, reuse, routing_stats

WORDS = {
    "noun": ["module", "function", "list", "string", "file", "class", "object", "dictionary", "socket", "thread"],
    "verb": ["returns", "creates", "reads", "writes", "sorts", "opens", "closes", "copies", "parses", "prints"],
    "adj": ["new", "empty", "sorted", "binary", "default", "optional", "current", "given", "large", "small"],
}


def sentence(rng: random.Random) -> str:
    w = {k: rng.choice(v) for k, v in WORDS.items()}
    return rng.choice([f"The {w['noun']} {w['verb']} a {w['adj']} object.",
                       f"This {w['adj']} {w['noun']} is used when the code {w['verb']} data.",
                       f"Use :func:`{w['noun']}` to get the {w['adj']} value."])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(24):
        (root / f"doc{i:02d}.rst.txt").write_text("\n".join(sentence(rng) for _ in range(60)))
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "model"
    log = train(replace(SIZES["test"], steps=40), corpus, out, minutes=5, seed=0, device="cpu")
    return out, log


# -- pieces ----------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 5}], ids=["causal", "sliding-window"])
def test_uncached_forward_matches_transformers(hf_checkpoint, overrides):
    """AttnBatch.full (no KV cache, B rows of T) gives transformers' logits for every row."""
    path, hf = hf_checkpoint("mixtral", **overrides)
    ck = load(path)
    tokens = torch.randint(3, 310, (3, 17), generator=torch.Generator().manual_seed(0))
    ours = ck.model.logits(ck.model(tokens.flatten(), AttnBatch.full(3, 17, tokens.device, ck.cfg.sliding_window)))
    ref = hf(tokens).logits.reshape(3 * 17, -1)
    assert float((ours.double() - ref.double()).norm() / ref.double().norm()) < 1e-4


def test_balance_loss_and_reuse_baselines():
    g = torch.Generator().manual_seed(0)
    assert balance_loss(torch.randn(20000, 8, generator=g) * 0.01, 2) == pytest.approx(1.0, abs=0.01)
    collapsed = torch.zeros(1000, 8)
    collapsed[:, :2] = 10.0  # every token to experts 0 and 1
    assert balance_loss(collapsed, 2) > 3.9
    uniform = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(20000)]).view(4, 5000, 2)
    assert reuse(uniform, 8) == pytest.approx(0.25, abs=0.01)
    same = torch.tensor([[[1, 2], [2, 1], [1, 2]]])
    assert reuse(same, 8) == 1.0
    stats = routing_stats([uniform], 8)
    assert stats["layers"][0]["entropy"] == pytest.approx(math.log(8), abs=0.01)
    assert stats["uniform_reuse"] == 0.25 and stats["tokens"] == 20000


def test_heldout_split_and_windows(corpus):
    train_texts, heldout, names = data.read_corpus(corpus)
    assert heldout and len(train_texts) + len(heldout) == 24
    assert all(data.is_heldout(n) for n in names) or len(names) == 1
    stream = torch.arange(100)
    w = data.windows(stream, 10, offset=3)
    assert w.shape == (9, 11) and w[0, 0] == 3 and w[1, 0] == w[0, -1]
    batches = data.Batches(stream, 10, 4, seed=0)
    a, b = next(batches), next(batches)
    assert a.shape == (4, 11) and not torch.equal(a, b)
    assert torch.equal(next(data.Batches(stream, 10, 4, seed=0)), a)  # the seed fixes the order


# -- a short training run --------------------------------------------------------------------------------
def test_training_lowers_the_loss(trained):
    out, log = trained
    loss, aux = log["curve"]["loss"], log["curve"]["aux"]
    assert len(loss) == 40 and log["training"]["stopped_by"] == "steps"
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.5, loss
    assert all(0.9 < a < 8 for a in aux), aux  # the balance loss is computed: >= 1, 1 when balanced
    assert log["curve"]["eval_loss"][-1] < log["curve"]["eval_loss"][0]
    assert math.isfinite(log["heldout"]["perplexity"]) and log["heldout"]["bits_per_byte"] > 0
    assert len(log["routing"]["layers"]) == SIZES["test"].layers
    assert json.loads((out / "training_log.json").read_text())["seed"] == 0


def test_export_loads_in_transformers_with_the_same_logits(trained):
    import transformers

    out, _ = trained
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "training_log.json"):
        assert (out / f).exists(), f
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ck = load(out, dtype="fp32")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf = hf.float().eval()
    ids = ck.tokenizer.encode("The module returns a sorted list.")
    with torch.no_grad():
        ours = LLMEngine(ck, max_seqs=1, max_len=32).prefill_logits([ids])[0]
        ref = hf(torch.tensor([ids])).logits[0]
    assert float((ours.double() - ref.double()).norm() / ref.double().norm()) < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("The module returns") == ck.tokenizer.encode("The module returns")
    (seq,) = LLMEngine(ck, max_seqs=1, max_len=32).generate(["The"], SamplingParams(max_new_tokens=5))
    assert seq.output_ids


def test_same_seed_same_curve(corpus, trained, tmp_path):
    _, log = trained
    again = train(replace(SIZES["test"], steps=40), corpus, tmp_path / "m", minutes=5, seed=0, device="cpu")
    assert again["curve"]["loss"] == pytest.approx(log["curve"]["loss"], abs=1e-3)
    other = train(replace(SIZES["test"], steps=40), corpus, tmp_path / "o", minutes=5, seed=1, device="cpu")
    assert other["curve"]["loss"] != pytest.approx(log["curve"]["loss"], abs=1e-3)


def test_cli_train_demo_rejects_a_file_as_out(tmp_path, capsys):
    from moeflow.cli import main

    f = tmp_path / "f"
    f.write_text("x")
    assert main(["train-demo", "--corpus", str(tmp_path), "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


# -- on a GPU: the grouped-GEMM training path ----------------------------------------------------------------
@pytest.mark.gpu
def test_grouped_expert_gradients_match_the_loop_on_gpu():
    from moeflow.experts.store import ExpertStore

    assert grouped_backward_works(torch.device("cuda"))
    cfg = SIZES["test"].model_config()
    data_ = torch.randn(len(cfg.moe_layers), cfg.num_experts, cfg.expert_numel, device="cuda") * 0.1
    x = torch.randn(64, cfg.hidden_size, device="cuda")
    ids = torch.stack([torch.randperm(cfg.num_experts, device="cuda")[:2] for _ in range(64)])
    w = torch.rand(64, 2, device="cuda")
    grads = []
    for grouped in (False, True):
        p = data_.clone().requires_grad_()
        CastExperts(ExpertStore(cfg, torch.float32, "cuda", data=p), torch.bfloat16, grouped)(0, x, ids, w) \
            .float().square().sum().backward()
        grads.append(p.grad)
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 2e-2
