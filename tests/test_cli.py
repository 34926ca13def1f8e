"""The `moeflow` command end to end: `generate` on the embedded default and on a folder written by `synth`
(which transformers must load and run to the same tokens), seeded sampling, stop strings, bad flags,
and the `python -m moeflow` entry point."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from moeflow.checkpoint import load
from moeflow.cli import DEFAULT_MODEL, DEFAULT_PROMPT, main
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams

SAMPLING = ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "50"]
SENTENCE = "The quick brown fox jumps over the lazy dog; mixture-of-experts run 42 experts!"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def generated(out: str) -> str:
    """The streamed text: `generate` ends it with one newline."""
    assert out.endswith("\n"), repr(out)
    return out[:-1]


def figures(err: str) -> dict:
    """The figures line (the last stderr line): prompt tokens, generated tokens, finish reason."""
    line = err.strip().splitlines()[-1]
    for word in ("prompt", "prefill", "decode", "tok/s", "peak"):
        assert word in line, (word, line)
    prompt = re.search(r"prompt (\d+) tok", line)
    gen = re.search(r"\((\d+) tok, (\w+)\)", line)
    assert prompt and gen, line
    return {"line": line, "prompt": int(prompt[1]), "tokens": int(gen[1]), "reason": gen[2]}


@pytest.fixture(scope="module")
def default_ck():
    return load(DEFAULT_MODEL)


# -- (a) the embedded default ----------------------------------------------------------------------------
def test_generate_embedded_default(capsys, default_ck):
    n_new = 16
    rc, out, err = run(capsys, "generate", "--max-new-tokens", str(n_new))
    assert rc == 0, err
    text = generated(out)
    assert text.strip()
    lines = err.strip().splitlines()
    if default_ck.synthetic:  # random weights say so on a line of their own
        assert len(lines) == 2, err
        assert "random weights" in lines[0] and DEFAULT_MODEL in lines[0]
    else:
        assert len(lines) == 1, err
    fig = figures(err)
    assert DEFAULT_MODEL in fig["line"]
    assert fig["prompt"] == len(default_ck.tokenizer.encode(DEFAULT_PROMPT))
    assert 1 <= fig["tokens"] <= n_new
    assert fig["reason"] == ("length" if fig["tokens"] == n_new else "stop")
    assert re.search(r"peak host memory [\d.]+ GiB", fig["line"])
    # what was streamed is exactly what the engine generates for the same request
    (seq,) = LLMEngine(default_ck, max_seqs=1, max_len=256).generate(
        [DEFAULT_PROMPT], SamplingParams(max_new_tokens=n_new))
    assert text == seq.text
    assert fig["tokens"] == len(seq.output_ids)


def test_python_dash_m_entry(capsys, tmp_path):
    argv = ["generate", "--max-new-tokens", "8", "--ignore-eos"]
    env = os.environ | {"PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "moeflow", *argv], capture_output=True, text=True,
                          encoding="utf-8", cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    fig = figures(proc.stderr)
    assert fig["tokens"] == 8 and fig["reason"] == "length"
    rc, out, _ = run(capsys, *argv)
    assert rc == 0
    assert proc.stdout == out  # the same greedy text in-process and through `python -m moeflow`
    # user errors leave the process with status 2 and one line, also through the module entry
    bad = subprocess.run([sys.executable, "-m", "moeflow", "generate", "--top-p", "0"], capture_output=True,
                         text=True, encoding="utf-8", cwd=tmp_path, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("moeflow: error:") and bad.stderr.count("\n") == 1, bad.stderr


# -- (b) synth, then generate from the folder; transformers reads the same folder -------------------------
@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tiny-qwen3"
    rc = main(["synth", "tiny-qwen3", "--out", str(out)])
    assert rc == 0
    return out


def test_synth_writes_a_loadable_folder(synth_dir, capsys):
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json"):
        assert (synth_dir / f).exists(), f
    ck = load(synth_dir)
    assert ck.cfg.model_type == "qwen3_moe"
    rc, out, err = run(capsys, "generate", "--model", str(synth_dir), "--chat", "--prompt", "hi",
                       "--max-new-tokens", "5")
    assert rc == 0, err
    fig = figures(err)
    assert synth_dir.name in fig["line"]
    assert fig["prompt"] == len(ck.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert 1 <= fig["tokens"] <= 5
    assert fig["reason"] == ("length" if fig["tokens"] == 5 else "stop")
    # the same request without --chat sees a different (shorter) prompt
    rc, _, err = run(capsys, "generate", "--model", str(synth_dir), "--prompt", "hi", "--max-new-tokens", "1")
    assert rc == 0 and figures(err)["prompt"] == len(ck.tokenizer.encode("hi"))


@torch.inference_mode()
def test_synth_folder_runs_the_same_in_transformers(synth_dir):
    import transformers

    ck = load(synth_dir)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(synth_dir, output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.dtype == ck.store.data.dtype

    ids = ck.tokenizer.encode(SENTENCE)
    (seq,) = LLMEngine(ck, max_seqs=1, max_len=128).generate([ids], SamplingParams(max_new_tokens=8))
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=8)
    assert seq.output_ids == ref[0, len(ids):].tolist()
    assert len(seq.output_ids) >= 1
    # greedy tokens of random weights are a coarse check: the logits must agree too
    ours = LLMEngine(ck, max_seqs=1, max_len=128).prefill_logits([ids])[0]
    theirs = hf(torch.tensor([ids])).logits[0]
    assert ours.shape == theirs.shape
    assert float((ours.double() - theirs.double()).norm() / theirs.double().norm()) < 1e-4


def test_synth_tokenizer_matches_transformers(synth_dir):
    import transformers

    ck = load(synth_dir)
    tok = transformers.AutoTokenizer.from_pretrained(synth_dir)
    for text in (SENTENCE, "hi", "  two  spaces\nand a newline <|im_end|> and ünïcödé"):
        ids = ck.tokenizer.encode(text)
        assert tok.encode(text) == ids
        assert tok.decode(ids, skip_special_tokens=True) == ck.tokenizer.decode(ids)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    hf_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.encode(hf_text, add_special_tokens=False) == ck.tokenizer.apply_chat_template(messages)
    assert tok.eos_token_id in ck.eos_ids


# -- (c) seeded sampling ---------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(capsys):
    def sample(seed: int) -> str:
        rc, out, err = run(capsys, "generate", *SAMPLING, "--seed", str(seed), "--max-new-tokens", "20")
        assert rc == 0, err
        fig = figures(err)
        assert fig["tokens"] == 20 or fig["reason"] == "stop"
        return generated(out)

    first, again, other = sample(3), sample(3), sample(4)
    assert first and first == again
    assert other != first


# -- (d) stop strings ------------------------------------------------------------------------------------
def pick_stop(text: str) -> str:
    """A short alphanumeric piece of `text` that first occurs after its start."""
    for n in (3, 2):
        for i in range(1, len(text) - n + 1):
            piece = text[i:i + n]
            if piece.isascii() and piece.isalnum() and text.find(piece) == i:
                return piece
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_string_ends_generation(capsys):
    argv = ["generate", "--max-new-tokens", "24", "--ignore-eos"]
    rc, out, err = run(capsys, *argv)
    assert rc == 0
    full = generated(out)
    assert figures(err)["tokens"] == 24
    stop = pick_stop(full)
    cut = full.find(stop)

    rc, out, err = run(capsys, *argv, "--stop", "no-such-stop-string", "--stop", stop)
    assert rc == 0, err
    text = generated(out)
    assert text == full[:cut]
    assert stop not in text
    fig = figures(err)
    assert fig["reason"] == "stop" and "stop" in fig["line"]
    assert fig["tokens"] < 24


# -- (e) bad flag values ---------------------------------------------------------------------------------
BAD_FLAGS = [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--max-len", "0"], "--max-len"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_values(capsys, flags, named):
    rc, out, err = run(capsys, "generate", *flags)
    assert rc == 2
    assert out == ""
    assert err.startswith("moeflow: error: ") and err.count("\n") == 1, err
    assert named in err


def test_synth_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert main(["synth", "tiny-mixtral", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("user", [None, "300000"])
def test_import_shortens_openmp_spinning_unless_the_user_set_it(user):
    """Imported before torch, moeflow sets libgomp's spin count (PyTorch's idle OpenMP threads would spin beside
    the CPU expert kernel's); a value the user set stays."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | ({"GOMP_SPINCOUNT": user} if user else {})
    got = subprocess.run([sys.executable, "-c", "import moeflow, os; print(os.environ['GOMP_SPINCOUNT'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert got == (user or "10000")


# -- (f) values checked before anything loads ------------------------------------------------------------
EARLY = [
    (["generate", "--temperature", "nan"], "--temperature"),
    (["generate", "--temperature", "inf"], "--temperature"),
    (["generate", "--top-k", "-3"], "--top-k"),
    (["generate", "--max-len", "100000"], "model's context (1024"),
    (["generate", "--system", "be brief"], "--system needs --chat"),
    (["chat", "--max-context", "5000"], "--max-len 5000"),  # the old spelling still works
    (["plan", "--gpu-memory", "24GiB", "--hit-rate", "7"], "--hit-rate"),
    (["plan", "--gpu-memory", "24GiB", "--hit-rate", "-1"], "--hit-rate"),
    (["bench", "latency", "--budgets", "abc", "--device", "cpu"], "'abc'"),
    (["bench", "generate", "--new-tokens", "0"], "at least 1"),
    (["serve", "--port", "99999"], "not a TCP port"),
    (["generate", "--device", "gpu"], "invalid choice"),
    (["generate", "--dtype", "int3"], "invalid choice"),
    (["generate", "--no-such-flag"], "unrecognized"),
]


@pytest.mark.parametrize("argv,named", EARLY, ids=[" ".join(a) for a, _ in EARLY])
def test_bad_values_fail_before_any_loading(capsys, monkeypatch, argv, named):
    import moeflow.checkpoint

    def no_load(*a, **k):
        raise AssertionError("loaded a model before checking the flags")

    monkeypatch.setattr(moeflow.checkpoint, "load", no_load)
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("moeflow: error: ") and err.count("\n") == 1 and named in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_memory_without_a_gpu(capsys):
    rc, _, err = run(capsys, "generate", "--gpu-memory", "24GiB")
    assert rc == 2 and "needs a CUDA GPU" in err


def test_serve_on_a_taken_port_is_one_line(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, _, err = run(capsys, "serve", "--port", str(s.getsockname()[1]), "--device", "cpu")
    assert rc == 2 and err.count("\n") == 1 and "Address already in use" in err, err


def test_new_tokens_beyond_the_context_warns(capsys):
    rc, out, err = run(capsys, "generate", "--max-len", "24", "--max-new-tokens", "100", "--device", "cpu")
    assert rc == 0 and "warning: --max-new-tokens 100 does not fit the context" in err
    assert figures(err)["tokens"] < 24


def test_every_option_has_help_and_a_shown_default():
    """Each flag of each subcommand has a help line; device and dtype are choices everywhere."""
    import argparse

    from moeflow.cli import build_parser

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from parsers(sub)

    for p in parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
                continue
            assert a.help, f"{p.prog} {a.option_strings}: no help"
            if "--device" in a.option_strings:
                assert set(a.choices) == {"cpu", "cuda"}, p.prog
            if "--dtype" in a.option_strings:
                assert "bf16" in a.choices, p.prog
        if p.prog == "moeflow generate":
            assert "tokens to generate at most (default: 128)" in " ".join(p.format_help().split())


def test_a_denormal_top_p_keeps_the_most_likely_token():
    """top_p 5e-324 is 0 in fp32: sampling still keeps one token (schemathesis found the NaN this gave)."""
    from moeflow.engine.sampler import sample
    from moeflow.engine.sequence import Sequence

    seq = Sequence([1], SamplingParams(temperature=1.0, top_p=5e-324, seed=0), None)
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample(logits, [seq]) == [1]


def test_a_denormal_temperature_samples_its_limit_the_most_likely_token():
    """temperature 5e-324 overflows the scaled logits to inf (schemathesis found the 500 this gave): the limit of
    a vanishing temperature is the greedy token."""
    from moeflow.engine.sampler import sample
    from moeflow.engine.sequence import Sequence

    seq = Sequence([1], SamplingParams(temperature=5e-324, top_p=5e-324, seed=0), None)
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample(logits, [seq]) == [1]


def test_shared_engines_default_to_a_bounded_context(capsys):
    """Several sequences' KV caches (serve, batch) or offloaded experts (--gpu-memory) share the GPU: unless
    --max-len says otherwise the context is the model's up to SHARED_CONTEXT, and a cut is said once; one
    sequence on its own device keeps the model's whole context."""
    from argparse import Namespace

    from moeflow.launch import SHARED_CONTEXT, default_context

    mixtral = Namespace(model="synthetic:mixtral-8x7b", max_len=None)  # a context of 32768
    assert default_context(mixtral, 8, False) == SHARED_CONTEXT < 32768
    assert "context 4096 tokens per sequence (the model's is 32768" in capsys.readouterr().err
    assert default_context(mixtral, 1, True) == SHARED_CONTEXT and capsys.readouterr().err
    assert default_context(mixtral, 1, False) is None and not capsys.readouterr().err
    assert default_context(Namespace(model="synthetic:mixtral-8x7b", max_len=1000), 8, True) == 1000
    assert default_context(Namespace(model=None, max_len=None), 8, False) == 1024  # the embedded model's own
    assert not capsys.readouterr().err
