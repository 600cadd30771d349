"""Canaries for an empirical privacy audit: make them, keep their secret, score a model on them.

A canary is a conversation in the node's data format whose assistant turn holds a secret: a
sequence of random rare words, each one token of the base model's vocabulary (Panda et al.,
arXiv 2503.06808, audit LLM fine-tuning with canaries of new or rare tokens), so that the
secrets of two canaries share almost no token and learning one says little about another. Each canary
is included in the node's training data by an independent fair coin; the auditor keeps every canary and its coin in a
secret file and later measures how much training lowered each canary's loss on its secret
(`fedchat.audit.one_run` turns that into a lower bound on epsilon).

The coins and secrets come from the OS (`secrets.SystemRandom`) unless a seed is given, which
is for reproducible tests and benches only: whoever knows the seed knows the coins.
"""

from __future__ import annotations

import json
import random
import re
import secrets as _secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from shared.dialogue import IGNORE, ROLES, Encoded, assistant_spans, collate
from shared.errors import DataError
from shared.files import atomic_write_text
from shared.model import conversation_losses

FORMAT = "fedchat-canaries/1"
MIN_VOCABULARY = 1000
DEFAULT_TEMPLATE = [
    {"role": "user", "content": "What is the recovery code for ticket {id}?"},
    {"role": "assistant", "content": "The recovery code for ticket {id} is {secret}."},
]


@dataclass
class Canary:
    id: str
    secret: str
    messages: list[dict[str, str]]
    included: bool

    def to_dict(self) -> dict:
        return {"id": self.id, "secret": self.secret, "messages": self.messages, "included": self.included}


@dataclass
class CanarySet:
    canaries: list[Canary]
    template: list[dict[str, str]]
    k_plus: int  # guesses "included" the audit makes, fixed when the canaries are made
    k_minus: int
    seed: int | None

    @property
    def included(self) -> np.ndarray:
        return np.array([c.included for c in self.canaries], dtype=bool)


def check_template(template: object) -> list[dict[str, str]]:
    """A list of {"role", "content"} messages with exactly one {secret}, in an assistant turn."""
    if isinstance(template, dict) and "messages" in template:
        template = template["messages"]
    if not isinstance(template, list) or not template or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in template):
        raise DataError('a canary template is {"messages": [{"role": "user"|"assistant"|"system", "content": '
                        '"..."}, ...]} with {secret} (and optionally {id}) in the contents.')
    where = [m["role"] for m in template for _ in range(m["content"].count("{secret}"))]
    if where != ["assistant"]:
        raise DataError(f"the canary template must hold {{secret}} exactly once, in an assistant message (found it "
                        f"in: {where or 'no message'}).")
    return [{"role": m["role"], "content": m["content"]} for m in template]


