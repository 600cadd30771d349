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
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    n_val = int(len(encoded) * validation_fraction)
    if len(encoded) - n_val < 1:
        n_val = 0
    validation = [encoded[i] for i in order[:n_val]]
    train = [encoded[i] for i in order[n_val:]]
    return LocalData(train, validation, truncated, len(dialogues.skipped))
