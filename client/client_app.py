"""The node's ClientApp: train the adapter on local data, reply with the update only.

What leaves the node each round: the adapter update and its weight, the number of training
conversations capped at secagg-max-weight (both masked by the secure sum, client/secagg_mod.py, when
the coordinator runs it: it learns only their sums), and these metrics: node
name, status, the fingerprint of its ledger key, cumulative epsilon and budget, and the
head of its privacy ledger. Never a record, never a per-conversation value, and under
DP no statistic of the data (train loss, timings): those stay in the node's log.
A refused or failed round sends back only a `client.policy.RoundRefused` message.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from client.ledger_registry import LedgerRegistry
from client.policy import RoundRefused, check_run, refusal
from client.privacy import DistributedPlan, fits_budget, plan_distributed_round, plan_round, round_can_fit
from client.secagg_mod import PLAN, SECAGG_FLAG, secure_aggregation
from shared import ledger
from shared.config import NodeConfig, RunConfig, org_name
from shared.crypto import key_fingerprint
from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.protocol import (
    CAN_TRAIN,
    META_FROZEN_A,
    META_LEDGER_ENTRIES,
    META_LEDGER_HEAD,
    META_LEDGER_KEY,
    META_ROUND,
    META_RUN,
    split_fit_config,
)
from shared.roster import load_roster
from shared.seeds import derive_seed

if TYPE_CHECKING:
    from client.data import LocalData

# torch, transformers, peft and Opacus are imported where they are used: three of the four ClientApp
# processes of a secure-sum round (all stages but collect) never train, and start without them.
log = logging.getLogger("fedchat.node")
SIM_KEYS = ("partition-id", "num-partitions")  # what Flower's simulation puts in node_config


def resolve_node_config(context: Context, sim_nodes: dict[int, dict] | None,
                        partition: int | None) -> NodeConfig:
    """Node settings: Flower's node_config, over the simulation's per-partition defaults.

    A virtual node of `flwr run .` (simulation) has only a partition id; it gets its data
    and state folders from the run's sim-data-dir in fit() (see `for_partition`).
    """
    given = {k: v for k, v in context.node_config.items() if k not in SIM_KEYS}
    defaults: dict = {}
    if sim_nodes is not None and partition is not None:
        defaults = sim_nodes.get(partition, {})
    node = NodeConfig.from_flower({**defaults, **given})
    if partition is None or node.data_path:
        _require_paths(node)
    return node


def _require_paths(node: NodeConfig) -> None:
    if not node.data_path:
        raise ConfigError("node config 'data-path' is required: the node's dialogue JSONL file "
                          "(flower-supernode --node-config \"data-path='...' state-dir='...'\").")
    if not node.state_dir:
        raise ConfigError("node config 'state-dir' is required: where the node keeps its privacy ledger and key.")


def for_partition(node: NodeConfig, partition: int | None, cfg: RunConfig) -> NodeConfig:
    """Settings of a virtual node that has only a partition id (`flwr run .` simulation); a
    node with its own data-path (every deployed node) keeps its settings."""
    if not node.data_path:  # resolve_node_config requires it where there is no partition id
        if not cfg.sim_data_dir:
            raise ConfigError("a simulated node has no data-path: set the run config 'sim-data-dir' to a folder "
                              "of org-1.jsonl, org-2.jsonl, ... (`fedchat data demo --out DIR` writes one).")
        name = org_name(partition + 1)
        node = node.replace(data_path=str(Path(cfg.sim_data_dir) / f"{name}.jsonl"),
                            state_dir=node.state_dir or str(Path(cfg.out_dir).absolute() / "nodes" / name),
                            node_name=node.node_name or name,
                            ledger_registry=node.ledger_registry or str(Path(cfg.out_dir).absolute()
                                                                        / "ledger-registry"),
                            identity_key=node.identity_key or str(Path(cfg.sim_data_dir) / "keys" / f"{name}.pem"))
        if not node.roster:  # the simulation's roster (`fedchat data demo` writes it): one operator runs every node
            roster = Path(cfg.sim_data_dir) / "roster.json"
            node = node.replace(roster=str(roster), roster_sha256=load_roster(roster).sha256 if roster.exists() else "")
    return _with_name(node)


def _with_name(node: NodeConfig) -> NodeConfig:
    if not node.node_name:
        node = node.replace(node_name=Path(node.state_dir).resolve().name)
    return node


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    names: list[str]
    frozen_a: str


class NodeCache:
    """Heavy objects kept for the life of the process (a SuperNode's ClientApp process
    or a simulation actor serves many rounds)."""

    models: dict[tuple, _Loaded] = {}
    data: dict[tuple, LocalData] = {}

    @classmethod
    def model(cls, cfg: RunConfig, node: NodeConfig) -> _Loaded:
        from shared.adapter import attach_adapter, exchanged_names, frozen_a_fingerprint
        from shared.model import load_model, load_tokenizer, resolve_base_model, select_device, select_dtype

        base = resolve_base_model(cfg.base_model)
        device = select_device(node.device)
        dtype = select_dtype(node.dtype, device)
        key = (str(base), str(device), str(dtype), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
               cfg.lora_target_modules, cfg.aggregation, cfg.seed)
        if key not in cls.models:
            cls.models.clear()  # one model per process: a new run config replaces the old
            model = attach_adapter(load_model(base, device, dtype), cfg)
            cls.models[key] = _Loaded(model, load_tokenizer(base), exchanged_names(model, cfg.aggregation),
                                      frozen_a_fingerprint(model))
        return cls.models[key]

    @classmethod
    def local_data(cls, cfg: RunConfig, node: NodeConfig, tokenizer) -> LocalData:
        from client.data import load_local_data

        path = Path(node.data_path)
        stat = path.stat() if path.exists() else None
        key = (str(path), stat and (stat.st_mtime_ns, stat.st_size), tokenizer.name_or_path,
               cfg.max_seq_len, node.validation_fraction, node.skip_bad_lines)
        if key not in cls.data:
            cls.data[key] = load_local_data(str(path), tokenizer, max_len=cfg.max_seq_len,
                                            validation_fraction=node.validation_fraction, seed=0,
                                            skip_bad_lines=node.skip_bad_lines)
        return cls.data[key]


class FedchatClient(NumPyClient):
    def __init__(self, node: NodeConfig, secagg_active: bool, partition: int | None = None,
                 distributed: dict | None = None):
        self.node = node
        self.secagg_active = secagg_active
        self.partition = partition
        self.distributed = distributed  # this round's distributed-DP plan, from the secure sum's mod (node state)

    def get_properties(self, config):
        """The coordinator's question before a round: can this node train it? One bit, from the node's
        own budget guard (read-only); any other failure goes back as a RoundRefused, like fit()'s."""
        try:
            cfg, meta = split_fit_config(config)
            node = for_partition(self.node, self.partition, cfg)
            return {CAN_TRAIN: budget_allows_round(node, cfg, int(meta[META_ROUND]), str(meta[META_RUN]))}
        except Exception as exc:
            raise refusal(self.node.node_name or f"partition {self.partition}", exc) from None

    def fit(self, parameters, config):
        try:
            return self._fit(parameters, config)
        except Exception as exc:  # what reaches the coordinator: no path, no value of the node's data
            raise refusal(self.node.node_name or f"partition {self.partition}", exc) from None

    def _fit(self, parameters, config):
        from client.train import secure_seed, train_round
        from shared.adapter import set_arrays
        from shared.model import heldout_loss

        cfg, meta = split_fit_config(config)
        node = for_partition(self.node, self.partition, cfg)
        check_run(cfg, node)  # allow-list and caps, before the node opens any file the run names
        rnd, run = int(meta[META_ROUND]), str(meta[META_RUN])
        if node.require_dp and not cfg.dp:
            raise RoundRefused(f"node {node.node_name} requires DP (require-dp=true); the coordinator asked for a "
                               "non-private round, refused.")
        if node.require_secagg and not self.secagg_active:
            raise RoundRefused(f"node {node.node_name} requires secure aggregation (require-secagg=true); the "
                               "coordinator asked for a plaintext update, refused.")
        loaded = NodeCache.model(cfg, node)
        if cfg.aggregation == "ffa" and meta.get(META_FROZEN_A) != loaded.frozen_a:
            raise ConfigError("this node's frozen LoRA A differs from the coordinator's: the same seed gave other "
                              "values (different peft/torch version?). Install the versions the coordinator uses.")
        set_arrays(loaded.model, loaded.names, parameters)
        data = NodeCache.local_data(cfg, node, loaded.tokenizer)
        n = len(data.train)
        ledger_path = Path(node.state_dir) / "ledger.jsonl"
        key = ledger.signing_key_for(ledger_path, node.ledger_key or Path(node.state_dir) / "ledger-key.pem")
        metrics = {"node": node.node_name, "status": "ok", "ledger-key": key_fingerprint(key.public_key())}
        if not self.secagg_active:  # under the secure sum the count travels masked, as the update's weight
            metrics["num-conversations"] = n
        # From planning to append the node holds its ledger's lock: no second run can spend the same budget.
        recorded = _recorded_head(meta, key_fingerprint(key.public_key()))
        with ledger.open_for_training(ledger_path, key, recorded, must_exist=True) as book:
            # the one ledger of these conversations on this host, not behind what the node's registry recorded
            claim = LedgerRegistry.of(node.ledger_registry).claim(node.data_path, book, metrics["ledger-key"],
                                                                  first_contact=recorded is None)
            plan = None
            if cfg.dp and cfg.dp_mode == "distributed":
                plan, update, result = self._distributed_step(cfg, node, book.entries, loaded, data)
            elif cfg.dp:
                plan = plan_round(book.entries, run, target_epsilon=node.target_epsilon, delta=node.target_delta,
                                  num_conversations=n, batch_size=cfg.batch_size, local_steps=cfg.local_steps,
                                  rounds_left=cfg.num_rounds - rnd + 1, accountant=cfg.dp_accountant)
                if not fits_budget(plan, node.target_epsilon):
                    raise RoundRefused(f"node {node.node_name}: this round would bring epsilon from "
                                       f"{plan.epsilon_before:.3f} past its budget {node.target_epsilon:g}; it does "
                                       "not train.")
            if not isinstance(plan, DistributedPlan):
                seed = secure_seed() if cfg.dp else derive_seed(cfg.seed, node.node_name, rnd)
                result = train_round(loaded.model, loaded.names, data.train, cfg,
                                     pad_id=loaded.tokenizer.pad_token_id, seed=seed,
                                     noise_multiplier=plan.noise_multiplier if plan else None)
                update = result.delta
            if self.secagg_active and not isinstance(plan, DistributedPlan):  # the quantiser clips silently
                bound = cfg.update_bound
                if plan is not None:  # a function of the DP-noised update (post-processing): it may leave
                    metrics["clipped-values"] = int(sum(int((np.abs(u) > bound).sum()) for u in update))
                # float64: the secure sum quantises to 2**30 levels, finer than float32 can resolve.
                update = [np.clip(u, -bound, bound).astype(np.float64) for u in update]
            entry = book.append({**_ledger_entry(node, cfg, run, rnd, n, plan, update),
                                 "first_contact": recorded is None})
            claim.update(book)
            head, count = book.head()
        metrics.update({"ledger-head": head, "ledger-entries": count})
        if isinstance(plan, DistributedPlan):
            metrics.update({"epsilon": entry["epsilon"], "local-epsilon": entry["local_epsilon"],
                            "target-epsilon": node.target_epsilon, "delta": node.target_delta,
                            "noise-multiplier": entry["noise_multiplier"]})
        elif plan is not None:
            metrics.update({"epsilon": entry["epsilon"], "target-epsilon": node.target_epsilon,
                            "delta": node.target_delta, "noise-multiplier": plan.noise_multiplier})
        elif not self.secagg_active:  # neither DP nor the secure sum promised: the coordinator may see how it went
            metrics.update({"train-loss": result.train_loss, "seconds": result.seconds})
        # Statistics of the private data (loss, timings) stay on the node under DP: logged here only.
        if data.validation:
            val = heldout_loss(loaded.model, data.validation[:50], loaded.tokenizer.pad_token_id)
            log.info("node %s round %d: local validation loss %.4f (kept on the node)", node.node_name, rnd, val)
        log.info("node %s round %d: trained %d steps in %.1fs, train loss %.4f%s", node.node_name, rnd,
                 result.steps, result.seconds, result.train_loss,
                 f", epsilon {plan.epsilon_after:.3f}/{node.target_epsilon:g}" if plan else ", no DP")
        return update, min(n, cfg.secagg_max_weight), metrics

    def _distributed_step(self, cfg: RunConfig, node: NodeConfig, entries: list[dict], loaded, data):
        """Distributed DP: the round's plan (made when the node advertised its noise share) checked again under
        the ledger lock, then the clipped gradient sum of one Poisson sample, in the secure sum's integer units,
        rounded at random, plus this node's Skellam share: the integers the secure sum adds up."""
        from client.train import TrainResult, clipped_gradient_sum, dp_streams, secure_seed
        from shared.accounting import ledger_epsilons, randomized_round, skellam_noise

        if self.distributed is None or not self.secagg_active:
            raise RoundRefused(f"node {node.node_name}: distributed DP runs only inside the secure sum, with the "
                               "noise share this node announced; refused.")
        fields = dict(self.distributed)
        scale = fields.pop("scale")
        fields.pop("need", None)
        plan = DistributedPlan(**fields)
        dist, local = ledger_epsilons(entries + [{**plan.ledger_fields(), "steps": 1}], node.target_delta,
                                      cfg.dp_accountant)
        if dist > node.target_epsilon * (1 + 1e-9) or local > node.local_epsilon_cap * (1 + 1e-9):
            raise RoundRefused(f"node {node.node_name}: this round would bring epsilon to {dist:.3f} (budget "
                               f"{node.target_epsilon:g}) or its local epsilon to {local:.3f} (cap "
                               f"{node.local_epsilon_cap:g}); it does not train.")
        plan = DistributedPlan(**{**fields, "epsilon_after": dist, "local_after": local})
        started = time.perf_counter()
        sampling, noise = dp_streams(secure_seed())
        sums, drawn = clipped_gradient_sum(loaded.model, loaded.names, data.train, cfg,
                                           pad_id=loaded.tokenizer.pad_token_id, sampling=sampling)
        units = scale / cfg.dp_max_grad_norm
        update = [randomized_round(s * units, noise) + skellam_noise(plan.share, s.size, noise).reshape(s.shape)
                  for s in sums]
        return plan, update, TrainResult([], math.nan, 1, drawn, time.perf_counter() - started)


