"""The model being served: loading it (merged folder, or base + adapter merged in memory)
and watching a coordinator's output for newer rounds."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from serving.serving_config import ModelSource
from shared.adapter import ADAPTER_META
from shared.errors import ModelError
from shared.merge import MERGED_META, merged_in_memory
from shared.model import load_model, load_tokenizer, select_device, select_dtype

log = logging.getLogger("fedchat.serve")


class PromptTooLong(ModelError):
    """A conversation holds more tokens than the model's context, known without tokenizing it."""

    def __init__(self, at_least: int) -> None:
        super().__init__(f"the conversation holds at least {at_least} tokens")
        self.at_least = at_least


@dataclass
class ServedModel:
    """One loaded model with everything a request needs from it."""

    model: object
    tokenizer: object
    path: Path  # the folder it was loaded from (symlinks resolved)
    round: int | None
    run_id: str | None
    base_model: str | None
    context_length: int
    eos_ids: frozenset[int]
    loaded_at: int = field(default_factory=lambda: int(time.time()))
    # Fast tokenizers are not safe to use from two threads at once ("Already borrowed"):
    # the HTTP thread encodes prompts while the generation thread decodes tokens.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device  # type: ignore[attr-defined]

    def fingerprint(self) -> str:
        """What `system_fingerprint` reports: which round answered."""
        return f"fedchat-round-{self.round}" if self.round is not None else f"fedchat-{self.path.name}"

    def encode_chat(self, messages: list[dict], limit: int | None = None) -> list[int]:
        """Token ids of the conversation through the model's chat template, ready for the answer (what
        `apply_chat_template(..., tokenize=True)` gives). With `limit`, a conversation whose text is longer
        than `limit` of the vocabulary's longest token holds more than `limit` tokens whatever they are:
        PromptTooLong, before any of it is tokenized (tokenizing costs about a second per MB)."""
        tok = self.tokenizer
        with self.tokenizer_lock:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
            if limit is not None and len(text) > limit * self.max_token_chars:
                raise PromptTooLong(len(text) // self.max_token_chars)
            return list(tok(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (a token's string is never shorter than its text)."""
        return max(len(token) for token in self.tokenizer.get_vocab())  # type: ignore[attr-defined]

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]


def model_loader(device: str, dtype: str) -> Callable[[ModelSource], ServedModel]:
    """load_served on the device and dtype named by the --device and --dtype options."""
    dev = select_device(device)
    dt = select_dtype(dtype, dev)
    return lambda source: load_served(source, dev, dt)


def load_served(source: ModelSource, device: torch.device, dtype: torch.dtype) -> ServedModel:
    """Load a merged model folder, or a base model with an adapter merged into it in memory."""
    path = Path(os.path.realpath(source.path))
    if source.kind == "merged":
        if not (path / "config.json").is_file():
            raise ModelError(f"{source.path} is not a model folder (no config.json): give a merged model "
                             "folder (`fedchat merge` output or a run's OUT/merged), or --adapter with --base.")
        meta = _read_json(path / MERGED_META)
        tokenizer = load_tokenizer(path)
        model = load_model(path, device, dtype)
        base = meta.get("base_model")
    else:
        model, base_dir, base, meta = merged_in_memory(path, device, dtype, source.base, flag="--base")
        tokenizer = load_tokenizer(base_dir)
    return ServedModel(
        model=model, tokenizer=tokenizer, path=path, round=meta.get("round"),
        run_id=meta.get("run_id"), base_model=None if base is None else str(base),
        context_length=_context_length(model), eos_ids=_eos_ids(model, tokenizer))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}): rewrite it with `fedchat merge --force`.") from None


def _context_length(model) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError("the model config states no context length (max_position_embeddings): "
                     "set it in the model folder's config.json.")


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ModelError("the model and tokenizer name no end-of-sequence token: set eos_token_id in "
                         "generation_config.json.")
    return frozenset(ids)


def source_version(link: Path) -> tuple[str, int] | None:
    """What identifies the round a link points at: its target and its metadata's mtime.

    None while there is nothing complete to load (no link yet, or a folder without weights).
    """
    target = Path(os.path.realpath(link))
    for marker, meta in (("config.json", MERGED_META), ("adapter_config.json", ADAPTER_META)):
        if (target / marker).is_file():
            stamp = target / meta if (target / meta).is_file() else target / marker
            try:
                return str(target), stamp.stat().st_mtime_ns
            except FileNotFoundError:  # swapped away while we looked
                return None
    return None


class ModelWatcher:
    """Polls a symlink (OUT/merged or OUT/adapter); loads each new target in the background
    and hands it to `on_new`. A failed load is logged and retried when the link changes again.

    What the link points at when the watcher is made counts as seen: make it before loading
    the first model, so that a round published during that load is not missed.
    """

    def __init__(self, source: ModelSource, load: Callable[[ModelSource], ServedModel],
                 on_new: Callable[[ServedModel], None], interval: float) -> None:
        self.source, self._load, self._on_new, self.interval = source, load, on_new, interval
        self._seen = source_version(source.path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedchat-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def check(self) -> bool:
        """Load the link's target if it changed; True when a new model was handed over."""
        version = source_version(self.source.path)
        if version is None or version == self._seen:
            return False
        self._seen = version
        log.info("new model at %s -> %s: loading it in the background", self.source.path, version[0])
        started = time.perf_counter()
        try:
            served = self._load(self.source)
        except Exception as exc:  # a bad checkpoint must not take the server down
            log.error("cannot load %s (%s); still serving the previous model", version[0], exc)
            return False
        self._on_new(served)
        log.info("now serving round %s from %s (loaded in %.1fs)", served.round, served.path,
                 time.perf_counter() - started)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()
