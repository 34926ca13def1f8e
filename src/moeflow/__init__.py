"""moeflow: run Mixture-of-Experts LLMs larger than the GPU by orchestrating CPU, GPU and PCIe."""

__version__ = "0.1.0"


class MoeflowError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""