def _recorded_head(meta: dict, fingerprint: str) -> tuple[int, str] | None:
    """The ledger head the coordinator last saw from this node's ledger key (None when it has none: the
    node's first contact with this federation, or a head recorded for another key of this node id)."""
    same_key = meta.get(META_LEDGER_KEY, fingerprint) == fingerprint  # no key given: an older coordinator
    if META_LEDGER_ENTRIES in meta and META_LEDGER_HEAD in meta and same_key:
        return int(meta[META_LEDGER_ENTRIES]), str(meta[META_LEDGER_HEAD])
    if META_LEDGER_KEY in meta:
        log.warning("the coordinator last saw this node id sign with ledger key %s..., not with this state dir's "
                    "key %s...: the round is a first contact for this key", str(meta[META_LEDGER_KEY])[:16],
                    fingerprint[:16])
    return None


def _ledger_entry(node: NodeConfig, cfg: RunConfig, run: str, rnd: int, n: int, plan, update) -> dict:
    """The round's ledger line; a round without DP is recorded too, with noise 0 (infinite epsilon)."""
    from shared.adapter import fingerprint

    entry = {"node": node.node_name, "run": run, "round": rnd,
             "time": datetime.now(UTC).isoformat(timespec="seconds"), "num_examples": n,
             "max_grad_norm": cfg.dp_max_grad_norm, "delta": node.target_delta, "accountant": cfg.dp_accountant,
             "target_epsilon": node.target_epsilon, "update_sha256": fingerprint(update)}
    if plan is None:
        return {**entry, **ledger.no_dp_fields(min(1.0, cfg.batch_size / n), cfg.local_steps)}
    if isinstance(plan, DistributedPlan):
        return {**entry, **plan.ledger_fields()}
    return {**entry, "sample_rate": plan.sample_rate, "noise_multiplier": plan.noise_multiplier,
            "steps": plan.steps, "epsilon": plan.epsilon_after}


