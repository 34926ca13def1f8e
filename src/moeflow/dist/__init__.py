"""Several GPUs of one host: one process per GPU (launch.py), attention and dense layers tensor-parallel (tp.py),
routed experts expert-parallel (ep.py), rank 0 driving the others step by step (engine.py)."""
