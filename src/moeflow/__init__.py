"""moeflow: run Mixture-of-Experts LLMs larger than the GPU by orchestrating CPU, GPU and PCIe."""

import os

__version__ = "0.1.0"

# PyTorch's OpenMP threads (GNU libgomp) spin for milliseconds after each parallel op before they sleep; the
# native CPU expert kernel's threads then share the cores with spinning ones (measured on a 2-core dev machine:
# the kernel's preparation phase took 3-8 ms beside them, 0.3 ms without). A short spin still keeps
# back-to-back PyTorch ops quick. libgomp reads it when torch loads: it holds where moeflow is imported first
# (the CLI); a value set by the user stays.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")


class MoeflowError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""
