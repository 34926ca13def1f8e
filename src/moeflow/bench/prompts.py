"""Prompt files for benchmarks and profiles: JSONL with `turns` (MT-Bench: the first turn), `text` or
`prompt`, or plain text with one prompt per line."""

from __future__ import annotations

import json
from pathlib import Path

from moeflow import MoeflowError


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise MoeflowError(f"prompt file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            out.append(line)
            continue
        try:
            d = json.loads(line)
            out.append(d["turns"][0] if "turns" in d else d.get("text") or d["prompt"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise MoeflowError(f"{path}:{n} is not a JSON object with `turns`, `text` or `prompt`") from None
    if not out:
        raise MoeflowError(f"prompt file {path} holds no prompts")
    return out
