"""The demo model's outputs: the Hugging Face folder (bf16), held-out scoring of the exported weights, routing
statistics, sample text, training_log.json and loss.png."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moeflow.checkpoint import Checkpoint, load
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.experts.local import LocalExperts
from moeflow.models import get_architecture
from moeflow.models.layers import AttnBatch, MoeTransformer
from moeflow.synthetic import write_checkpoint
from moeflow.tokenizer import TextTokenizer
from moeflow.train.routing import RouterTap, routing_stats

SAMPLE_PROMPTS = ["The :mod:`json` module", "A list comprehension is", "To open a file for reading,"]
CHAT_PROMPT = "How do I sort a list of tuples by their second item?"


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def score(model: MoeTransformer, wins: torch.Tensor, batch_size: int, device: torch.device,
          tap: RouterTap | None = None) -> tuple[float, int, list[torch.Tensor]]:
    """Summed next-token NLL (nats) over windows [n, T+1], the token count, and (with `tap`) each MoE
    layer's routing [n, T, K]. Legend: B = windows per batch, T = tokens per window, K = experts per token."""
    nll, count, routes = 0.0, 0, []
    for chunk in wins.split(batch_size):
        chunk = chunk.to(device)
        B, T = chunk.shape[0], chunk.shape[1] - 1
        if tap is not None:
            tap.clear()
        with autocast(device):
            hidden = model(chunk[:, :-1].flatten(), AttnBatch.full(B, T, device, model.cfg.sliding_window))
            logits = model.logits(hidden)
        nll += float(F.cross_entropy(logits, chunk[:, 1:].flatten(), reduction="sum"))
        count += B * T
        if tap is not None:
            routes.append([ids.view(B, T, -1).cpu() for ids in tap.ids()])
    return nll, count, [torch.cat(layer) for layer in zip(*routes)] if routes else []


@torch.no_grad()
def export(trainee, tokenizer: TextTokenizer, out: Path) -> None:
    """Write a Trainee's weights as a bf16 Hugging Face Mixtral folder."""
    cfg = trainee.cfg
    arch = get_architecture(cfg.model_type)
    store = trainee.store.to("cpu", torch.bfloat16)  # the host layout differs from the GPU's (down transposed)
    with torch.device("meta"):
        model = arch.build(cfg, LocalExperts(store))
    state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in trainee.model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0]}
    write_checkpoint(Checkpoint(out.name, arch, cfg, model, store, tokenizer, generation), out)


def samples(ck: Checkpoint, seed: int, n_new: int = 80) -> dict:
    """Greedy and sampled continuations of SAMPLE_PROMPTS, and a chat reply (prompts that fit the context)."""
    engine = LLMEngine(ck, max_seqs=1, max_len=ck.cfg.max_position_embeddings)
    chat = [{"role": "user", "content": CHAT_PROMPT}]
    out: dict[str, dict[str, str]] = {"greedy": {}, "sampled (T=0.8, top-p 0.95)": {}, "chat (greedy)": {}}
    for kind, prompt, key, temperature in [("greedy", p, p, 0.0) for p in SAMPLE_PROMPTS] + [
            ("sampled (T=0.8, top-p 0.95)", p, p, 0.8) for p in SAMPLE_PROMPTS] + [
            ("chat (greedy)", chat, CHAT_PROMPT, 0.0)]:
        room = engine.max_len - len(engine.encode(prompt)) - 1
        if room > 0:
            params = SamplingParams(max_new_tokens=min(n_new, room), temperature=temperature, top_p=0.95, seed=seed)
            out[kind][key] = engine.generate([prompt], params)[0].text
    return out


def finish(log: dict, out: Path, heldout_wins: torch.Tensor, device: torch.device, batch_size: int,
           t0: float) -> None:
    """Score the exported folder as moeflow loads it (bf16 on a GPU, fp32 on a CPU), sample it, write the log
    and the plot into `out`."""
    ck = load(out, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    with RouterTap(ck.model) as tap:
        nll, n, routes = score(ck.model, heldout_wins, batch_size, device, tap)
    d = log["data"]
    scored_bytes = d["heldout_bytes"] * n / d["heldout_tokens"]  # the windows leave a few tokens unscored
    log["heldout"] = {"tokens": n, "nll": round(nll / n, 4), "perplexity": round(math.exp(nll / n), 2),
                      "bits_per_byte": round(nll / math.log(2) / scored_bytes, 4),
                      "dtype": str(ck.store.data.dtype).removeprefix("torch.")}
    log["routing"] = routing_stats(routes, ck.cfg.num_experts)
    log["samples"] = samples(ck, log["seed"])
    log["files"] = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    log["wall_s"] = round(time.perf_counter() - t0, 1)
    plot(log, out / "loss.png")
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    h, r = log["heldout"], log["routing"]
    print(f"held-out: perplexity {h['perplexity']} ({h['bits_per_byte']} bits/byte) over {n:,} tokens")
    for i, layer in enumerate(r["layers"]):
        print(f"layer {i}: usage entropy {layer['entropy']:.3f} (uniform {r['uniform_entropy']:.3f}), "
              f"consecutive-token reuse {layer['reuse']:.1%} (uniform {r['uniform_reuse']:.0%})")
    for prompt, text in log["samples"]["greedy"].items():
        print(f"--- {prompt}{text}")
    print(f"wrote {out} in {log['wall_s']:.0f}s", flush=True)


def plot(log: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss.png")
        return False
    curve, routing = log["curve"], log["routing"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    smooth, num, den = [], 0.0, 0.0
    for x in curve["loss"]:  # exponential moving average, debiased so that it does not lag at the start
        num, den = 0.9 * num + x, 0.9 * den + 1
        smooth.append(num / den)
    a.plot(curve["step"], curve["loss"], color="tab:blue", alpha=0.25, lw=0.8)
    a.plot(curve["step"], smooth, color="tab:blue", label="train (EMA)")
    a.plot(curve["eval_step"], curve["eval_loss"], "o-", ms=3, color="tab:orange", label="held-out")
    a.axvline(log["training"]["best_step"], color="gray", ls=":", label="exported")
    a.set_ylim(top=min(max(curve["loss"][:5] or [10]), 10), bottom=min(curve["loss"] + curve["eval_loss"]) - 0.2)
    a.set_xlabel("step")
    a.set_ylabel("cross-entropy (nats / token)")
    t = log["training"]
    a.set_title(f"{log['params'] / 1e6:.1f}M-parameter Mixtral, seed {log['seed']}: {t['tokens'] / 1e6:.3g}M tokens "
                f"({t['epochs']} epochs) in {t['train_s']:.0f}s on {log['device']}", fontsize=9)
    a.legend()
    usage = torch.tensor([layer["usage"] for layer in routing["layers"]])
    im = b.imshow(usage, cmap="viridis", aspect="auto", vmin=0)
    b.set_xlabel("expert")
    b.set_yticks(range(len(usage)), [f"layer {i}, reuse {layer['reuse']:.0%}"
                                     for i, layer in enumerate(routing["layers"])])
    b.set_title(f"held-out expert usage (uniform {1 / routing['experts']:.3f}, reuse {routing['uniform_reuse']:.0%})",
                fontsize=9)
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