def budget_allows_round(node: NodeConfig, cfg: RunConfig, rnd: int, run: str) -> bool:
    """Whether the node's budget guard lets it train round `rnd` of `run`: fit()'s answer over the node's
    ledger (client.privacy.round_can_fit), read only (nothing is written or reserved; fit() decides again
    under the lock)."""
    from client.data import count_training_conversations

    check_run(cfg, node)  # before the node opens any file the run names
    if (node.require_dp and not cfg.dp) or (node.require_secagg and not cfg.secagg):
        return False  # fit() would refuse: say so now, before key sharing
    if not cfg.dp:
        return True
    conversations = count_training_conversations(node.data_path, validation_fraction=node.validation_fraction,
                                                 skip_bad_lines=node.skip_bad_lines)
    path = Path(node.state_dir) / "ledger.jsonl"
    key = ledger.signing_key_for(path, node.ledger_key or Path(node.state_dir) / "ledger-key.pem")
    lines = ledger.read_lines(path)
    LedgerRegistry.of(node.ledger_registry).check(node.data_path, path, lines, key_fingerprint(key.public_key()))
    return round_can_fit(ledger.verify_lines(path, lines, key.public_key()), run, target_epsilon=node.target_epsilon,
                         delta=node.target_delta, num_conversations=conversations, batch_size=cfg.batch_size,
                         local_steps=cfg.local_steps, rounds_left=cfg.num_rounds - rnd + 1,
                         accountant=cfg.dp_accountant)


