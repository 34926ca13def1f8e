"""The code's seams hold: every module imports alone, the engine never reaches up into the profiler, and no
import cycle runs among moeflow's modules (function-level imports counted too)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import budget_for

from moeflow.checkpoint import load
from moeflow.cli import main
from moeflow.config import OffloadConfig
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.offload import ProcessSettings
from moeflow.engine.sequence import SamplingParams
from moeflow.experts import cpu as cpu_mod
from moeflow.experts.trace import RoutingRecorder, load_trace
from moeflow.policy.lru import LruPolicy

SRC = Path(__file__).resolve().parents[1] / "src"
PROFILER = {"moeflow.perf.profile", "moeflow.perf.measure", "moeflow.perf.layers", "moeflow.perf.probe",
            "moeflow.perf.commands"}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "moeflow").rglob("*.py")):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, known: set[str]) -> set[str]:
    """moeflow modules that `path` imports anywhere (function bodies too; not under `if TYPE_CHECKING`)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_the_engine_never_imports_the_profiler():
    graph = import_graph()
    bad = {m: sorted(graph[m] & PROFILER) for m in graph if m.startswith("moeflow.engine") and graph[m] & PROFILER}
    assert not bad, f"engine modules import the profiler: {bad}"


def test_no_import_cycle_among_moeflows_modules():
    """A lazy (function-level) import counts: a cycle hidden in a function body is still two modules that each
    need the other."""
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles: {found}"


ENV_NAME = re.compile(r"MOEFLOW_[A-Z0-9_]+")


def env_names_in_source() -> set[str]:
    """MOEFLOW_* names the package reads or mentions, outside cli.py (which lists them); a name built in an
    f-string (MOEFLOW_AMX_{k}) counts as its prefix."""
    cli = SRC / "moeflow" / "cli.py"
    return {m.rstrip("_") for p in (SRC / "moeflow").rglob("*") if p.suffix in (".py", ".cpp", ".inc") and p != cli
            for m in ENV_NAME.findall(p.read_text())}


def test_every_environment_variable_is_documented():
    """`moeflow --help`'s epilog lists every MOEFLOW_* variable the source reads and none it no longer reads;
    the README's table names each of them."""
    from moeflow.cli import build_parser

    epilog = build_parser().epilog
    listed, used = set(ENV_NAME.findall(epilog)), env_names_in_source()
    covers = lambda a, b: a == b or a.startswith(b + "_")  # noqa: E731  (b: a name or an f-string's prefix)
    undocumented = {u for u in used if not any(covers(n, u) for n in listed)}
    assert not undocumented, f"not in `moeflow --help` (cli.ENV_VARS): {sorted(undocumented)}"
    stale = {n for n in listed if not any(covers(n, u) for u in used)}
    assert not stale, f"cli.ENV_VARS lists what the source no longer reads: {sorted(stale)}"
    readme = (SRC.parent / "README.md").read_text()
    assert not (missing := sorted(n for n in listed if n not in readme)), f"the README's table lacks {missing}"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


CHILD = """
import importlib, json, os, sys, traceback
import numpy, torch  # the heavy third-party imports once; each moeflow module then imports in a fresh fork
for lib in ("safetensors.torch", "tokenizers", "jinja2", "tqdm", "rich.console", "fastapi", "pydantic"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
failed, running, names = {}, {}, json.loads(sys.argv[1])
while names or running:
    while names and len(running) < (os.cpu_count() or 1):  # a fork per module, as many at once as cores
        name = names.pop()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                importlib.import_module(name)
                os._exit(0)
            except BaseException:
                os.write(w, traceback.format_exc(limit=-3).encode()[-2000:])
                os._exit(1)
        os.close(w)
        running[pid] = (name, r)
    pid, status = os.wait()
    name, r = running.pop(pid)
    with os.fdopen(r) as f:
        err = f.read()
    if status:
        failed[name] = err
print(json.dumps(failed))
"""


def test_every_module_imports_alone():
    """Each module in an interpreter where no other moeflow module was imported before it."""
    names = [m for m in modules() if not m.endswith("__main__")]
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(names)], capture_output=True, text=True,
                         cwd=SRC.parent, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())


# -- the engine's seams, used ------------------------------------------------------------------------------
DATA = Path(__file__).resolve().parent / "data"
MIXTRAL_CUT = DATA / "mixtral-8x7b-instruct.humaneval.cut.jsonl"
DEEPSEEK_CUT = DATA / "deepseek-v2-lite-chat.dev.cut.npz"
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)
PROMPT = [5, 17, 42, 99, 7, 250, 31]


def test_generate_offloaded_from_the_cli_gives_the_local_text(capsys, hf_checkpoint, monkeypatch):
    """`generate --gpu-memory ... --policy ...` on a tiny model (the CPU plays both tiers) prints the text the
    all-local run prints, and the experts' figures."""
    from moeflow import flags as cli_flags  # --gpu-memory without a GPU is an error; the CPU stands in for one

    monkeypatch.setattr(cli_flags, "check_gpu_memory", lambda args: None)
    path = str(hf_checkpoint("mixtral")[0])
    budget = budget_for(load(path, device="cpu", expert_device="cpu"), 4, max_seqs=1, max_len=64)
    base = ["generate", "--model", path, "--device", "cpu", "--prompt", "def main():", "--max-new-tokens", "8",
            "--max-len", "64", "--ignore-eos"]
    texts = {}
    for flags in ([], ["--gpu-memory", str(budget), "--policy", "lru"],
                  ["--gpu-memory", str(budget), "--policy", "fiddler"]):
        assert main(base + flags) == 0
        out, err = capsys.readouterr()
        texts[tuple(flags)] = out
        assert ("experts: hit rate" in err) == bool(flags), err
    assert len(set(texts.values())) == 1, texts


