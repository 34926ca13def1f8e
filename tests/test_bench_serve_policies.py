"""`moeflow bench serve --serve ARGS`: a server launched per policy, driven at each concurrency in turn."""

import json

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from moeflow.cli import main  # noqa: E402


def test_bench_serve_launches_a_server_per_policy(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello there", "the router", "x y z")))
    out = tmp_path / "runs" / "serve.json"
    args = ["bench", "serve", "--serve", "--model synthetic:tiny-mixtral --device cpu --max-len 128",
            "--prompts", str(prompts), "--num-prompts", "3", "--max-new-tokens", "4", "--ignore-eos",
            "--concurrencies", "1,2", "--out", str(out)]
    assert main(args + ["--policies", "auto"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["policy"], r["concurrency"]) for r in rows] == [("auto", 1), ("auto", 2)]
    assert all(r["completed"] == 3 and r["output_tokens"] == 12 and r["tpot_ms"]["median"] > 0 for r in rows)
    assert (out.parent / "serve-auto.log").is_file()
    # a server that cannot start (fmoe needs the offloading engine): one line naming it, exit 2; the rows of the
    # policies before it are in --out
    out.unlink()
    assert main(args + ["--policies", "auto,fmoe", "--concurrencies", "1"]) == 2
    assert "the fmoe server exited" in capsys.readouterr().err
    assert [(r["policy"], r["concurrency"]) for r in json.loads(out.read_text())["rows"]] == [("auto", 1)]
