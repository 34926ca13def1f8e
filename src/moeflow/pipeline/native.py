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

SRC = Path(__file__).resolve().parents[1] / "csrc" / "cpu_attention.cpp"
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread")
KERNELS = {"scalar": 0, "avx2": 1, "avx512": 2}


class NativeAttention:
    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.attn_decode.argtypes = [i, i, i, p, p, p, i64, p, p, p, i, i, i, i, ctypes.c_float, p]
        lib.attn_decode.restype = i
        bits = lib.attn_features()
        self.features = {name for bit, name in ((1, "avx2"), (2, "avx512")) if bits & bit}

    def best(self) -> str:
        return next(k for k in ("avx512", "avx2", "scalar") if k == "scalar" or k in self.features)

    def supports(self, k_cache: torch.Tensor) -> bool:
        return k_cache.dtype in (torch.float32, torch.bfloat16) and k_cache.is_contiguous()

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 firsts: torch.Tensor, ends: torch.Tensor, threads: int, kernel: str | None = None) -> torch.Tensor:
        """q [B, Hq, D]; k/v_cache [S, T, Hkv, D] (contiguous); slots/firsts/ends int32 [B] -> [B, Hq, D] fp32."""
        B, Hq, D = q.shape
        qf = q.float().contiguous()
        out = torch.empty((B, Hq, D), dtype=torch.float32)
        r = self.lib.attn_decode(KERNELS[kernel or self.best()], threads, int(k_cache.dtype == torch.bfloat16),
                                 qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
                                 slots.data_ptr(), firsts.data_ptr(), ends.data_ptr(), B, Hq, k_cache.shape[2], D,
                                 D ** -0.5, out.data_ptr())
        if r != 0:
            raise RuntimeError(f"native CPU attention refused the call ({r})")
        return out


@cache
def load() -> NativeAttention | None:
    """The kernel, built if needed; None (with one warning) where no compiler builds it."""
    cxx = os.environ.get("CXX", "g++")  # the build's compiler, as for csrc/cpu_experts.cpp
    try:
        return NativeAttention(build_library(cxx, "cpu_attention", [SRC], FLAGS))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"moeflow: the native CPU attention kernel is unavailable ({e}); using PyTorch", stacklevel=2)
        return None
