"""The native CPU expert kernel (csrc/cpu_experts.cpp): built with the system C++ compiler on first use,
cached, loaded with ctypes. A ctypes call releases the GIL, so it runs beside the thread driving the GPU.

Where no compiler works, `load()` warns once and returns None; callers then use the PyTorch path.
Env: CXX (compiler, default g++), MOEFLOW_CACHE_DIR (the cache folder: config.cache_dir; builds under ext/).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np

from moeflow import config
from moeflow.config import CpuKernelConfig

SRC = Path(__file__).resolve().parents[1] / "csrc"
# the .inc files are included by the .cpp
SOURCES = ("cpu_experts.cpp", "cpu_experts_pool.inc", "cpu_experts_vec.inc", "cpu_experts_quant.inc",
           "cpu_experts_amx.inc", "cpu_experts_qcall.inc", "cpu_experts_async.inc", "cpu_experts_qdot.inc",
           "cpu_experts_call.inc", "cpu_experts_vnni.inc")
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread")
KERNELS = {"scalar": 0, "avx2": 1, "avx512": 2, "amx": 3, "amx-emu": 4}  # the kernel numbers of the .cpp
# The AMX blocking: rows of down_t repacked per chunk, of H per gate/up slice, rows per gate/up block (L2-sized).
# The fastest of a sweep at 16-256 tokens per Mixtral expert (docs/history/2026-12-02.md).
AMX_BLOCKING = CpuKernelConfig().amx_blocking


def options(cfg: CpuKernelConfig, amx_min_tokens: int, biased=None) -> np.ndarray:
    """The kernel's Opts (cpu_experts.cpp, N_OPTS int64 in its order) from a config; biased: the BiasedFormat of
    biased blocks (experts/biased.py), whose alpha and limit go as float32 bits."""
    act = np.array([biased.alpha, biased.limit] if biased else [0, 0], dtype=np.float32).view(np.uint32)
    return np.array([amx_min_tokens, cfg.fused_max_bytes, *cfg.amx_blocking, cfg.gemv_rows, cfg.prefetch,
                     int(cfg.pin), cfg.spin, int(cfg.down_direct), int(cfg.int4_bf16),
                     int(cfg.quant_avx512), int(biased is not None), *act.tolist(), cfg.quant_int8_tokens,
                     int(cfg.quant_int8_on_int8), cfg.quant_vnni, cfg.quant_prefetch],
                    dtype=np.int64)


def native_format(fmt) -> np.ndarray | None:
    """moe_experts_q's format array for a quantized ExpertFormat (quant/format.py), or None where the kernel has no
    path for it (H or the group size not a multiple of 32)."""
    spec = fmt.spec
    if fmt.hidden % 32 or spec.group_size % 32:
        return None
    fp16 = spec.scale_dtype.itemsize == 2 and str(spec.scale_dtype) == "torch.float16"
    return np.array([spec.bits, spec.group_size, int(spec.symmetric), int(fp16), fmt.record, fmt.q_bytes],
                    dtype=np.int64)

_loaded: dict[str, NativeKernel | None] = {}  # by compiler


def cpu_flags() -> set[str]:
    """The flags line of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    return config.cache_dir() / "ext"


def build_library(cxx: str, stem: str, sources: list[Path], flags: tuple[str, ...]) -> Path:
    """A shared library of sources[0] (which includes the rest), built once per source, flags and CPU into the
    cache folder (or the temporary one where that is read-only); raises where the compiler fails."""
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r}")
    h = hashlib.sha256()
    for src in sources:
        h.update(src.read_bytes())
    h.update(" ".join((cxx, *flags, *sorted(cpu_flags()))).encode())
    lib = cache_dir() / f"{stem}-{h.hexdigest()[:16]}.so"
    if not lib.exists():
        try:
            _build(cxx, sources[0], flags, lib)
        except PermissionError:  # a read-only home: build in the temporary folder
            lib = Path(tempfile.gettempdir()) / "moeflow-ext" / lib.name
            if not lib.exists():
                _build(cxx, sources[0], flags, lib)
    return lib


