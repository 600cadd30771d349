"""What a node accepts from the coordinator, and what it says back when it refuses.

The run config arrives with every training instruction from a coordinator the node does
not trust. Before the node touches its disk it checks the run against its operator's
node config: the base model must be on the allow-list (so a run cannot name a local path
to probe the node's disk through error messages), and steps, batch, sequence length,
micro-batch tokens and LoRA rank must stay under the operator's caps.

What goes back when a round fails is a `RoundRefused` message that carries no local path
and no value derived from the node's data; the details stay in the node's log under an
error id that the message names, so the two can be matched.
"""

from __future__ import annotations

import logging
import os
import uuid

from shared.config import NodeConfig, RunConfig
from shared.errors import FedchatError

log = logging.getLogger("fedchat.node")

# (run config field, node config cap, what the cap protects)
CAPS = (("local_steps", "max_local_steps", "compute per round"),
        ("batch_size", "max_batch_size", "compute per step"),
        ("max_seq_len", "max_seq_len", "memory"),
        ("micro_batch_tokens", "max_micro_batch_tokens", "memory"),
        ("lora_r", "max_lora_r", "memory and update size"))


class RoundRefused(FedchatError):
    """A node refuses a round; the message is safe to send to the coordinator."""


def _same_model(asked: str, allowed: str) -> bool:
    # Compared as written (no disk access): a refused name must not reveal whether such a path exists.
    return asked == allowed or os.path.normpath(asked) == os.path.normpath(allowed)


def check_run(cfg: RunConfig, node: NodeConfig) -> None:
    """Refuse a run config outside what the node's operator allows (before any file is opened)."""
    problems = []
    if not any(_same_model(cfg.base_model, allowed) for allowed in node.allowed_models):
        problems.append(f"base-model {cfg.base_model!r} is not in the node's allowed-base-models")
    for run_key, cap_key, why in CAPS:
        asked, cap = getattr(cfg, run_key), getattr(node, cap_key)
        if asked > cap:
            problems.append(f"{run_key.replace('_', '-')} = {asked} exceeds the node's cap "
                            f"{cap_key.replace('_', '-')} = {cap} ({why})")
    if problems:
        raise RoundRefused(f"node {node.node_name} refuses this run: {'; '.join(problems)}. Its operator can change "
                           "the node config if the run is legitimate.")


def refusal(node_name: str, exc: BaseException) -> RoundRefused:
    """What the coordinator may see of a failure: a RoundRefused as it is, anything else as its
    kind and an error id (the message, which may hold paths or data, is logged here only)."""
    if isinstance(exc, RoundRefused):
        log.warning("%s", exc)
        return exc
    error_id = uuid.uuid4().hex[:8]
    log.error("node %s: the round failed (error %s): %s", node_name, error_id, exc, exc_info=exc)
    kind = type(exc).__name__ if isinstance(exc, FedchatError) else "internal error"
    if isinstance(exc, OSError) and exc.strerror:  # the system's words for it (a full disk...), never its path
        kind = f"{exc.strerror}: its state dir or data could not be read or written"
    return RoundRefused(f"node {node_name}: the round failed on the node ({kind}, error {error_id}); the node's "
                        "operator finds the details under that error id in the node's log.")