def plan_distributed_share(node: NodeConfig, cfg: RunConfig, meta: dict, counted_shares: int,
                           scale: int) -> DistributedPlan:
    """The secure sum's planner (client.secagg_mod): this node's noise share for a distributed-DP round, from its
    own ledger (read only: training checks it again under the lock) and data size."""
    from shared.model import load_tokenizer, resolve_base_model

    check_run(cfg, node)
    if node.require_dp and not cfg.dp:
        raise RoundRefused(f"node {node.node_name} requires DP (require-dp=true); refused.")
    loaded = NodeCache.model(cfg, node)
    data = NodeCache.local_data(cfg, node, load_tokenizer(resolve_base_model(cfg.base_model)))
    path = Path(node.state_dir) / "ledger.jsonl"
    key = ledger.signing_key_for(path, node.ledger_key or Path(node.state_dir) / "ledger-key.pem")
    entries = ledger.verify_lines(path, ledger.read_lines(path), key.public_key())
    from shared.adapter import get_arrays

    values = sum(int(a.size) for a in get_arrays(loaded.model, loaded.names))
    plan = plan_distributed_round(entries, target_epsilon=node.target_epsilon, local_cap=node.local_epsilon_cap,
                                  delta=node.target_delta, num_conversations=len(data.train),
                                  batch_size=cfg.batch_size, rounds_left=cfg.num_rounds - int(meta[META_ROUND]) + 1,
                                  scale=scale, values=values, counted_shares=max(counted_shares, 1),
                                  accountant=cfg.dp_accountant)
    return plan


def make_client_app(sim_nodes: dict[int, dict] | None = None) -> ClientApp:
    """The ClientApp. `sim_nodes` gives per-partition node settings in simulation.

    Every training message passes `client.secagg_mod` first: the secure sum on the node's own terms (its
    approved roster, its colluder bound and minimum), and (require-secagg) never a plaintext update.
    """

    def node_config(context: Context) -> tuple[NodeConfig, int | None]:
        given = context.node_config.get("partition-id")
        partition = None if given is None else int(given)
        return resolve_node_config(context, sim_nodes, partition), partition

    def client_fn(context: Context):
        setup_logging(quiet_flower=True)
        node, partition = node_config(context)
        secagg_active = bool(context.state.config_records.get(SECAGG_FLAG, {}).get("active", False))
        plan = context.state.config_records.get(PLAN)
        return FedchatClient(node, secagg_active, partition, json.loads(plan["json"]) if plan else None).to_client()

    def protocol_node(context: Context, run: RunConfig | None) -> NodeConfig:
        node, partition = node_config(context)
        return for_partition(node, partition, run) if run is not None else node

    return ClientApp(client_fn=client_fn, mods=[secure_aggregation(protocol_node, plan_distributed_share)])


app = make_client_app()
