"""Dialogue files for tests: JSONL records and a one-exchange conversation."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def conversation(q: str = "What is the capital of France?", a: str = "Paris.") -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