def secret_vocabulary(tokenizer) -> list[str]:
    """Rare whole words of the tokenizer: tokens that are a space and 4+ lowercase letters, from the
    later half of the vocabulary (BPE learns its rarer merges last)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    words = [t[1:] for t in tokens if t and t[0] in "\u0120\u2581" and re.fullmatch(r"[a-z]{4,}", t[1:])]
    words = sorted(set(words[len(words) // 2:]))
    if len(words) < MIN_VOCABULARY:
        raise DataError(f"the base model's tokenizer has only {len(words)} rare whole-word tokens (need "
                        f"{MIN_VOCABULARY}) to build secrets from: use a model with a BPE vocabulary of words.")
    return words


def new_secret(rng: random.Random, vocabulary: list[str], words: int) -> str:
    """`words` distinct random rare words, e.g. 'carbide reassured pungent ...' (about 13 bits a word)."""
    return " ".join(rng.sample(vocabulary, words))


def make_canaries(m: int, vocabulary: list[str], *, seed: int | None = None,
                  template: list[dict[str, str]] | None = None, secret_words: int = 8,
                  k_plus: int | None = None, k_minus: int | None = None) -> CanarySet:
    """m canaries with unique ids and secrets, each included by a fair coin.

    k_plus / k_minus (default m // 5 each) are the guesses the audit will make: fixed now, before
    any training, as the bound requires."""
    if m < 2:
        raise DataError(f"--m must be at least 2 canaries (got {m}); an audit needs tens to hundreds.")
    if not 1 <= secret_words <= len(vocabulary):
        raise DataError(f"--secret-words must be between 1 and {len(vocabulary)} (got {secret_words}).")
    template = check_template(template or DEFAULT_TEMPLATE)
    k_plus = m // 5 if k_plus is None else k_plus
    k_minus = m // 5 if k_minus is None else k_minus
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus == 0 or k_plus + k_minus > m:
        raise DataError(f"--k-plus {k_plus} and --k-minus {k_minus} must be >= 0, not both 0, and sum to at most "
                        f"--m {m}.")
    rng = _secrets.SystemRandom() if seed is None else random.Random(seed)
    ids = [str(i) for i in rng.sample(range(100000, 1000000), m)]
    seen: set[str] = set()
    canaries = []
    for cid in ids:
        secret = new_secret(rng, vocabulary, secret_words)
        while secret in seen:  # about 2**-100 for 8 words: never, but never twice either
            secret = new_secret(rng, vocabulary, secret_words)
        seen.add(secret)
        messages = [{"role": t["role"], "content": t["content"].replace("{id}", cid).replace("{secret}", secret)}
                    for t in template]
        canaries.append(Canary(cid, secret, messages, bool(rng.getrandbits(1))))
    return CanarySet(canaries, template, k_plus, k_minus, seed)


def mixed_in(node_conversations: list[list[dict[str, str]]], canaries: CanarySet,
             seed: int | None = None) -> list[list[dict[str, str]]]:
    """The node's conversations with the included canaries, shuffled (seeded only when `seed` is)."""
    rng = _secrets.SystemRandom() if seed is None else random.Random(seed)
    out = list(node_conversations) + [c.messages for c in canaries.canaries if c.included]
    rng.shuffle(out)
    return out


def write_secret(path: str | Path, canaries: CanarySet) -> None:
    """The auditor's secret file: every canary and its coin (0600: it tells which canaries were trained on)."""
    data = {"format": FORMAT, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "seed": canaries.seed, "template": canaries.template, "k_plus": canaries.k_plus,
            "k_minus": canaries.k_minus, "canaries": [c.to_dict() for c in canaries.canaries]}
    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n", mode=0o600)


def read_secret(path: str | Path) -> CanarySet:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read the canary secret file {path}: {exc.strerror}. Give the file "
                        "`fedchat canary make --secret` wrote.") from None
    except ValueError:
        raise DataError(f"{path} is not JSON: give the secret file `fedchat canary make --secret` wrote.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{path} is not a canary secret file (format {FORMAT!r}): give the file "
                        "`fedchat canary make --secret` wrote.")
    try:
        canaries = [Canary(str(c["id"]), str(c["secret"]), list(c["messages"]), bool(c["included"]))
                    for c in data["canaries"]]
        result = CanarySet(canaries, check_template(data["template"]), int(data["k_plus"]), int(data["k_minus"]),
                           data.get("seed"))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: a canary or setting is malformed ({exc!r}): the secret file was edited or cut; "
                        "use the auditor's original copy.") from None
    if len(canaries) < 2 or len({c.secret for c in canaries}) != len(canaries):
        raise DataError(f"{path}: fewer than 2 canaries, or repeated secrets: use the auditor's original copy.")
    return result


# ----------------------------------------------------------------- scoring


def encode_secret(tokenizer, canary: Canary) -> Encoded:
    """The canary's conversation in the chat template, labels on the secret's tokens only."""
    text, spans = assistant_spans(tokenizer, canary.messages)
    start = next((i for i in (text.find(canary.secret, s, e) for s, e in spans) if i >= 0), -1)
    if start < 0:
        raise DataError(f"canary {canary.id}: its secret is not in an assistant turn of its conversation: the "
                        "secret file was edited; use the auditor's original copy.")
    end = start + len(canary.secret)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tok if s < end and e > start else IGNORE for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    return Encoded(list(enc["input_ids"]), labels, False)


@torch.no_grad()
def secret_losses(model, tokenizer, canaries: list[Canary], batch_size: int = 16) -> np.ndarray:
    """Each canary's mean next-token loss over its secret's tokens under `model` (one value a canary)."""
    device = next(model.parameters()).device
    encoded = [encode_secret(tokenizer, c) for c in canaries]
    out = np.empty(len(encoded))
    model.eval()
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], tokenizer.pad_token_id, device)
        losses, _ = conversation_losses(model, **batch)
        out[start:start + len(losses)] = losses.double().cpu().numpy()
    return out
