"""LoRA adapters: construction, the tensors nodes exchange, saving and loading.

Every party builds the same adapter skeleton from the run config. The A matrices are
initialised from the run seed and each module's name, on the CPU, so every node and
the coordinator derive bit-identical A without exchanging it: FFA-LoRA keeps A frozen
at that value and exchanges only B. B starts at zero, so round 0 is the base model.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from shared.config import RunConfig
from shared.errors import ModelError
from shared.seeds import derive_seed

ADAPTER_META = "fedchat-adapter.json"


def _canonical(name: str) -> str:
    """Parameter name without peft's wrapper prefix and adapter name."""
    return name.replace("base_model.model.", "", 1).replace(".default", "")


def attach_adapter(model, cfg: RunConfig):
    """Wrap a frozen base model with the run's LoRA adapter, deterministically initialised."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(
            f"cannot attach LoRA to modules {cfg.target_modules}: {exc}. "
            "Set lora-target-modules to linear layer names of this model."
        ) from None
    with torch.no_grad():
        for name, param in lora_parameters(peft_model).items():
            if ".lora_A." in name:
                fan_in = param.shape[1]
                gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _canonical(name)))
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), peft's default
                value = (torch.rand(param.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
                param.copy_(value.to(param.device, param.dtype))
                param.requires_grad_(cfg.aggregation != "ffa")
            else:
                param.zero_()
                param.requires_grad_(True)
    return peft_model


def lora_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def exchanged_names(peft_model, aggregation: str) -> list[str]:
    """The tensors that travel each round: A and B for 'fedavg', only B for 'ffa'."""
    names = sorted(lora_parameters(peft_model))
    if aggregation == "ffa":
        names = [n for n in names if ".lora_B." in n]
    return names


def get_arrays(peft_model, names: list[str]) -> list[np.ndarray]:
    params = dict(peft_model.named_parameters())
    return [params[n].detach().to("cpu", torch.float32).numpy().copy() for n in names]


def check_arrays(arrays: list[np.ndarray], shapes: list[tuple[int, ...]], what: str) -> None:
    """Refuse an update of the wrong count, shape or with non-finite values."""
    if len(arrays) != len(shapes):
        raise ValueError(f"{what} has {len(arrays)} tensors, expected {len(shapes)}")
    for i, (arr, shape) in enumerate(zip(arrays, shapes)):
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{what}: tensor {i} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: tensor {i} contains NaN or infinite values")


def set_arrays(peft_model, names: list[str], arrays: list[np.ndarray]) -> None:
    params = dict(peft_model.named_parameters())
    check_arrays(arrays, [tuple(params[n].shape) for n in names], "adapter parameters")
    with torch.no_grad():
        for name, arr in zip(names, arrays):
            params[name].copy_(torch.from_numpy(np.asarray(arr, dtype=np.float32)))


def fingerprint(arrays: list[np.ndarray]) -> str:
    """SHA-256 over the float32 bytes of a list of tensors, in order."""
    h = hashlib.sha256()
    for arr in arrays:
        h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()


def frozen_a_fingerprint(peft_model) -> str:
    names = sorted(n for n in lora_parameters(peft_model) if ".lora_A." in n)
    return fingerprint(get_arrays(peft_model, names))


def save_adapter(peft_model, out: Path, meta: dict) -> None:
    """A PEFT adapter folder (PeftModel.from_pretrained loads it) plus fedchat's metadata."""
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=2))


def read_adapter_meta(folder: Path) -> dict:
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"{folder} is not an adapter folder (no adapter_config.json): "
                         "give a checkpoint folder or OUT/adapter of a fedchat run.")
    meta_file = folder / ADAPTER_META
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def load_adapter(base_model, folder: Path):
    """Base model + adapter as a PeftModel (frozen, eval mode)."""
    from peft import PeftModel

    read_adapter_meta(folder)
    model = PeftModel.from_pretrained(base_model, folder)
    model.eval()
    model.requires_grad_(False)
    return model
