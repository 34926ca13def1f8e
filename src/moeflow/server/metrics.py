"""Prometheus metrics of one server (its own registry, so that several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moeflow.engine.llm_engine import GenerationResponse

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("moeflow_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.ttft = Histogram("moeflow_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("moeflow_time_per_output_token_seconds", "decode time per token after the first",
                              buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("moeflow_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("moeflow_generation_tokens", "tokens generated", registry=r)
        self.running = Gauge("moeflow_num_requests_running", "sequences in the running batch", registry=r)
        self.waiting = Gauge("moeflow_num_requests_waiting", "requests queued for a KV slot", registry=r)
        self.worker = None
        r.register(_EngineCollector(self))
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc. (`moeflow bench soak` reads it)

    def attach(self, worker) -> None:
        """Read the running/waiting counts from the engine worker at scrape time."""
        self.worker = worker
        self.running.set_function(lambda: worker.num_running)
        self.waiting.set_function(lambda: worker.num_waiting)

    def count(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def finished(self, r: GenerationResponse) -> None:
        self.prompt_tokens.inc(r.prompt_tokens)
        self.generation_tokens.inc(r.generation_tokens)
        if r.generation_tokens:
            self.ttft.observe(r.ttft_s)
        if r.decode_tps > 0:
            self.tpot.observe(1.0 / r.decode_tps)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine figures read when scraped: steps and batch sizes; expert offloading (`engine.expert_stats()`)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        worker = self.metrics.worker
        if worker is None:
            return
        yield CounterMetricFamily("moeflow_engine_steps", "engine steps (one forward pass each)", worker.steps)
        yield CounterMetricFamily("moeflow_engine_step_sequences", "sequences run, summed over steps "
                                  "(divided by the steps: the mean batch)", worker.step_seqs)
        stats = worker.engine.expert_stats()
        for key, value in (stats or {}).items():  # every OffloadStats figure (experts/layer_plan.py)
            if key == "hit_rate":
                yield GaugeMetricFamily(EXPERT + key, "selected experts found on the GPU", value)
            else:
                yield CounterMetricFamily(EXPERT + _counter(key), f"expert offloading: OffloadStats.{key}", value)


EXPERT = "moeflow_expert_"


def _counter(key: str) -> str:
    """An OffloadStats field's counter name (after EXPERT): seconds as such, host-to-GPU bytes by their old name."""
    return "bytes_copied_to_gpu" if key == "bytes_h2d" else key[:-2] + "_seconds" if key.endswith("_s") else key


def expert_counters(text: str) -> dict[str, float]:
    """The expert counters of a /metrics page by their names after EXPERT, and the tokens generated ("tokens")."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(EXPERT) and s.name.endswith("_total"):
                out[s.name[len(EXPERT):-len("_total")]] = s.value
            elif s.name == "moeflow_generation_tokens_total":
                out["tokens"] = s.value
    return out


def expert_figures(before: dict[str, float], after: dict[str, float]) -> dict | None:
    """Between two scrapes, per token generated (the prompts' expert work included): the hit rate, experts
    copied and run on the CPU, copies ahead made and used, and the host's ms in the expert backend by part.
    None where no expert was looked up (no offloading)."""
    d = {k: v - before.get(k, 0.0) for k, v in after.items()}
    n, lookups = d.get("tokens", 0.0), d.get("lookups", 0.0)
    if not n or not lookups:
        return None
    per = {k: d.get(k, 0.0) / n for k in ("copied_experts", "cpu_experts", "prefetched", "prefetch_used")}
    ms = {k[:-len("_seconds")]: 1e3 * v / n for k, v in d.items() if k.endswith("_seconds")}
    return {"hit_rate": d.get("hits", 0.0) / lookups} | per | {"host_ms": ms}
