"""BatchPredictor: `moeflow batch` as a callable class for Ray Data's `Dataset.map_batches` (one engine per worker).

    ds = ray.data.read_text("requests.jsonl")          # one row per line: {"text": line}
    out = ds.map_batches(BatchPredictor, fn_constructor_kwargs={"flags": ["--gpu-memory", "24GiB"]},
                         concurrency=4, num_gpus=1, batch_size=512)

Rows are Batch API lines (a `text` column, as read_text gives) or columns of a line's fields (custom_id, url,
body, or prompt). Each output row is one result record: `custom_id` and `result` (the record as a JSON line).
"""

from __future__ import annotations

import json

from moeflow.batch.requests import BatchRequest, parse_line


def _rows(batch: dict) -> list[dict]:
    """Ray's columnar batch (numpy arrays or lists per column) -> row dicts of plain Python values."""
    cols = {k: list(v) for k, v in batch.items()}
    n = len(next(iter(cols.values()), []))
    plain = [{k: _plain(cols[k][i]) for k in cols} for i in range(n)]
    return plain


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else v  # numpy scalars and arrays


class BatchPredictor:
    def __init__(self, flags: list[str] | None = None):
        """flags: `moeflow batch`'s engine and sampling flags (--model, --gpu-memory, --engine, --plan,
        --max-new-tokens, ...); the engine loads once per worker."""
        from moeflow.batch.cli import _engine
        from moeflow.batch.job import Defaults
        from moeflow.cli import DEFAULT_MODEL, build_parser, check_args

        args = build_parser().parse_args(["batch", "--input", "-", "--output", "-", *(flags or [])])
        check_args(args)
        self.engine, _ = _engine(args)
        self.model = args.served_model_name or args.model or DEFAULT_MODEL
        self.defaults = Defaults(args.max_new_tokens, args.default_temperature, args.default_top_p, args.seed)

    def __call__(self, batch: dict) -> dict:
        from moeflow.batch.job import BatchJob

        items = []
        for i, row in enumerate(_rows(batch), 1):
            line = row["text"] if set(row) == {"text"} else json.dumps(row)
            if not line.strip():
                continue
            item = parse_line(line, i)
            if not isinstance(item, BatchRequest) and item["custom_id"] is None:
                item["custom_id"] = f"row-{i}"
            items.append(item)
        records = list(BatchJob(self.engine, self.model, self.defaults).results(items))
        return {"custom_id": [r["custom_id"] for r in records],
                "result": [json.dumps(r, ensure_ascii=False) for r in records]}
