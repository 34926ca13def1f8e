"""The hierarchical roofline model (MoE-Lightning's HRM, arXiv 2411.11217): a kernel run at level i with its
data at level j attains P = min(P_peak_i, B_i * I_i, B_{j->i} * I_j), with I_i its FLOPs per byte read at
level i and I_j its FLOPs per byte moved over the link from j to i (no link term when i == j).

Levels: the GPU and the CPU (peak FLOP/s, memory bandwidth) and the links between them (PCIe, each way),
all from a HardwareProfile. Kernel descriptors give FLOPs and bytes for the decoder's parts.

Legend: N = tokens, K = experts per token, E = experts, H = hidden, I = expert FFN width, b = bytes/weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeflow import MoeflowError
from moeflow.config import ModelConfig
from moeflow.perf.profile import HardwareProfile


@dataclass(frozen=True)
class Level:
    name: str
    peak: float  # FLOP/s
    bw: float    # bytes/s of its own memory


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float       # read (and written) at the level it runs on
    link_bytes: float  # moved over the link when its data lives at the other level

    def intensity(self) -> float:
        return self.flops / self.bytes

    def link_intensity(self) -> float:
        return self.flops / self.link_bytes if self.link_bytes else float("inf")


def levels(profile: HardwareProfile) -> dict[str, Level]:
    out = {"CPU": Level("CPU", profile.cpu_flops, profile.cpu_read_bw)}
    if profile.has_gpu:
        out["GPU"] = Level("GPU", profile.gpu_flops, profile.gpu_bw)
    return out


def link_bw(profile: HardwareProfile, src: str, dst: str) -> float:
    """Bandwidth of moving data from level src to level dst."""
    if src == dst:
        return float("inf")
    return profile.h2d_bw if (src, dst) == ("CPU", "GPU") else profile.d2h_bw


def attainable(k: Kernel, at: str, data_at: str, profile: HardwareProfile) -> float:
    """FLOP/s the kernel attains at level `at` with its data at level `data_at`."""
    lv = levels(profile)[at]
    p = min(lv.peak, lv.bw * k.intensity())
    if data_at != at:
        p = min(p, link_bw(profile, data_at, at) * k.link_intensity())
    return p


# -- kernel descriptors, per decoder layer ------------------------------------------------------------------
def experts_used(cfg: ModelConfig, n: int) -> float:
    """Expected distinct experts of a layer that n tokens select (uniform routing)."""
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - K / E) ** n)


def expert_ffn(cfg: ModelConfig, n: int, b: int = 2, experts: float | None = None) -> Kernel:
    """The MoE FFN of one layer over n tokens. With experts=E this is the HRM's
    I(N) = 6 N H I K / (2 N H + 2 N I + 6 H I E) (b = 2), counting each token's activations once."""
    H, I, K = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts_per_tok
    e = experts_used(cfg, n) if experts is None else experts
    weights = e * 3 * H * I * b
    act = n * (H + I) * b
    return Kernel(f"expert FFN, {n} tok", 6 * n * H * I * K, weights + act, weights + act)


def attention_decode(cfg: ModelConfig, n: int, ctx: int, b: int = 2) -> Kernel:
    """n sequences each attending over ctx cached tokens: the KV cache is what is read (and moved)."""
    heads, D, kvh = cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
    kv = n * ctx * 2 * kvh * D * b
    qo = n * 2 * heads * D * b
    return Kernel(f"attention decode, {n} seq x {ctx}", 4 * n * ctx * heads * D, kv + qo, kv + qo)


def attention_prefill(cfg: ModelConfig, p: int, b: int = 2) -> Kernel:
    heads, D, kvh = cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
    io = p * (2 * heads + 2 * kvh) * D * b
    return Kernel(f"attention prefill, {p} tok", 2 * p * p * heads * D, io, io)


def dense_layer(cfg: ModelConfig, n: int, b: int = 2) -> Kernel:
    """The non-expert projections of one layer (Q, K, V, O, router) over n tokens."""
    numel = cfg.layer_dense_numel(cfg.moe_layers[0] if cfg.moe_layers else 0)
    io = 2 * n * cfg.hidden_size * b
    return Kernel(f"dense projections, {n} tok", 2 * n * numel, numel * b + io, numel * b + io)


def standard_kernels(cfg: ModelConfig, prompt_len: int = 512, ctx: int = 640, batch: int = 256,
                     b: int = 2) -> list[Kernel]:
    return [expert_ffn(cfg, 1, b), expert_ffn(cfg, batch, b), expert_ffn(cfg, prompt_len, b),
            attention_decode(cfg, 1, ctx, b), attention_decode(cfg, batch, ctx, b),
            attention_prefill(cfg, prompt_len, b), dense_layer(cfg, 1, b), dense_layer(cfg, batch, b)]


def draw(profile: HardwareProfile, kernels: list[Kernel], path: str | Path, title: str = "") -> Path:
    """Roofs of every level and link, and each kernel at its intensity per level (filled: data local;
    hollow: data across the link)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoeflowError("drawing the roofline needs matplotlib (pip install matplotlib)") from None
    import numpy as np

    lv = levels(profile)
    x = np.logspace(-2, 5, 200)
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = {"GPU": "tab:green", "CPU": "tab:blue"}
    for name, level in lv.items():
        ax.loglog(x, np.minimum(level.peak, level.bw * x), color=colors[name],
                  label=f"{name}: {level.peak / 1e12:.2f} TFLOP/s, {level.bw / 1e9:.0f} GB/s")
    if profile.has_gpu:
        ax.loglog(x, profile.h2d_bw * x, "--", color="tab:red", label=f"CPU->GPU link {profile.h2d_bw / 1e9:.0f} GB/s")
        ax.loglog(x, profile.d2h_bw * x, ":", color="tab:orange",
                  label=f"GPU->CPU link {profile.d2h_bw / 1e9:.0f} GB/s")
    markers = "os^vD<>pPX*"
    for i, k in enumerate(kernels):
        m = markers[i % len(markers)]
        for name in lv:
            ax.loglog(k.intensity(), attainable(k, name, name, profile), m, color=colors[name], ms=7)
            other = "CPU" if name == "GPU" else "GPU"
            if other in lv:
                ax.loglog(k.link_intensity(), attainable(k, name, other, profile), m, mfc="none",
                          color=colors[name], ms=7)
        ax.plot([], [], m, color="gray", label=k.name)
    ax.plot([], [], "o", color="gray", label="filled: data in the level's own memory")
    ax.plot([], [], "o", mfc="none", color="gray", label="hollow: data across the CPU-GPU link")
    ax.set_xlabel("operational intensity (FLOP per byte read, or moved over the link)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(title or f"hierarchical roofline: {profile.host}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