def _build(cxx: str, src: Path, flags: tuple[str, ...], lib: Path) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)  # built aside, then renamed: builds can race
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, str(src), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {(r.stderr or r.stdout).strip()[-800:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class NativeKernel:
    """ctypes binding of cpu_experts.cpp's C interface."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = lib = ctypes.CDLL(str(path))
        p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.moe_experts.argtypes = [i, i, p, i64, i, i, p, i, i, p, p, p, p, p, p, p, p]
        lib.moe_experts.restype = i
        lib.moe_experts_start.argtypes = [*lib.moe_experts.argtypes, p]
        lib.moe_experts_q.argtypes = [*lib.moe_experts.argtypes, p]
        lib.moe_experts_q.restype = i
        lib.moe_experts_start.restype = i
        lib.moe_experts_finish.argtypes = [p, i]
        lib.moe_experts_finish.restype = i
        lib.moe_experts_topk.argtypes = [i, i, p, i64, i, i, p, i, i, i, p, p, p, p, p]
        lib.moe_experts_topk.restype = i
        lib.moe_features.restype = i
        lib.moe_amx_ready.restype = i
        lib.moe_last_phases.argtypes = [p]
        lib.moe_amx_peak.argtypes = [i, i64, i, i64]
        lib.moe_amx_peak.restype = ctypes.c_double
        lib.moe_read.argtypes = [i, p, i64, i, p]
        bits = lib.moe_features()
        names = ((1, "avx2"), (2, "avx512"), (4, "amx"), (8, "avx512vnni"))  # avx512vnni: a path, not a kernel
        self.features = {name for bit, name in names if bits & bit}
        self._amx_ready: bool | None = None

    def can_run(self, kernel: str) -> bool:
        """Whether this CPU (and OS) runs `kernel`; AMX also needs the OS to grant the tile state."""
        if kernel in ("scalar", "amx-emu"):
            return True
        if kernel == "amx":
            if self._amx_ready is None:
                self._amx_ready = "amx" in self.features and bool(self.lib.moe_amx_ready())
            return self._amx_ready
        return kernel in self.features

    def best(self) -> str:
        return next(k for k in ("amx", "avx512", "avx2", "scalar") if self.can_run(k))

    def _args(self, kernel, threads, data, hidden, inter, x, n_tokens, meta, tok, tok_w, out, opts) -> tuple:
        J = (meta.size - 1) // 4
        m = meta.ctypes.data
        return (KERNELS[kernel], threads, data.data_ptr(), data.stride(0), hidden, inter, x.data_ptr(), n_tokens, J,
                m, m + 4 * J, m + 8 * J, m + 12 * J, tok.ctypes.data, tok_w.ctypes.data, out.data_ptr(),
                opts.ctypes.data)

    def run(self, kernel: str, threads: int, data, hidden: int, inter: int, x, n_tokens: int, meta, tok, tok_w, out,
            opts: np.ndarray, qfmt: np.ndarray | None = None) -> int:
        """One layer's J jobs, on this thread (the GIL released); returns the threads used. meta: int32 [4J + 1]
        = experts, r0s, r1s, and the J + 1 offsets of each job's tokens in tok (int32, rows of x) and tok_w
        (fp32), all three numpy arrays; x, out [N, H] fp32 tensors; opts: options(); qfmt: native_format() of
        quantized blocks (data uint8 [E, block bytes]), None for bf16."""
        args = self._args(kernel, threads, data, hidden, inter, x, n_tokens, meta, tok, tok_w, out, opts)
        n = self.lib.moe_experts(*args) if qfmt is None else self.lib.moe_experts_q(*args, qfmt.ctypes.data)
        if n < 0:
            raise RuntimeError(f"native CPU kernel {kernel} refused the call ({n})")
        return n

    def start(self, kernel: str, threads: int, data, hidden: int, inter: int, x, n_tokens: int, meta, tok, tok_w,
              out, opts: np.ndarray, qfmt: np.ndarray | None = None) -> None:
        """run() on the library's own thread: returns at once; finish() waits for it. The arrays must live until
        then. One call at a time."""
        r = self.lib.moe_experts_start(*self._args(kernel, threads, data, hidden, inter, x, n_tokens, meta, tok,
                                                   tok_w, out, opts), None if qfmt is None else qfmt.ctypes.data)
        if r < 0:
            raise RuntimeError("native CPU kernel: a call is already under way")

    def finish(self, kernel: str, spin: int = 0) -> tuple[int, float, float]:
        """Waits for the call start() handed over (first spinning up to `spin` pauses): (threads used, seconds
        from the hand-over to its start, seconds it ran)."""
        t = (ctypes.c_double * 2)()
        n = self.lib.moe_experts_finish(t, spin)
        if n < 0:
            raise RuntimeError(f"native CPU kernel {kernel} refused the call ({n})")
        return n, t[0], t[1]

    def run_topk(self, kernel: str, threads: int, data, hidden: int, inter: int, x, topk_ids, topk_weights, out,
                 opts: np.ndarray, qfmt: np.ndarray | None = None) -> int:
        """Every selected expert of a layer, grouped by expert in C: topk_ids [N, K] int64, topk_weights
        [N, K] fp32, x [N, H] fp32, out [N, H] fp32 (all contiguous); qfmt as run()'s."""
        N, K = topk_ids.shape
        n = self.lib.moe_experts_topk(KERNELS[kernel], threads, data.data_ptr(), data.stride(0), hidden, inter,
                                      x.data_ptr(), N, K, data.shape[0], topk_ids.data_ptr(),
                                      topk_weights.data_ptr(), out.data_ptr(), opts.ctypes.data,
                                      None if qfmt is None else qfmt.ctypes.data)
        if n < 0:
            raise RuntimeError(f"native CPU kernel {kernel} refused the call ({n})")
        return n

    def amx_peak(self, threads: int, loads: int = 0, span: int = 4096, iters: int = 200_000) -> float:
        """FLOP/s of `threads` threads running tile dot products alone (loads 0: the AMX units' ceiling) or fed
        from a buffer of span bytes each (L1- or L2-sized): four loads per four products (1), in the AMX path's
        order (2), with its sums stored and reloaded every 16 rounds (3). 0 without AMX."""
        s = self.lib.moe_amx_peak(threads, iters, loads, span)
        return threads * iters * 4 * 32768 / s if s > 0 else 0.0

    def last_phases(self) -> tuple[float, float, float]:
        """Seconds of the last call's phases: preparation, gate/up, down."""
        s = (ctypes.c_double * 3)()
        self.lib.moe_last_phases(s)
        return tuple(s)

    def read_bw(self, threads: int, data, reps: int = 5, best: bool = False) -> float:
        """Bytes/s (median of reps, or the fastest with `best`) of `threads` threads streaming the contiguous CPU
        tensor `data` with the kernel's widest loads."""
        s = (ctypes.c_double * reps)()
        self.lib.moe_read(threads, data.data_ptr(), data.numel() * data.element_size(), reps, s)
        return data.numel() * data.element_size() / (min(s) if best else sorted(s)[reps // 2])


def load() -> NativeKernel | None:
    """The kernel library, built if needed; None (with one warning) where it cannot be built or loaded."""
    cxx = os.environ.get("CXX", "g++")
    if cxx not in _loaded:
        try:
            _loaded[cxx] = NativeKernel(build_library(cxx, "cpu_experts", [SRC / n for n in SOURCES], FLAGS))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            warnings.warn(f"moeflow: the native CPU expert kernel is unavailable ({e}); using PyTorch",
                          RuntimeWarning, stacklevel=2)
            _loaded[cxx] = None
    return _loaded[cxx]
