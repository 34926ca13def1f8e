"""The throughput regime: the CGOPipe pipeline engine (CPU attention, streamed experts, micro-batches)."""
