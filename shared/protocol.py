"""What the coordinator sends a node with each training instruction.

The fit config is the run config (hyphenated keys) plus a few ``fedchat-`` keys:
the round, the run's stable identifier, the fingerprint of the frozen LoRA A
(FFA-LoRA) that nodes check they derived identically, and the head of the node's own
privacy ledger as the coordinator last recorded it, in this run or an earlier one, with the
fingerprint of the key it is for (absent before the node's first reply with that key), so a node
can refuse to train from a ledger that was rolled back.

Before a round the coordinator asks each candidate node whether it can train it
(``get_properties`` with the same config); the answer holds one bit, ``CAN_TRAIN``.
"""

from __future__ import annotations

from shared.config import RunConfig

META_ROUND = "fedchat-round"
META_RUN = "fedchat-run"
META_FROZEN_A = "fedchat-frozen-a"
META_LEDGER_ENTRIES = "fedchat-ledger-entries"  # int: entries in the node's ledger at its last reply
META_LEDGER_HEAD = "fedchat-ledger-head"  # hex str: hash of its last ledger line then
META_LEDGER_KEY = "fedchat-ledger-key"  # hex str: fingerprint of the ledger key that head is for (when known)
CAN_TRAIN = "can-train"  # bool, the whole answer to the pre-round query


def fit_config(cfg: RunConfig, rnd: int, run: str, frozen_a: str, ledger_head: tuple | None = None) -> dict:
    """`ledger_head`: (entries, head hash[, ledger-key fingerprint]) of the node's ledger as the coordinator
    last recorded it."""
    config = {**cfg.to_flower(), META_ROUND: rnd, META_RUN: run, META_FROZEN_A: frozen_a}
    if ledger_head is not None:
        config.update({META_LEDGER_ENTRIES: int(ledger_head[0]), META_LEDGER_HEAD: str(ledger_head[1])})
        if len(ledger_head) > 2 and ledger_head[2]:
            config[META_LEDGER_KEY] = str(ledger_head[2])
    return config


def split_fit_config(config: dict) -> tuple[RunConfig, dict]:
    meta = {k: v for k, v in config.items() if k.startswith("fedchat-")}
    cfg = RunConfig.from_flower({k: v for k, v in config.items() if not k.startswith("fedchat-")})
    return cfg, meta
