"""`moeflow train-demo`: train the embedded demo model, a small Mixtral, from scratch on a text corpus.

One command on one GPU, in minutes: byte-level BPE, tokenization, training (AdamW, bf16 autocast, Mixtral's
load-balancing loss), held-out evaluation, export as a Hugging Face folder, routing statistics, a loss plot.
The forward pass is moeflow's own MoeTransformer run without a KV cache (AttnBatch.full); the routed experts
are one trainable tensor, the ExpertStore's data, owned by a small wrapper module (models/ holds no training
code: router logits and dropout come from forward hooks).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moeflow import MoeflowError
from moeflow.config import ModelConfig
from moeflow.experts.base import ExpertBackend
from moeflow.experts.ffn import grouped_experts, looped_experts
from moeflow.experts.store import ExpertStore
from moeflow.models import get_architecture
from moeflow.models.layers import AttnBatch, MoeTransformer
from moeflow.train import data, report
from moeflow.train.report import autocast, score
from moeflow.train.routing import RouterTap, balance_loss


@dataclass(frozen=True)
class DemoConfig:
    """Model shape (Mixtral architecture) and training hyper-parameters; the CLI flags default to these."""

    vocab_size: int = 8192
    hidden_size: int = 256
    layers: int = 6
    heads: int = 8
    kv_heads: int = 4
    experts: int = 8
    top_k: int = 2
    expert_intermediate: int = 384
    context: int = 1024             # training window = max_position_embeddings
    rope_theta: float = 10000.0
    batch_size: int = 16            # windows per step: 16 x 1024 = 16k tokens
    epochs: float = 8.0             # passes over the training split (sets the step count and LR schedule);
                                    # 20 overfit: held-out loss bottomed at 10 and rose after
    steps: int = 0                  # > 0: this many steps instead of `epochs`
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1       # cosine decay to lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.15           # on the embeddings and on each attention and MoE output
    aux_coef: float = 0.01          # load-balancing loss weight (balance_loss is 1.0 when balanced)
    grad_clip: float = 1.0
    eval_every: int = 50

    def model_config(self) -> ModelConfig:
        return get_architecture("mixtral").config(self.hf_config())

    def hf_config(self) -> dict:
        return dict(model_type="mixtral", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    intermediate_size=self.expert_intermediate, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                    head_dim=self.hidden_size // self.heads, num_local_experts=self.experts,
                    num_experts_per_tok=self.top_k, max_position_embeddings=self.context,
                    rope_theta=self.rope_theta, rms_norm_eps=1e-5, sliding_window=None,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")


SIZES = {
    "demo": DemoConfig(),
    # a few minutes on a laptop CPU, to exercise the whole pipeline
    "tiny": DemoConfig(vocab_size=2048, hidden_size=128, layers=4, heads=4, kv_heads=2, expert_intermediate=128,
                       context=128, batch_size=16, epochs=0.05, warmup_steps=20, lr=3e-3, eval_every=200),
    # seconds: the unit test
    "test": DemoConfig(vocab_size=384, hidden_size=32, layers=2, heads=2, kv_heads=1, experts=4,
                       expert_intermediate=32, context=32, batch_size=8, steps=30, warmup_steps=5, lr=1e-2,
                       dropout=0.0, eval_every=10),
}


class CastExperts(ExpertBackend):
    """Training expert backend: the fp32 master weights cast to the compute dtype as they are used (the cast
    is part of the autograd graph); grouped GEMMs where they have a backward, else the per-expert loop."""

    def __init__(self, store: ExpertStore, dtype: torch.dtype, grouped: bool):
        self.store, self.dtype, self.grouped = store, dtype, grouped

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        gate_up = self.store.gate_up(layer).to(self.dtype)  # [E, 2I, H]
        # [E, I, H], column-major as the grouped GEMM wants (a row-major operand takes its slow fallback)
        down_t = self.store.down_t(layer).transpose(1, 2).to(self.dtype).transpose(1, 2)
        run = grouped_experts if self.grouped else looped_experts
        return run(x.to(self.dtype), topk_ids, topk_weights, gate_up, down_t)


def grouped_backward_works(device: torch.device) -> bool:
    """torch._grouped_mm with autograd on this device and torch version (bf16)?"""
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(64, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
        gu = torch.randn(4, 64, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
        dn = torch.randn(4, 32, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
        ids = torch.randint(0, 4, (64, 2), device=device)
        grouped_experts(x, ids, torch.rand(64, 2, device=device), gu, dn).float().sum().backward()
        return bool(torch.isfinite(gu.grad).all())
    except (RuntimeError, NotImplementedError):
        return False


class Trainee(nn.Module):
    """The MoeTransformer plus its routed experts as one trainable tensor [L_moe, E, 3*I*H]."""

    def __init__(self, cfg: ModelConfig, device: torch.device, compute_dtype: torch.dtype, grouped: bool):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.Parameter(torch.empty(len(cfg.moe_layers), cfg.num_experts, cfg.expert_numel,
                                                device=device))
        self.store = ExpertStore(cfg, torch.float32, device, data=self.experts)  # views of the parameter
        with torch.device(device):
            self.model: MoeTransformer = get_architecture(cfg.model_type).build(
                cfg, CastExperts(self.store, compute_dtype, grouped))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B*T, V] (fp32)."""
        B, T = tokens.shape
        batch = AttnBatch.full(B, T, tokens.device, self.cfg.sliding_window)
        return self.model.logits(self.model(tokens.flatten(), batch))

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), output projections (o_proj, expert down) scaled by 1/sqrt(2 * layers)."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.num_hidden_layers)
        for name, p in self.model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, out_std if "o_proj" in name else std)
        n = 2 * self.cfg.expert_intermediate_size * self.cfg.hidden_size  # gate and up come first in a block
        self.experts[..., :n].normal_(0.0, std)
        self.experts[..., n:].normal_(0.0, out_std)