class PrefetchNext(LruPolicy):
    """lru, and each layer's experts copied ahead into the next layer's cache (a stand-in predictor)."""

    def prefetch(self, layer, ids, weights, experts):
        selected = sorted({int(e) for e in ids.flatten().tolist()})
        self.asked = getattr(self, "asked", 0) + len(selected)
        if layer + 1 < self.layers:
            for e in selected:
                experts.copy_ahead((layer + 1, e))


def test_a_policys_prefetch_copies_ahead_and_keeps_the_tokens(hf_checkpoint):
    path = hf_checkpoint("mixtral")[0]
    want = LLMEngine(load(path, device="cpu", expert_device="cpu"), max_seqs=1, max_len=64).generate(
        [PROMPT], GREEDY)[0].output_ids
    ck = load(path, device="cpu", expert_device="cpu")
    engine = LLMEngine(ck, max_seqs=1, max_len=64, offload=OffloadConfig(budget_for(ck, 4, 1), "lru"))
    backend = engine.model.experts
    backend.policy = PrefetchNext()
    backend.policy.layers = len(ck.cfg.moe_layers)
    assert engine.generate([PROMPT], GREEDY)[0].output_ids == want
    s = backend.stats
    assert backend.policy.asked == s.lookups and s.prefetched > 0
    held = next(iter(backend.cache.where))
    assert backend.copy_ahead(held) is False  # already on the GPU: nothing copied
    engine.close()


def test_the_thread_split_leaves_the_driver_a_core(monkeypatch):
    monkeypatch.delenv("MOEFLOW_CPU_THREADS", raising=False)
    alone, beside = cpu_mod.thread_split(driver=False), cpu_mod.thread_split(driver=True)
    assert alone.kernel == cpu_mod.physical_cores() and beside.kernel == max(alone.kernel - 1, 1)
    assert beside.torch == max(cpu_mod.TORCH_THREADS - 1, 1) and alone.torch == cpu_mod.TORCH_THREADS
    monkeypatch.setenv("MOEFLOW_CPU_THREADS", "3")
    assert cpu_mod.thread_split(driver=True).kernel == 3 == cpu_mod.CpuExperts().threads


def test_process_settings_are_put_back():
    before = torch.get_num_threads()
    s = ProcessSettings()
    s.set_threads(1)
    s.set_threads(max(before, 2))
    assert torch.get_num_threads() == max(before, 2)
    s.restore()
    assert torch.get_num_threads() == before
    s.restore()  # twice: nothing left to undo
    assert torch.get_num_threads() == before


# -- the shipped trace cuts ----------------------------------------------------------------------------------
def test_the_shipped_traces_load():
    mixtral, deepseek = load_trace(MIXTRAL_CUT), load_trace(DEEPSEEK_CUT)
    assert mixtral.shape == (8, 32, 2) and int(mixtral.ids.max()) <= 7
    assert torch.allclose(mixtral.weights.sum(-1), torch.ones(8, 32), atol=1e-3)  # top-2 of Mixtral's softmax
    assert deepseek.shape == (62, 26, 6) and deepseek.weights is None and int(deepseek.ids.max()) < 64


def test_the_shipped_trace_replays_under_every_policy(hf_checkpoint):
    """Mixtral's real routing replayed on a 32-layer tiny Mixtral: each policy gives the gpu reference's tokens,
    and the experts the backend ran are the trace's (a RoutingRecorder under the replay)."""
    path = hf_checkpoint("mixtral", num_hidden_layers=32, num_local_experts=8, hidden_size=32,
                         intermediate_size=32)[0]
    trace = load_trace(MIXTRAL_CUT)
    prompt, params = PROMPT[:4], SamplingParams(max_new_tokens=3, ignore_eos=True)
    runs = {}
    for policy, slots in (("gpu", 256), ("lru", 40), ("fiddler", 40)):
        ck = load(path, device="cpu", expert_device="cpu")
        engine = LLMEngine(ck, max_seqs=1, max_len=16, offload=OffloadConfig(
            budget_for(ck, slots, 1, 16), policy, routing_trace=str(MIXTRAL_CUT)))
        replay = engine.model.experts
        replay.inner = recorder = RoutingRecorder(replay.inner, ck.cfg)
        runs[policy] = engine.generate([prompt], params)[0].output_ids
        used = len(prompt) + params.max_new_tokens - 1  # the last token is sampled, not run
        assert torch.equal(recorder.counts, _counts(trace.ids[:used], 8))
        engine.close()
    assert runs["lru"] == runs["gpu"] == runs["fiddler"]


def _counts(ids: torch.Tensor, experts: int) -> torch.Tensor:
    """[L, E] selections of ids [T, L, K]."""
    return torch.stack([torch.bincount(ids[:, li].flatten(), minlength=experts) for li in range(ids.shape[1])]
                       ).double()


@pytest.mark.gpu
def test_close_puts_back_the_threads_and_the_allocator_cap(hf_checkpoint):
    path = hf_checkpoint("mixtral")[0]
    ck = load(path, device="cuda", dtype="bfloat16", expert_device="cpu")
    dev = next(ck.model.parameters()).device
    threads, fraction = torch.get_num_threads(), torch.cuda.get_per_process_memory_fraction(dev)
    engine = LLMEngine(ck, max_seqs=1, max_len=64, offload=OffloadConfig(budget_for(ck, 4, 1), "lru"))
    assert torch.cuda.get_per_process_memory_fraction(dev) < fraction
    assert engine.generate([PROMPT], GREEDY)[0].output_ids
    engine.close()
    assert (torch.get_num_threads(), torch.cuda.get_per_process_memory_fraction(dev)) == (threads, fraction)
