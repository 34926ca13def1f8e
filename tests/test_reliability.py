"""Load and fuzz against a live server on the tiny model: `bench soak` (streaming clients for a while: no
failure, percentiles and memory reported) and `bench fuzz` (schemathesis requests from the app's OpenAPI
schema: no 5xx)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from test_serve import LiveServer  # noqa: E402

from moeflow.checkpoint import load  # noqa: E402
from moeflow.cli import main  # noqa: E402
from moeflow.engine.llm_engine import LLMEngine  # noqa: E402
from moeflow.server.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def live():
    ck = load("synthetic:tiny-mixtral")
    with LiveServer(create_app(lambda: LLMEngine(ck, max_seqs=8, max_len=64), "tiny", max_queue=64)) as s:
        s.wait_ready()
        yield s


def test_soak_sixteen_streaming_clients(live, tmp_path, capsys):
    out = tmp_path / "soak.json"
    rc = main(["bench", "soak", "--url", live.url, "--clients", "16", "--duration", "10", "--max-new-tokens", "8",
               "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["failures"] == 0 and r["requests"] >= 16, r["errors"]
    assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and r["tpot_p50_s"] > 0
    assert len(r["rss_samples"]) >= 5 and all(v > 0 for _, v in r["rss_samples"])
    assert "16 clients x 10 s" in capsys.readouterr().out
    assert len(live.engine.cache.free) == live.engine.cache.max_seqs  # every slot given back


def test_schema_fuzzing_gets_no_5xx(live, tmp_path):
    pytest.importorskip("schemathesis")
    out = tmp_path / "fuzz.json"
    rc = main(["bench", "fuzz", "--url", live.url, "--requests", "300", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["failures"] == [] and rc == 0
    assert r["requests"] >= 250 and any(s.startswith("4") for s in r["statuses"])  # bad bodies were sent
