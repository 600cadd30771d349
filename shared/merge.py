"""Merge an adapter into its base model: a plain HF model folder anyone can load or serve."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from shared.adapter import load_adapter, read_adapter_meta
from shared.errors import ModelError
from shared.model import load_model, load_tokenizer, resolve_base_model

log = logging.getLogger("fedchat.merge")
MERGED_META = "fedchat-merged.json"


def merge_adapter(adapter_dir: str | Path, out: str | Path, *, base_model: str | None = None,
                  overwrite: bool = False) -> Path:
    """Write base + adapter as one safetensors model with tokenizer and chat template."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"{out} exists and is not empty: choose another --out, or --force to replace it.")
    merged, base_dir, base_name, meta = merged_in_memory(adapter_dir, torch.device("cpu"), torch.float32,
                                                         base_model, flag="--base-model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(base_dir).save_pretrained(tmp)
        (tmp / MERGED_META).write_text(json.dumps(
            {"base_model": str(base_name), "adapter": str(adapter_dir.resolve()), "round": meta.get("round"),
             "run_id": meta.get("run_id")}, indent=2))
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged %s into %s -> %s", adapter_dir, base_dir, out)
    return out


def merged_in_memory(adapter_dir: Path, device: torch.device, dtype: torch.dtype, base: str | None = None, *,
                     flag: str) -> tuple[torch.nn.Module, Path, str, dict]:
    """(base + adapter merged, the base's folder, the base's name, the adapter's metadata).

    The base is `base` if given, else the one the adapter records: its path where that folder
    exists here (it may be another machine's), else its name. `flag` names the option that
    gives it, for the error when neither says."""
    meta = read_adapter_meta(adapter_dir)
    recorded = meta.get("base_model_path")
    name = base or (recorded if recorded and Path(recorded).is_dir() else meta.get("base_model"))
    if not name:
        raise ModelError(f"{adapter_dir} does not say which base model it adapts: pass {flag}.")
    base_dir = resolve_base_model(str(name))
    model = load_adapter(load_model(base_dir, device, dtype), adapter_dir).merge_and_unload()
    return model, base_dir, str(name), meta
