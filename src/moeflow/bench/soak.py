"""`moeflow bench soak`: N streaming clients for T seconds against a running server; failures, TTFT/TPOT
percentiles and the server's resident memory over time (from /proc/PID, else /metrics'
process_resident_memory_bytes)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

from moeflow import MoeflowError

PROMPTS = ["The :mod:`json` module", "Explain the GIL", "How do I open a file?", "What is a decorator?"]


def add_parser(bsub) -> None:
    p = bsub.add_parser("soak", help="N streaming clients for T seconds against a running server: failures, "
                        "TTFT/TPOT percentiles, the server's memory over time")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--clients", type=int, default=16, help="streaming clients, each one request after another")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (requests in flight then finish)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--pid", type=int, help="the server's process id, for its RSS from /proc (default: /metrics)")
    p.add_argument("--warmup", type=float, default=0.2, help="share of --duration before the RSS reference")
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.clients < 1 or args.duration <= 0 or not 0 <= args.warmup < 1:
        raise MoeflowError("--clients must be >= 1, --duration > 0 and --warmup in [0, 1)")
    result = asyncio.run(soak(args.url.rstrip("/"), args.clients, args.duration, args.max_new_tokens, args.pid,
                              args.warmup))
    print(summary_line(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["failures"] == 0 else 1


async def soak(url: str, clients: int, duration: float, max_tokens: int, pid: int | None = None,
               warmup: float = 0.2) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60.0), limits=limits) as http:
        rss = await _rss(http, pid)
        if rss is None:
            raise MoeflowError(f"cannot read the server's memory from {url}/metrics (is a moeflow server running "
                               "there?); --pid PID reads it from /proc instead")
        t0 = time.perf_counter()
        end = t0 + duration
        samples: list[tuple[float, int]] = [(0.0, rss)]
        results: list[dict] = []
        sampler = asyncio.create_task(_sample(http, pid, t0, samples))
        await asyncio.gather(*(_client(http, i, end, max_tokens, results) for i in range(clients)))
        sampler.cancel()
        samples.append((time.perf_counter() - t0, await _rss(http, pid) or samples[-1][1]))
    return _summarise(results, samples, clients, duration, warmup)


async def _client(http, i: int, end: float, max_tokens: int, results: list[dict]) -> None:
    n = 0
    while time.perf_counter() < end:
        body = {"prompt": PROMPTS[(i + n) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True}
        results.append(await _one(http, body))
        n += 1


async def _one(http, body: dict) -> dict:
    t = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"text"' in line:
                    first = first or time.perf_counter()
                    tokens += 1
    except Exception as e:  # noqa: BLE001 - a failure of this request, recorded
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    now = time.perf_counter()
    if not done or first is None:
        return {"ok": False, "error": "the stream ended without [DONE]"}
    return {"ok": True, "ttft": first - t, "tpot": (now - first) / max(tokens - 1, 1), "chunks": tokens}


async def _sample(http, pid, t0: float, samples: list) -> None:
    while True:
        await asyncio.sleep(1.0)
        if (v := await _rss(http, pid)) is not None:
            samples.append((time.perf_counter() - t0, v))


async def _rss(http, pid: int | None) -> int | None:
    if pid is not None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError as e:
            raise MoeflowError(f"--pid {pid}: {e.strerror}") from None
        return None
    try:
        text = (await http.get("/metrics")).text
    except Exception:  # noqa: BLE001 - a missed sample
        return None
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return int(float(line.split()[1]))
    return None


def _pct(xs: list[float], q: float) -> float | None:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else None)


def _summarise(results: list[dict], samples: list, clients: int, duration: float, warmup: float) -> dict:
    ok = [r for r in results if r["ok"]]
    ref = next((v for t, v in samples if t >= warmup * duration), samples[-1][1])
    peak = max(v for t, v in samples if t >= warmup * duration) if samples[-1][0] >= warmup * duration else ref
    return {"clients": clients, "duration_s": duration, "requests": len(results), "failures": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
            "ttft_p50_s": _pct([r["ttft"] for r in ok], 50), "ttft_p99_s": _pct([r["ttft"] for r in ok], 99),
            "tpot_p50_s": _pct([r["tpot"] for r in ok], 50), "tpot_p99_s": _pct([r["tpot"] for r in ok], 99),
            "rss_after_warmup": ref, "rss_peak_after_warmup": peak, "rss_growth": peak / ref - 1,
            "rss_samples": samples, "date": time.strftime("%Y-%m-%d %H:%M")}


def summary_line(r: dict) -> str:
    ms = {k: (r[k] or 0) * 1e3 for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")}
    return (f"{r['clients']} clients x {r['duration_s']:.0f} s: {r['requests']} requests, {r['failures']} failed; "
            f"TTFT p50 {ms['ttft_p50_s']:.0f} ms p99 {ms['ttft_p99_s']:.0f} ms; TPOT p50 {ms['tpot_p50_s']:.1f} ms "
            f"p99 {ms['tpot_p99_s']:.1f} ms; RSS {r['rss_after_warmup'] / 2**20:.0f} MiB after warm-up, peak "
            f"{r['rss_peak_after_warmup'] / 2**20:.0f} MiB ({r['rss_growth']:+.1%})"
            + (f"; errors: {'; '.join(r['errors'])}" if r["errors"] else ""))
