"""The native CPU decode-attention kernel (csrc/cpu_attention.cpp): built with the C++ compiler on first use,
cached by source, flags and CPU, loaded with ctypes (a call releases the GIL). None where it cannot be built:
callers then use PyTorch."""

from __future__ import annotations

import ctypes
import os
import subprocess
import warnings
from functools import cache
from pathlib import Path

import torch

from moeflow.experts.native import build_library

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = [CSRC / "cpu_attention.cpp", CSRC / "cpu_attention_body.inc", CSRC / "cpu_experts_pool.inc"]
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread")
KERNELS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3}
KINDS = (torch.float32, torch.bfloat16)  # what the kernel reads and writes


class NativeAttention:
    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.attn_decode.argtypes = [i, i, i, i, i, p, p, p, p, p, p, p, i, i, i, i, i, ctypes.c_float, p, p]
        lib.attn_decode.restype = i
        bits = lib.attn_features()
        self.features = {name for bit, name in ((1, "avx2"), (2, "avx512"), (4, "avx512bf16")) if bits & bit}

    def best(self) -> str:
        return next(k for k in ("avx512bf16", "avx512", "avx2", "scalar") if k == "scalar" or k in self.features)

    def supports(self, k_cache: torch.Tensor) -> bool:
        return k_cache.dtype in KINDS and k_cache.is_contiguous()

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, runs: torch.Tensor,
                 starts: torch.Tensor, window: int | None, threads: int, k_new: torch.Tensor | None = None,
                 v_new: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 kernel: str | None = None, scale: float | None = None,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, Hq, D]; k/v_cache [P, Hkv, D] (contiguous; one arena twice where K and V are the same rows);
        runs/starts int32 [B]: sequence b's run starts at position runs[b], its new token at runs[b] + starts[b];
        k_new/v_new [B, Hkv, D]: written there first (None: already written); out [B, Hq, D] fp32 or bf16 (default
        fp32); scale: the scores' (default D^-0.5); sinks [Hq]: a logit per head in each softmax (GPT-OSS) -> out."""
        B, Hq, D = q.shape
        q = q if q.dtype in KINDS and q.is_contiguous() else q.float().contiguous()
        out = torch.empty((B, Hq, D), dtype=torch.float32) if out is None else out
        news = [None, None] if k_new is None else [t.to(k_cache.dtype).contiguous() for t in (k_new, v_new)]
        assert runs.dtype == starts.dtype == torch.int32 and out.dtype in KINDS and out.is_contiguous()
        bf16 = [int(t.dtype == torch.bfloat16) for t in (k_cache, q, out)]
        sinks = None if sinks is None else sinks.detach().to("cpu", torch.float32).contiguous()
        assert sinks is None or sinks.shape == (Hq,)
        r = self.lib.attn_decode(KERNELS[kernel or self.best()], threads, *bf16, q.data_ptr(), k_cache.data_ptr(),
                                 v_cache.data_ptr(), *[None if t is None else t.data_ptr() for t in news],
                                 runs.data_ptr(), starts.data_ptr(), window or 0, B, Hq, k_cache.shape[1], D,
                                 D ** -0.5 if scale is None else scale, out.data_ptr(),
                                 None if sinks is None else sinks.data_ptr())
        if r != 0:
            raise RuntimeError(f"native CPU attention refused the call ({r})")
        return out


@cache
def load() -> NativeAttention | None:
    """The kernel, built if needed; None (with one warning) where no compiler builds it."""
    cxx = os.environ.get("CXX", "g++")  # the build's compiler, as for csrc/cpu_experts.cpp
    try:
        native = NativeAttention(build_library(cxx, "cpu_attention", SOURCES, FLAGS))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"moeflow: the native CPU attention kernel is unavailable ({e}); using PyTorch", stacklevel=2)
        return None
    for kernel in sorted(native.features - self_checked(native)):
        warnings.warn(f"moeflow: the native CPU attention's {kernel} path disagrees with its scalar one; "
                      "not using it", stacklevel=2)
        native.features.discard(kernel)
    return native


def self_checked(native: NativeAttention) -> set[str]:
    """The vector paths that agree with the scalar one on small cases (GQA, a tail of D, several V blocks; 16 heads
    on one KV head), in fp32 and in bf16 (there within bf16's rounding of the probabilities: the bf16 dot products
    take them in bf16, as a GPU's attention does)."""
    g = torch.Generator().manual_seed(0)
    runs, starts = torch.tensor([0, 200, 400], dtype=torch.int32), torch.tensor([0, 70, 199], dtype=torch.int32)
    ok = set(native.features)
    for Hq, Hkv, D in ((6, 2, 40), (16, 1, 72)):
        q = torch.randn(3, Hq, D, generator=g)
        k_cache, v_cache = (torch.randn(600, Hkv, D, generator=g) for _ in "kv")
        for dtype, tol in ((torch.float32, dict(rtol=0, atol=1e-4)), (torch.bfloat16, dict(rtol=1e-2, atol=1e-2))):
            args = [t.to(dtype) for t in (q, k_cache, v_cache)]
            ref = native(*args, runs, starts, None, 1, kernel="scalar")
            ok = {f for f in ok if torch.allclose(native(*args, runs, starts, None, 2, kernel=f), ref, **tol)}
    return ok
