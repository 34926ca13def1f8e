"""`moeflow batch` as a Ray Data callable: two CPU workers on a local Ray instance, each with its own engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'moeflow[ray]')")
pytest.importorskip("pydantic", reason="pydantic is not installed (the server's request models check Batch API lines)")

from moeflow.batch.ray import BatchPredictor  # noqa: E402
from moeflow.checkpoint import load  # noqa: E402
from moeflow.engine.llm_engine import LLMEngine  # noqa: E402
from moeflow.engine.sequence import SamplingParams  # noqa: E402

PROMPTS = ["The :mod:`json` module", "import os", "class Foo:", "def main():", "The :func:`print` function"]


@pytest.fixture(scope="module")
def local_ray():
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def test_map_batches_runs_every_line_on_two_workers(local_ray):
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": p, "max_tokens": 4, "temperature": 0}}) for i, p in enumerate(PROMPTS)]
    lines += ["not json", json.dumps({"custom_id": "plain", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})]
    ds = ray.data.from_items([{"text": t} for t in lines])
    out = ds.map_batches(BatchPredictor, fn_constructor_kwargs={"flags": ["--device", "cpu", "--max-running", "2"]},
                         concurrency=2, batch_size=3, num_cpus=1)
    recs = {r["custom_id"]: json.loads(r["result"]) for r in out.take_all()}
    engine = LLMEngine(load("builtin:pydoc-moe"), max_seqs=1, max_len=64)
    want = {f"r{i}": engine.generate([p], SamplingParams(max_new_tokens=4))[0].text for i, p in enumerate(PROMPTS)}
    want["plain"] = want["r0"]
    assert {k: recs[k]["response"]["body"]["choices"][0]["text"] for k in want} == want
    errors = [r for r in recs.values() if r["error"] is not None]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "invalid_json"
