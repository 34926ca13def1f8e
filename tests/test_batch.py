"""`moeflow batch`: Batch API lines in and out, per-line errors, resume after a crash or Ctrl-C."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pydantic", reason="pydantic is not installed (the server's request models check Batch API lines)")

from moeflow.batch.requests import BatchRequest, parse_line  # noqa: E402
from moeflow.batch.results import ResultFile  # noqa: E402
from moeflow.checkpoint import load  # noqa: E402
from moeflow.cli import main  # noqa: E402
from moeflow.engine.llm_engine import LLMEngine  # noqa: E402
from moeflow.engine.sequence import SamplingParams  # noqa: E402

MODEL = "synthetic:tiny-mixtral"
PROMPTS = ["hello world", "the cat sat on", "a b c d e f", "import sys", "once upon a time", "zzz"]


def batch_line(cid: str, prompt: str, max_tokens: int, chat: bool = False) -> str:
    body = {"model": "m", "max_tokens": max_tokens, "temperature": 0}
    body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    url = "/v1/chat/completions" if chat else "/v1/completions"
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def write_input(path, n_tokens=(3, 6, 2, 5, 4, 3)) -> list[str]:
    lines = [batch_line(f"r{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS, n_tokens))]
    path.write_text("\n".join(lines) + "\n")
    return lines


def read_records(path) -> dict[str, dict]:
    recs = [json.loads(t) for t in path.read_text().splitlines()]
    ids = [r["custom_id"] for r in recs]
    assert len(ids) == len(set(ids)), "a custom_id was written twice"
    return {r["custom_id"]: r for r in recs}


@pytest.fixture(scope="module")
def ck():
    return load(MODEL)


@pytest.fixture(autouse=True)
def loaded_once(ck, monkeypatch):
    """The CLI's load returns the module's checkpoint (loading is tested elsewhere; here it only costs time)."""
    monkeypatch.setattr("moeflow.checkpoint.load", lambda *a, **k: ck)


def run_batch(tmp_path, *extra) -> int:
    return main(["batch", "--model", MODEL, "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--device", "cpu", "--max-running", "3", "--no-progress", *extra])


@pytest.fixture(scope="module")
def alone(ck) -> dict[str, str]:
    """Each prompt's greedy text from the single-request engine."""
    engine = LLMEngine(ck, max_seqs=1, max_len=64)
    out = {}
    for i, (p, n) in enumerate(zip(PROMPTS, (3, 6, 2, 5, 4, 3))):
        (seq,) = engine.generate([p], SamplingParams(max_new_tokens=n))
        out[f"r{i}"] = seq.text
    return out


def test_results_match_the_single_request_engine(tmp_path, alone):
    write_input(tmp_path / "in.jsonl")
    assert run_batch(tmp_path) == 0
    recs = read_records(tmp_path / "out.jsonl")
    assert sorted(recs) == sorted(alone)
    for cid, rec in recs.items():
        assert rec["error"] is None and rec["response"]["status_code"] == 200
        body = rec["response"]["body"]
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == alone[cid]


def test_bad_lines_become_error_records_and_the_job_goes_on(tmp_path, alone):
    lines = ["not json", json.dumps({"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {}}),
             json.dumps({"custom_id": "v", "method": "POST", "url": "/v1/completions", "body": {"prompt": 3}}),
             json.dumps({"custom_id": "w", "url": "/v1/completions", "body": {"prompt": "x", "logprobs": 2}}),
             json.dumps({"custom_id": "x", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 10**6}}),
             batch_line("r0", PROMPTS[0], 3), batch_line("r0", PROMPTS[1], 3),
             json.dumps({"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}),
             batch_line("chat", "hi", 2, chat=True)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert run_batch(tmp_path) == 0
    recs = read_records(tmp_path / "out.jsonl")
    assert recs["line-1"]["error"]["code"] == "invalid_json"
    assert recs["u"]["error"]["code"] == "invalid_url"
    for cid, param in (("v", "prompt"), ("w", "logprobs"), ("x", "max_tokens")):
        assert recs[cid]["response"]["status_code"] == 400, cid
        assert param in json.dumps(recs[cid]["response"]["body"]["error"]), cid
    assert recs["line-7"]["error"]["code"] == "duplicate_custom_id"
    assert recs["r0"]["response"]["body"]["choices"][0]["text"] == alone["r0"]
    assert recs["line-8"]["response"]["body"]["choices"][0]["text"] == alone["r1"]  # a plain {"prompt"} line
    assert recs["chat"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"


def test_resume_skips_written_results_and_repairs_a_torn_line(tmp_path, alone):
    lines = write_input(tmp_path / "in.jsonl")
    assert run_batch(tmp_path) == 0
    full = (tmp_path / "out.jsonl").read_text().splitlines()
    kept = full[:2]
    (tmp_path / "out.jsonl").write_text("\n".join(kept) + "\n" + full[2][: len(full[2]) // 2])  # killed mid-write
    assert run_batch(tmp_path) == 0
    recs = read_records(tmp_path / "out.jsonl")
    assert len(recs) == len(lines)
    assert all(recs[json.loads(t)["custom_id"]]["id"] == json.loads(t)["id"] for t in kept)  # not rerun
    assert {cid: r["response"]["body"]["choices"][0]["text"] for cid, r in recs.items()} == alone


def test_ctrl_c_leaves_a_valid_resumable_file(tmp_path, monkeypatch, alone):
    write_input(tmp_path / "in.jsonl")
    write = ResultFile.write

    def interrupted(self, rec):
        if self.written == 2:
            raise KeyboardInterrupt
        write(self, rec)

    monkeypatch.setattr(ResultFile, "write", interrupted)
    assert run_batch(tmp_path) == 130
    assert len(read_records(tmp_path / "out.jsonl")) == 2
    monkeypatch.setattr(ResultFile, "write", write)
    assert run_batch(tmp_path) == 0
    recs = read_records(tmp_path / "out.jsonl")
    assert {cid: r["response"]["body"]["choices"][0]["text"] for cid, r in recs.items()} == alone


def test_job_level_errors_exit_2(tmp_path, capsys):
    assert main(["batch", "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text(batch_line("a", "x", 2) + "\n")
    assert main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "no/o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_parse_line_keeps_the_request_fields():
    req = parse_line(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "top_p": 0.5, "stop": ["x"], "seed": 7}}),
        1)
    assert isinstance(req, BatchRequest) and req.chat
    assert (req.body.max_tokens, req.body.top_p, req.body.stop, req.body.seed) == (3, 0.5, ["x"], 7)
    assert parse_line(json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions"}), 1)["error"][
        "code"] == "invalid_method"
    assert parse_line("[1]", 3)["error"]["message"].startswith("line 3")
