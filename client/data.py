"""A node's local data: read and validate its dialogue file, encode it, split it."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from shared.dialogue import Encoded, encode_conversation, read_dialogues

log = logging.getLogger("fedchat.node")


@dataclass
class LocalData:
    train: list[Encoded]
    validation: list[Encoded]
    truncated: int
    skipped_lines: int


def load_local_data(path: str, tokenizer, *, max_len: int, validation_fraction: float,
                    seed: int, skip_bad_lines: bool = False) -> LocalData:
    """Validate, encode (chat template, assistant-only labels) and split with a fixed seed."""
    dialogues = read_dialogues(path, skip_bad_lines=skip_bad_lines)
    for line, problem in dialogues.skipped:
        log.warning("%s line %d skipped: %s", path, line, problem)
    encoded = [encode_conversation(tokenizer, m, max_len) for m in dialogues.conversations]
    truncated = sum(e.truncated for e in encoded)
    if truncated:
        log.warning("%s: %d of %d conversations are longer than max-seq-len=%d tokens and were truncated",
                    path, truncated, len(encoded), max_len)
    val_rows, train_rows = _split(len(encoded), validation_fraction, seed)
    return LocalData([encoded[i] for i in train_rows], [encoded[i] for i in val_rows], truncated,
                     len(dialogues.skipped))


def count_training_conversations(path: str, *, validation_fraction: float, skip_bad_lines: bool = False) -> int:
    """len(load_local_data(...).train) without a tokenizer: what the budget check before a round needs. It reads
    and validates the file the same way (encoding keeps every conversation, truncating the long ones), so a
    node answers the coordinator's can-you-train question without loading transformers."""
    conversations = len(read_dialogues(path, skip_bad_lines=skip_bad_lines).conversations)
    return len(_split(conversations, validation_fraction, seed=0)[1])


def _split(n: int, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(validation rows, training rows) of n conversations, shuffled with a fixed seed."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = int(n * validation_fraction)
    if n - n_val < 1:
        n_val = 0
    return order[:n_val], order[n_val:]
