"""What the coordinator sends a node with each training instruction.

The fit config is the run config (hyphenated keys) plus a few ``fedchat-`` keys:
the round, the run's stable identifier, and the fingerprint of the frozen LoRA A
(FFA-LoRA) that nodes check they derived identically.
"""

from __future__ import annotations

from shared.config import RunConfig

META_ROUND = "fedchat-round"
META_RUN = "fedchat-run"
META_FROZEN_A = "fedchat-frozen-a"


def fit_config(cfg: RunConfig, rnd: int, run: str, frozen_a: str) -> dict:
    return {**cfg.to_flower(), META_ROUND: rnd, META_RUN: run, META_FROZEN_A: frozen_a}


def split_fit_config(config: dict) -> tuple[RunConfig, dict]:
    meta = {k: v for k, v in config.items() if k.startswith("fedchat-")}
    cfg = RunConfig.from_flower({k: v for k, v in config.items() if not k.startswith("fedchat-")})
    return cfg, meta