def add_dropout(model: MoeTransformer, p: float) -> None:
    """Dropout on the embeddings and on every attention and MoE output, as forward hooks (train mode only)."""
    if p <= 0:
        return
    hook = lambda m, inputs, out: F.dropout(out, p, m.training)  # noqa: E731
    model.embed_tokens.register_forward_hook(hook)
    for layer in model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def optimizer(t: Trainee, c: DemoConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for n, p in t.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in t.named_parameters() if p.dim() < 2]  # the norms
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def lr_at(step: int, total: int, c: DemoConfig) -> float:
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, total - c.warmup_steps))
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _flush(curve: dict, pending: list[torch.Tensor], step: int) -> None:
    """Move the per-step losses kept on the device into the curve (one host sync)."""
    if pending:
        for i, (lo, ax) in enumerate(torch.stack(pending).tolist()):
            curve["step"].append(step - len(pending) + i + 1)
            curve["loss"].append(round(lo, 4))
            curve["aux"].append(round(ax, 4))
        pending.clear()


def train(c: DemoConfig, corpus: Path, out: Path, minutes: float, seed: int, device: str | torch.device) -> dict:
    t0 = time.perf_counter()
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MoeflowError("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
        torch.backends.cuda.matmul.allow_tf32 = True
    log = {"seed": seed, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "config": asdict(c), "minutes": minutes}
    c, tokenizer, batches, heldout_wins, total = _data(c, corpus, seed, device, log, t0)
    t, opt = _model(c, seed, device, log)
    _train_loop(t, opt, c, batches, heldout_wins, total, device, log, deadline=t0 + minutes * 60)
    report.export(t, tokenizer, out)  # export, evaluate what was exported, report
    report.finish(log, out, heldout_wins, device, c.batch_size, t0)
    return log


def _data(c: DemoConfig, corpus: Path, seed: int, device: torch.device, log: dict, t0: float):
    """The corpus read and split, the tokenizer trained on it, the token streams: (c with the vocabulary the
    corpus filled, tokenizer, training batches, held-out windows, steps planned)."""
    train_texts, heldout_texts, heldout_names = data.read_corpus(corpus)
    tokenizer = data.train_tokenizer(train_texts, c.vocab_size, c.context)
    if tokenizer.tok.get_vocab_size() != c.vocab_size:  # a tiny corpus cannot fill the vocabulary
        c = replace(c, vocab_size=tokenizer.tok.get_vocab_size())
    train_ids = data.token_stream(tokenizer, train_texts).to(device)
    heldout_ids = data.token_stream(tokenizer, heldout_texts)
    batches = data.Batches(train_ids, c.context, c.batch_size, seed)
    total = c.steps or max(1, round(c.epochs * batches.per_epoch))
    log["data"] = {"corpus": str(corpus), "train_files": len(train_texts), "heldout_files": heldout_names,
                   "train_tokens": train_ids.numel(), "heldout_tokens": heldout_ids.numel(),
                   "train_bytes": sum(len(t.encode()) for t in train_texts),
                   "heldout_bytes": sum(len(t.encode()) for t in heldout_texts),
                   "tokenizer_s": round(time.perf_counter() - t0, 1)}
    print(f"corpus: {len(train_texts)} train files ({train_ids.numel():,} tokens), {len(heldout_texts)} held out "
          f"({heldout_ids.numel():,}); {total} steps of {c.batch_size} x {c.context} "
          f"({total / batches.per_epoch:.1f} epochs)", flush=True)
    return c, tokenizer, batches, data.windows(heldout_ids, c.context), total


def _model(c: DemoConfig, seed: int, device: torch.device, log: dict) -> tuple[Trainee, torch.optim.AdamW]:
    torch.manual_seed(seed)
    grouped = grouped_backward_works(device)
    t = Trainee(c.model_config(), device, torch.bfloat16 if device.type == "cuda" else torch.float32, grouped)
    t.init_weights()
    add_dropout(t.model, c.dropout)
    opt = optimizer(t, c, device)
    n_params = sum(p.numel() for p in t.parameters())
    log["params"] = n_params
    log["expert_path"] = "grouped_mm" if grouped else "loop"
    print(f"model: {n_params / 1e6:.2f}M parameters ({t.experts.numel() / 1e6:.2f}M in experts), "
          f"experts via {log['expert_path']}, on {log['device']}", flush=True)
    return t, opt


def _train_loop(t: Trainee, opt, c: DemoConfig, batches, heldout_wins, total: int, device: torch.device, log: dict,
                deadline: float) -> None:
    """Steps until `total` or the deadline, held-out loss every eval_every steps; the weights with the lowest
    held-out loss (the last ones unless it overfit) are loaded back into t at the end. Fills log's training and
    curve."""
    curve = {"step": [], "loss": [], "aux": [], "eval_step": [], "eval_loss": [], "eval_tokens": []}
    best, best_loss, step, stopped_by = None, float("inf"), 0, "steps"
    pending: list[torch.Tensor] = []  # per-step (loss, aux) on the device: read at eval time, not every step
    t_train = time.perf_counter()
    with RouterTap(t.model) as tap:
        while step < total:
            if time.perf_counter() > deadline:
                stopped_by = "time"
                break
            pending.append(_step(t, opt, c, tap, next(batches), lr_at(step, total, c), device))
            step += 1
            if step == 20:  # the step rate is known by now: will the schedule fit the time limit?
                _sync(device)
                print(f"~{(time.perf_counter() - t_train) / 20 * total:.0f}s for {total} steps at the rate of the "
                      f"first 20 (limit {deadline - t_train:.0f}s)", flush=True)
            if step % c.eval_every == 0 or step == total:
                _flush(curve, pending, step)
                loss = _evaluate(t, tap, heldout_wins, c, device, curve, step)
                if loss < best_loss:
                    best_loss, best = loss, {k: v.detach().clone() for k, v in t.state_dict().items()}
                el = time.perf_counter() - t_train
                print(f"step {step}/{total} epoch {step / batches.per_epoch:.2f} loss {curve['loss'][-1]:.3f} "
                      f"aux {curve['aux'][-1]:.3f} held-out {loss:.3f} lr {lr_at(step - 1, total, c):.2e} "
                      f"{step * c.batch_size * c.context / el:,.0f} tok/s {el:.0f}s", flush=True)
    _flush(curve, pending, step)
    _sync(device)
    train_s = time.perf_counter() - t_train
    best_step = step
    if best is not None:
        t.load_state_dict(best)
        best_step = curve["eval_step"][curve["eval_loss"].index(min(curve["eval_loss"]))]
    log["training"] = {"steps": step, "planned_steps": total, "stopped_by": stopped_by, "best_step": best_step,
                       "tokens": step * c.batch_size * c.context, "epochs": round(step / batches.per_epoch, 2),
                       "train_s": round(train_s, 1),
                       "tokens_per_s": round(step * c.batch_size * c.context / max(train_s, 1e-9)),
                       "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    log["curve"] = curve
    print(f"trained {step} steps in {train_s:.0f}s ({stopped_by}); exporting step {best_step}", flush=True)


def _step(t: Trainee, opt, c: DemoConfig, tap: RouterTap, batch: torch.Tensor, lr: float,
          device: torch.device) -> torch.Tensor:
    """One optimizer step on a batch [B, context + 1]: cross-entropy plus the load-balancing loss. Returns
    (loss, aux) on the device."""
    t.train()
    for g in opt.param_groups:
        g["lr"] = lr
    tap.clear()
    with autocast(device):
        logits = t(batch[:, :-1])
    ce = F.cross_entropy(logits, batch[:, 1:].flatten())
    aux = torch.stack([balance_loss(lg, t.model.cfg.num_experts_per_tok) for lg in tap.logits]).mean()
    (ce + c.aux_coef * aux).backward()
    torch.nn.utils.clip_grad_norm_(t.parameters(), c.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch.stack([ce.detach(), aux.detach()])


def _evaluate(t: Trainee, tap: RouterTap, heldout_wins, c: DemoConfig, device: torch.device, curve: dict,
              step: int) -> float:
    """The held-out loss per token, added to the curve."""
    t.eval()
    nll, n, _ = score(t.model, heldout_wins, c.batch_size, device)
    tap.clear()
    curve["eval_step"].append(step)
    curve["eval_loss"].append(round(nll / n, 4))
    curve["eval_tokens"].append(step * c.batch_size * c.context)
    return nll / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


TRAIN_FLAGS = {"epochs": float, "steps": int, "batch_size": int, "lr": float, "dropout": float, "aux_coef": float}


def add_parser(sub) -> None:
    from moeflow.flags import DEVICES

    t = sub.add_parser("train-demo", help="train the embedded demo model (a small Mixtral) on a text corpus")
    t.add_argument("--corpus", required=True, help="folder of .txt/.rst/.md files (e.g. the Python docs sources)")
    t.add_argument("--out", required=True, help="folder to write the Hugging Face checkpoint into")
    t.add_argument("--size", default="demo", choices=list(SIZES), help="demo (GPU, minutes), tiny (CPU), test")
    t.add_argument("--minutes", type=float, default=7.0, help="wall-clock limit on training; export follows")
    t.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    t.add_argument("--device", choices=DEVICES, help="cuda or cpu (default: cuda where available)")
    for name, typ in TRAIN_FLAGS.items():
        t.add_argument(f"--{name.replace('_', '-')}", type=typ,
                       help=f"default: {getattr(SIZES['demo'], name)} (--size demo)")
    t.set_defaults(func=run)


def run(args) -> int:
    """`moeflow train-demo`: the size's config with the flags given on top."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MoeflowError(f"--out {out} exists and is not a folder")
    overrides = {k: v for k in TRAIN_FLAGS if (v := getattr(args, k)) is not None}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    train(replace(SIZES[args.size], **overrides), Path(args.corpus), out, args.minutes, args.seed, device)
    return 0
