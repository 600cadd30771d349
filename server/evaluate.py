"""Held-out evaluation on the coordinator: a file no node trains on."""

from __future__ import annotations

import logging

from shared.dialogue import encode_conversation, read_dialogues
from shared.model import heldout_loss

log = logging.getLogger("fedchat.coordinator")


class HeldOutEvaluator:
    def __init__(self, path: str, tokenizer, *, max_len: int, max_conversations: int) -> None:
        dialogues = read_dialogues(path)
        conversations = dialogues.conversations
        if max_conversations:
            conversations = conversations[:max_conversations]
        self.data = [encode_conversation(tokenizer, m, max_len) for m in conversations]
        self.pad_id = tokenizer.pad_token_id
        log.info("held-out evaluation: %d conversations from %s", len(self.data), path)

    def __call__(self, model) -> float:
        return heldout_loss(model, self.data, self.pad_id)
