"""A coordinator that cheats at secure aggregation, run through Flower's simulation engine.

A federation of `Attack.nodes` virtual SuperNodes (real messages, Flower's in-memory SuperLink, Ray actors),
each of which returns a KNOWN update: `true_update(partition)`, values on the quantisation grid within the
clipping range, so that the quantised update a node masks is exact (`quantised(...)`) and a recovered vector
can be compared value by value. The nodes listed in `Attack.colluders` hand the attacker everything they hold:
after every message their ClientApp writes its whole context state (the secure aggregation protocol's secret
keys, seeds and received shares) and its own update to a file in `leak_dir` (Ray actors are other processes).

The ServerApp is the adversary: it first asks every node which partition it is (a QUERY message outside the
protocol, so that an attack can name its victim), then runs the protocol's coordinator on a `TamperingGrid`,
which hands every outgoing batch of protocol messages to the attack before they are pushed (to rewrite,
filter or add to) and every batch of replies after they arrive, and keeps a `Transcript` of both. After the
run the attack computes its best recovery of the victim's update from the transcript and the colluders' leaks.

Protocols. An attack is a description (round size, threshold, victim, colluders) plus, per protocol, message
hooks and a recovery. `Protocol` says what the nodes run (their mods) and how the coordinator runs a round;
`STOCK` is Flower 1.41's `secaggplus_mod` with its `SecAggPlusWorkflow`. `FEDCHAT` is fedchat's own secure sum:
every node runs the real `client.secagg_mod` mod with its own identity key and an approved roster (made per run by
`fedchat.federation.simulation.provision_roster`, colluder bound = the attack's colluders), and the coordinator runs
`server.secagg_workflow.SecureAggregation` modified as a cheating ServerApp would be (`AdversaryCoordinator`: it never
halts a round by its own rules, so only a node's refusal can stop it). An attack gets a `run_<protocol>()` beside
`run_stock()` that calls `run_attack(self, PROTOCOL, leak_dir, hooks)` with hooks written for that protocol's
messages; against fedchat a test asserts on the transcript (the nodes' refusals in `Transcript.errors`, the
shares of the victim's secrets that reached the attacker: `victim_shares`) and on the attacker's best recovery
with everything the colluders leaked (`fedchat_recover`), which must not be the victim's update.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from client.secagg_mod import STATE as FEDCHAT_STATE
from client.secagg_mod import secure_aggregation
from server.secagg_workflow import SecureAggregation
from shared import masking
from shared import secagg_wire as wire
from shared.config import NodeConfig, RunConfig
from shared.crypto import load_identity_key, sign
from shared.roster import Roster, load_roster
from shared.secagg_rules import derive_parameters
from tests.support.secagg_federation import RecordingStrategy

# ------------------------------------------------------------------ the federation's updates

SHAPES = [(1, 40), (8, 20)]  # 200 values a node
CLIPPING_RANGE = 1.0
QUANTIZATION_RANGE = 2**16
MODULUS_RANGE = 2**32
STEP = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE  # one quantisation step
WEIGHT = 100  # every node's num_examples, and the coordinator's max_weight: the weighting ratio is exactly 1
STAGE_TIMEOUT = 120.0  # seconds the coordinator waits for each stage's replies
IDENTIFY = "attack-identify"


def true_update(partition: int) -> list[np.ndarray]:
    """What node `partition` sends: float64 values on the quantisation grid, within half the clipping range."""
    rng = np.random.default_rng([7, partition])
    half = QUANTIZATION_RANGE // 4
    return [rng.integers(-half, half + 1, size=s).astype(np.float64) * STEP for s in SHAPES]


def quantised(update: list[np.ndarray]) -> list[np.ndarray]:
    """The stock mod's quantisation of `update` (exact: grid values round to themselves)."""
    return [np.rint((u + CLIPPING_RANGE) / STEP).astype(np.int64) for u in update]


def dequantised(values: list[np.ndarray]) -> list[np.ndarray]:
    return [v.astype(np.float64) * STEP - CLIPPING_RANGE for v in values]


# ------------------------------------------------------------------ protocols

class Protocol:
    """A secure aggregation protocol under attack: what every node runs, how its messages name their stage
    and carry their values, and how its coordinator runs a round."""

    name: str
    node_mods: tuple  # the ClientApp mods every node runs (innermost last)

    def configs(self, message: Message) -> dict[str, Any] | None:
        """The protocol values a message carries (a plain copy), or None for a message outside the protocol."""
        raise NotImplementedError

    def stage(self, configs: dict[str, Any]) -> str | None:
        """The stage named by a request's values (None in a reply that does not name it)."""
        raise NotImplementedError

    def run_round(self, grid, context: Context, attack: Attack, transcript: Transcript) -> None:
        """Run one round of the protocol's coordinator over `grid` (a TamperingGrid), filling
        `transcript.aggregate` with what the round produced, if it produced anything."""
        raise NotImplementedError

    def for_run(self, attack: Attack, folder: Path) -> Protocol:
        """The protocol as one run of `attack` uses it (a protocol whose nodes need keys makes them in `folder`)."""
        return self


# ------------------------------------------------------------------ nodes


class KnownUpdateClient(NumPyClient):
    def __init__(self, partition: int) -> None:
        self.partition = partition

    def fit(self, parameters, config):
        return true_update(self.partition), WEIGHT, {"partition": self.partition}


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def leak_path(leak_dir: str | Path, partition: int) -> Path:
    return Path(leak_dir) / f"colluder-{partition}.pkl"


def make_client_app(colluders: frozenset[int], leak_dir: str, protocol: Protocol) -> ClientApp:
    """Nodes that run `protocol`'s mods around `KnownUpdateClient`; colluders leak their state after every
    message (one pickle a node: {"node_id", "partition", "update", "states": [(stage, state records)]})."""

    def client_fn(context: Context):
        return KnownUpdateClient(_partition(context)).to_client()

    def identify(msg: Message, ctxt: Context, call_next) -> Message:
        if msg.metadata.message_type == MessageType.QUERY and IDENTIFY in msg.content.config_records:
            return Message(RecordDict({IDENTIFY: ConfigRecord({"partition-id": _partition(ctxt)})}), reply_to=msg)
        return call_next(msg, ctxt)

    def collude(msg: Message, ctxt: Context, call_next) -> Message:
        configs = protocol.configs(msg)
        stage = (protocol.stage(configs) if configs else None) or msg.metadata.message_type
        reply = call_next(msg, ctxt)
        partition = _partition(ctxt)
        if partition in colluders:
            path = leak_path(leak_dir, partition)
            leak = pickle.loads(path.read_bytes()) if path.exists() else {
                "node_id": msg.metadata.dst_node_id, "partition": partition, "update": true_update(partition),
                "states": []}
            snapshot = {name: {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}
                        for name, record in ctxt.state.config_records.items()}
            leak["states"].append((stage, snapshot))
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(leak))
            tmp.replace(path)
        return reply

    return ClientApp(client_fn=client_fn, mods=[identify, collude, *protocol.node_mods])


# ------------------------------------------------------------------ what the coordinator sees


@dataclass
class Transcript:
    """Everything the coordinator sent (after tampering) and received, per protocol stage and node id."""

    leak_dir: Path
    node_ids: dict[int, int] = field(default_factory=dict)  # partition -> node id
    sent: dict[str, dict[int, dict]] = field(default_factory=dict)  # stage -> destination -> configs
    received: dict[str, dict[int, dict]] = field(default_factory=dict)  # stage -> source -> configs
    errors: dict[str, dict[int, str]] = field(default_factory=dict)  # stage -> source -> the node's error
    workflow_error: str | None = None  # what stopped the coordinator's workflow, if anything did
    halted_at: str | None = None  # the stage at which the coordinator's workflow gave up, if it did
    aggregate: list[np.ndarray] | None = None  # the global parameters after the round
    scratch: dict[str, Any] = field(default_factory=dict)  # the attack's own keys and notes
    protocol: Any = None  # the protocol as this run used it (fedchat's: its roster and the nodes' settings)

    def nid(self, partition: int) -> int:
        return self.node_ids[partition]

    def partition(self, node_id: int) -> int:
        return {v: k for k, v in self.node_ids.items()}[node_id]

    def leak(self, partition: int) -> dict:
        """A colluder's leak: its node id, own update and state snapshots."""
        return pickle.loads(leak_path(self.leak_dir, partition).read_bytes())

    def fedchat_states(self, partition: int) -> list[dict]:
        """A colluder's fedchat protocol state (the JSON under context state 'fedchat.secagg.state'), after each
        message it answered, oldest first."""
        return [json.loads(snapshot[FEDCHAT_STATE]["json"]) for _, snapshot in self.leak(partition)["states"]
                if FEDCHAT_STATE in snapshot]

    def colluder_state(self, partition: int, after: str) -> SecAggPlusState:
        """A colluder's stock SecAgg+ state as it was after stage `after`."""
        for stage, snapshot in self.leak(partition)["states"]:
            if stage == after:
                return SecAggPlusState(**snapshot[RECORD_KEY_STATE])
        raise LookupError(f"colluder {partition} left no state after stage {after!r}")


Hook = Callable[[str, list[Message], Transcript], list[Message]]


def _keep(stage: str, messages: list[Message], transcript: Transcript) -> list[Message]:
    return messages


@dataclass
class Hooks:
    """An attack's hands on the wire: each gets a stage's batch and returns the batch to go on with."""

    outgoing: Hook = _keep
    incoming: Hook = _keep


class TamperingGrid:
    """A Grid whose protocol messages pass through the attack's hooks and are recorded in the transcript."""

    def __init__(self, grid: Grid, protocol: Protocol, hooks: Hooks, transcript: Transcript) -> None:
        self._grid, self._protocol, self._hooks, self._transcript = grid, protocol, hooks, transcript

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages, configs = list(messages), self._protocol.configs
        stage = next((self._protocol.stage(c) for m in messages if (c := configs(m))), None)
        if stage is None:
            return self._grid.send_and_receive(messages, timeout=timeout)
        messages = self._hooks.outgoing(stage, messages, self._transcript)
        self._transcript.sent[stage] = {m.metadata.dst_node_id: configs(m) for m in messages}
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._transcript.received[stage] = {r.metadata.src_node_id: configs(r) for r in replies if not r.has_error()}
        self._transcript.errors[stage] = {r.metadata.src_node_id: str(r.error.reason)
                                          for r in replies if r.has_error()}
        return self._hooks.incoming(stage, replies, self._transcript)


def _identify(grid: Grid, nodes: int) -> dict[int, int]:
    deadline = time.monotonic() + STAGE_TIMEOUT
    while len(ids := list(grid.get_node_ids())) < nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(ids)} of {nodes} nodes registered")
        time.sleep(0.2)
    queries = [Message(RecordDict({IDENTIFY: ConfigRecord({})}), dst_node_id=nid, message_type=MessageType.QUERY)
               for nid in ids]
    replies = list(grid.send_and_receive(queries, timeout=STAGE_TIMEOUT))
    if len(replies) != nodes or any(r.has_error() for r in replies):
        raise RuntimeError(f"identification failed: {[str(r.error) for r in replies if r.has_error()]}")
    return {int(r.content.config_records[IDENTIFY]["partition-id"]): r.metadata.src_node_id for r in replies}


# ------------------------------------------------------------------ Flower's stock SecAgg+


class RecordingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's stock SecAgg+ coordinator, unchanged, whose exceptions end the round instead of the run."""

    def __init__(self, transcript: Transcript, **kwargs) -> None:
        super().__init__(**kwargs)
        self.transcript = transcript

    def __call__(self, grid, context) -> None:
        state = WorkflowState()
        for step in (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage, self.unmask_stage):
            try:
                if not step(grid, context, state):
                    self.transcript.halted_at = step.__name__
                    return
            except Exception as error:  # noqa: BLE001 - a tampered round may break the stock arithmetic
                self.transcript.workflow_error = f"{step.__name__}: {error!r}"
                return


class StockSecAggPlus(Protocol):
    """Flower 1.41's SecAgg+: `secaggplus_mod` on the nodes, `SecAggPlusWorkflow` (legacy fit) on the coordinator."""

    name = "flower-secagg+"
    node_mods = (secaggplus_mod,)

    def configs(self, message: Message) -> dict[str, Any] | None:
        if not message.has_content() or RECORD_KEY_CONFIGS not in message.content.config_records:
            return None
        return {k: (list(v) if isinstance(v, list) else v)
                for k, v in message.content.config_records[RECORD_KEY_CONFIGS].items()}

    def stage(self, configs: dict[str, Any]) -> str | None:
        return configs.get(Key.STAGE)

    def run_round(self, grid, context: Context, attack: Attack, transcript: Transcript) -> None:
        n = attack.nodes
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                          initial_parameters=ndarrays_to_parameters([np.zeros(s) for s in SHAPES]))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        workflow = RecordingSecAggPlusWorkflow(
            transcript, num_shares=attack.num_shares or n, reconstruction_threshold=attack.threshold,
            max_weight=float(WEIGHT), clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE,
            modulus_range=MODULUS_RANGE, timeout=STAGE_TIMEOUT)
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
        params = legacy.state.array_records[MAIN_PARAMS_RECORD]
        transcript.aggregate = parameters_to_ndarrays(arrayrecord_to_parameters(params, keep_input=True))


STOCK = StockSecAggPlus()


# ------------------------------------------------------------------ fedchat's own secure sum

# The run config every fedchat node derives the round's parameters from: clipping range 1 and a weight cap of
# WEIGHT (the weighting factor is exactly 1), as the stock round's; the modulus (2^32) and the quantisation
# levels follow from the round's size by rule.
FEDCHAT_RUN = RunConfig(secagg=True, secagg_clipping_range=CLIPPING_RANGE, secagg_max_weight=WEIGHT,
                        secagg_timeout=STAGE_TIMEOUT)


def member_name(partition: int) -> str:
    """The roster name of the node with this partition id."""
    return f"org-{partition + 1}"


class NodeSettings:
    """`client.secagg_mod`'s node settings: the provisioned config of the node's partition (its name, state folder,
    identity key and approved roster), whatever the run config says."""

    def __init__(self, configs: dict[int, dict]) -> None:
        self.configs = configs

    def __call__(self, context: Context, run: RunConfig | None) -> NodeConfig:
        return NodeConfig.from_flower(self.configs[_partition(context)])


class AdversaryCoordinator(SecureAggregation):
    """fedchat's coordinator workflow as a ServerApp running modified code would run it: it goes on with the
    round while any node is left, however few replied (the coordinator's own `_enough` is what an honest
    coordinator halts on; a cheating one does not), so what stops a round is a node's refusal."""

    def _enough(self, state, stage: str, needed: int) -> bool:
        return bool(state.active)


class FedchatSecAgg(Protocol):
    """fedchat's secure sum: the real `client.secagg_mod` mod on every node (an identity key each, one roster every
    node's operator approved: `fedchat.federation.simulation.provision_roster`), `AdversaryCoordinator` on the
    ServerApp."""

    name = "fedchat-secagg"
    node_mods = ()  # the nodes' mod needs their settings: `for_run` makes it

    def __init__(self, roster: Roster | None = None, configs: dict[int, dict] | None = None) -> None:
        self.roster, self.node_configs = roster, configs or {}
        if configs is not None:
            self.node_mods = (secure_aggregation(NodeSettings(configs)),)

    def for_run(self, attack: Attack, folder: Path) -> FedchatSecAgg:
        """A federation of the attack's nodes: an identity key each and one roster whose colluder bound is the
        attack's number of colluders (the bound fedchat's guarantees are stated under), approved by every node."""
        from fedchat.federation.simulation import provision_roster

        nodes = {p: {"node-name": member_name(p), "state-dir": str(folder / member_name(p))}
                 for p in range(attack.nodes)}
        path, configs = provision_roster(folder, nodes, len(attack.colluders))
        return FedchatSecAgg(load_roster(path), configs)

    def configs(self, message: Message) -> dict[str, Any] | None:
        if not message.has_content() or wire.RECORD not in message.content.config_records:
            return None
        return {k: (list(v) if isinstance(v, list) else v)
                for k, v in message.content.config_records[wire.RECORD].items()}

    def stage(self, configs: dict[str, Any]) -> str | None:
        return configs.get(wire.STAGE)

    def identity(self, partition: int) -> Ed25519PrivateKey:
        """A node's identity key (what a colluder hands the attacker)."""
        return load_identity_key(self.node_configs[partition]["identity-key"])

    def run_round(self, grid, context: Context, attack: Attack, transcript: Transcript) -> None:
        strategy = RecordingStrategy(FEDCHAT_RUN, sorted(transcript.node_ids.values()), SHAPES)
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy,
                               client_manager=SimpleClientManager())
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([np.zeros(s) for s in SHAPES]), True)
        workflow = AdversaryCoordinator(FEDCHAT_RUN, self.roster, SHAPES)
        try:
            workflow(grid, legacy)
        except Exception as error:  # noqa: BLE001 - a tampered round may break the coordinator's arithmetic
            transcript.workflow_error = repr(error)
        transcript.halted_at = workflow.last_parameters.get("halted_at")
        transcript.aggregate = strategy.mean


FEDCHAT = FedchatSecAgg()


# ------------------------------------------------------------------ running an attack


def run_attack(attack: Attack, protocol: Protocol, leak_dir: str | Path, hooks: Hooks) -> Transcript:
    """Run one round of `protocol` among `attack.nodes` simulated nodes, the coordinator being the attacker."""
    from flwr.simulation import run_simulation

    leak_dir = Path(leak_dir)
    leak_dir.mkdir(parents=True, exist_ok=True)
    protocol = protocol.for_run(attack, leak_dir.parent / f"{protocol.name}-federation")
    transcript = Transcript(leak_dir, protocol=protocol)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        transcript.node_ids = _identify(grid, attack.nodes)
        protocol.run_round(TamperingGrid(grid, protocol, hooks, transcript), context, attack, transcript)

    client = make_client_app(frozenset(attack.colluders), str(leak_dir), protocol)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "include_dashboard": False, "logging_level": "error",
                             "_node_ip_address": "127.0.0.1", "log_to_driver": True}}
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")
    run_simulation(server_app=server, client_app=client, num_supernodes=attack.nodes, backend_config=backend)
    if len(transcript.node_ids) != attack.nodes:
        raise RuntimeError("the attacker's ServerApp did not run to the end: see the log above")
    return transcript


# ------------------------------------------------------------------ the stock protocol's arithmetic


def upload(transcript: Transcript, node_id: int) -> list[np.ndarray]:
    """A node's masked upload as the coordinator received it (the weighting factor first)."""
    reply = transcript.received[Stage.COLLECT_MASKED_VECTORS][node_id]
    return [bytes_to_ndarray(b) for b in reply[Key.MASKED_PARAMETERS]]


def shown_keys(transcript: Transcript, node_id: int) -> dict[int, tuple[bytes, bytes]]:
    """The public keys (pk1, pk2) node `node_id` was sent at the share-keys stage, by node id."""
    sent = transcript.sent[Stage.SHARE_KEYS][node_id]
    return {int(k): (v[0], v[1]) for k, v in sent.items() if k != Key.STAGE}


def advertised_keys(transcript: Transcript, node_id: int) -> tuple[bytes, bytes]:
    """The public keys (pk1, pk2) node `node_id` advertised at setup."""
    reply = transcript.received[Stage.SETUP][node_id]
    return reply[Key.PUBLIC_KEY_1], reply[Key.PUBLIC_KEY_2]


def masked_with(transcript: Transcript, node_id: int) -> list[int]:
    """The peers a node added pairwise masks for: the sources of the key shares it was forwarded."""
    return list(transcript.sent[Stage.COLLECT_MASKED_VECTORS][node_id][Key.SOURCE_LIST])


def shared_secret(private_key: bytes, public_key: bytes) -> bytes:
    return generate_shared_key(bytes_to_private_key(private_key), bytes_to_public_key(public_key))


def key_pair() -> tuple[bytes, bytes]:
    private, public = generate_key_pairs()
    return private_key_to_bytes(private), public_key_to_bytes(public)


def remove_masks(masked: list[np.ndarray], node_id: int, self_seed: bytes, pair_seeds: dict[int, bytes],
                 mod_range: int = MODULUS_RANGE) -> list[np.ndarray]:
    """Undo `secaggplus_mod`'s masking of node `node_id`: its self mask from `self_seed`, and one pairwise mask
    per peer from the seed it shares with that peer (added where node_id > peer, subtracted otherwise)."""
    shapes = [a.shape for a in masked]
    out = [a.astype(np.int64) - m for a, m in zip(masked, pseudo_rand_gen(self_seed, mod_range, shapes))]
    for peer, seed in pair_seeds.items():
        mask = pseudo_rand_gen(seed, mod_range, shapes)
        out = [a - m if node_id > peer else a + m for a, m in zip(out, mask)]
    return [a % mod_range for a in out]


def split_share(plaintext: bytes) -> tuple[int, int, bytes, bytes]:
    """(source, destination, share of the self-mask seed, share of sk1) from a decrypted share message."""
    return share_keys_plaintext_separate(plaintext)


def forged_share(key: bytes, src: int, dst: int, seed_share: bytes, sk1_share: bytes) -> bytes:
    """A share message from `src` to `dst` as `secaggplus_mod` would encrypt it under `key`."""
    return encrypt(key, share_keys_plaintext_concat(src, dst, seed_share, sk1_share))


def open_share(key: bytes, ciphertext: bytes) -> tuple[int, int, bytes, bytes]:
    return split_share(decrypt(key, ciphertext))


def combine(shares: list[bytes]) -> bytes:
    """The secret from Shamir shares (a share seen twice counted once)."""
    return combine_shares(list(dict.fromkeys(shares)))


# ------------------------------------------------------------------ fedchat's arithmetic, as the attacker


def advertisement(t: Transcript, node_id: int) -> dict:
    """The advertisement node `node_id` signed at the advertise stage (its keys, seed commitment, parameters)."""
    return json.loads(t.received[wire.ADVERTISE][node_id][wire.STATEMENT])


def fedchat_threshold(t: Transcript, node_id: int) -> int:
    """The threshold a node derived itself and signed in its advertisement."""
    return advertisement(t, node_id)["parameters"]["threshold"]


def shown_advertisements(t: Transcript, node_id: int) -> dict[int, dict]:
    """The advertisements node `node_id` was sent at the share-keys stage, by the node id each names."""
    sent = t.sent.get(wire.SHARE_KEYS, {}).get(node_id, {})
    ads = [json.loads(blob) for blob in sent.get(wire.STATEMENTS, [])]
    return {ad["node"]: ad for ad in ads}


def _latest(states: list[dict], key: str):
    return next((state[key] for state in reversed(states) if key in state), None)


def victim_shares(attack: Attack, t: Transcript) -> dict[str, dict[str, dict[int, bytes]]]:
    """Every share of the victim's two secrets (SELF: its self-mask seed, PAIR: its mask key) the attacker holds,
    by where it came from ("honest": revealed by an honest node at unmask, "colluders": held by a colluder,
    "opened": sealed by the victim for a key the attacker holds), each by its Shamir point. Empty when the
    victim never shared its secrets (it refused before sealing them)."""
    v = t.nid(attack.victim)
    out = {kind: {"honest": {}, "colluders": {}, "opened": {}} for kind in (wire.SELF, wire.PAIR)}
    reply = t.received.get(wire.SHARE_KEYS, {}).get(v)
    if reply is None:
        return out
    ads = shown_advertisements(t, v)
    point = {node: i + 1 for i, node in enumerate(sorted(ads))}  # the victim's Shamir point of each peer
    allies = {t.nid(c) for c in attack.colluders}
    for holder, answer in t.received.get(wire.UNMASK, {}).items():
        for owner, kind, share in zip(answer[wire.OWNERS], answer[wire.KINDS], answer[wire.SHARES]):
            if owner == v and holder not in allies:
                out[kind]["honest"][point.get(holder, -holder)] = share
    for c in attack.colluders:
        received = _latest(t.fedchat_states(c), "received") or {}
        if str(v) in received:
            for kind in (wire.SELF, wire.PAIR):
                out[kind]["colluders"][point[t.nid(c)]] = bytes.fromhex(received[str(v)][kind])
    ctx = wire.context(*(advertisement(t, v)[k] for k in ("roster", "run", "round")))
    channel_key = bytes.fromhex(advertisement(t, v)["channel_key"])
    held = attack.fedchat_attacker_keys(t)
    for dst, blob in zip(reply[wire.DESTINATIONS], reply[wire.SEALED]):
        if dst in held:
            opened = masking.open_sealed(masking.agree(held[dst][0], channel_key), ctx + f":{v}->{dst}".encode(), blob)
            if opened is not None:
                for kind in (wire.SELF, wire.PAIR):
                    out[kind]["opened"][point[dst]] = bytes.fromhex(json.loads(opened)[kind])
    return out


def rebuilt_secrets(attack: Attack, t: Transcript) -> dict[str, bytes]:
    """The victim's secrets the attacker can rebuild from `victim_shares` (checked against what the victim
    advertised: its seed commitment, its mask public key), by kind."""
    v = t.nid(attack.victim)
    shares, out = victim_shares(attack, t), {}
    if v not in t.received.get(wire.ADVERTISE, {}):
        return out
    ad, threshold = advertisement(t, v), fedchat_threshold(t, v)
    ctx = wire.context(ad["roster"], ad["run"], ad["round"])
    for kind, by_source in shares.items():
        points = {x: share for source in by_source.values() for x, share in source.items()}
        if len(points) < threshold:
            continue
        try:
            secret = masking.combine_shares(dict(list(points.items())[:threshold]))
        except ValueError:
            continue
        if kind == wire.SELF and masking.commit(secret, masking.self_label(ctx, v)) == ad["seed_commitment"]:
            out[kind] = secret
        if kind == wire.PAIR and masking.public_of(secret).hex() == ad["mask_key"]:
            out[kind] = secret
    return out


def fedchat_recover(attack: Attack, t: Transcript) -> tuple[list[np.ndarray] | None, dict]:
    """The attacker's best recovery of the victim's update from its masked upload: the self mask removed when the
    seed was rebuilt, each pairwise mask removed when its secret is known (from the victim's rebuilt mask key, a
    colluder's leaked mask key, or a key the attacker substituted), then dequantised. (None, notes) when the
    victim uploaded nothing; notes name the masks that stayed on."""
    v = t.nid(attack.victim)
    reply = t.received.get(wire.COLLECT, {}).get(v)
    notes: dict[str, Any] = {"uploaded": reply is not None, "unknown_masks": []}
    if reply is None:
        return None, notes
    ad = advertisement(t, v)
    p = ad["parameters"]
    ctx = wire.context(ad["roster"], ad["run"], ad["round"])
    vector = np.frombuffer(reply[wire.MASKED], dtype="<u4").copy()
    secrets = rebuilt_secrets(attack, t)
    notes["rebuilt"] = sorted(secrets)
    if wire.SELF in secrets:
        vector -= masking.mask_stream(secrets[wire.SELF], masking.self_label(ctx, v), vector.size)
    else:
        notes["unknown_masks"].append("self")
    keys = {n: bytes.fromhex(a["mask_key"]) for n, a in shown_advertisements(t, v).items()}  # as the victim saw them
    leaked = {t.nid(c): _latest(t.fedchat_states(c), "mask_sk") for c in attack.colluders}
    held = attack.fedchat_attacker_keys(t)
    own_key = bytes.fromhex(ad["mask_key"])
    for peer in json.loads(reply[wire.STATEMENT])["view"]:
        if peer == v:
            continue
        if wire.PAIR in secrets:
            secret = masking.agree(secrets[wire.PAIR], keys[peer])
        elif leaked.get(peer):
            secret = masking.agree(bytes.fromhex(leaked[peer]), own_key)
        elif peer in held:
            secret = masking.agree(held[peer][1], own_key)
        else:
            notes["unknown_masks"].append(peer)
            continue
        stream = masking.mask_stream(secret, masking.pair_label(ctx, v, peer), vector.size)
        vector = vector - stream if masking.pair_sign(v, peer) > 0 else vector + stream
    values = masking.dequantise_sum(vector[1:], 1, p["clip"], p["levels"])  # the weighting factor is 1
    arrays, offset = [], 0
    for shape in SHAPES:
        size = int(np.prod(shape))
        arrays.append(values[offset:offset + size].reshape(shape))
        offset += size
    return arrays, notes


def fedchat_matches(recovered: list[np.ndarray] | None, partition: int) -> bool:
    """Whether a recovery is node `partition`'s update (to 1e-6: fedchat's quantisation step is ~4e-9)."""
    return recovered is not None and all(np.allclose(r, u, rtol=0, atol=1e-6)
                                         for r, u in zip(recovered, true_update(partition)))


def refusal(t: Transcript, stage: str, partition: int) -> str:
    """What node `partition` answered at `stage` when it refused ("" if it did not)."""
    return t.errors.get(stage, {}).get(t.nid(partition), "")


def replace_lists(record: ConfigRecord, keys: tuple[str, ...], keep) -> None:
    """Keep in the parallel lists `keys` of a message's record the entries whose first value passes `keep`."""
    rows = [row for row in zip(*(record[k] for k in keys)) if keep(row[0])]
    for i, k in enumerate(keys):
        record[k] = [row[i] for row in rows]


# ------------------------------------------------------------------ attacks


class Attack:
    """One attack: the round it needs (the class attributes, shared by every protocol), and per protocol the
    coordinator's message hooks and what it recovers.

    run_stock() runs it against Flower's stock secaggplus_mod with stock_outgoing/stock_incoming on the wire and
    returns (stock_recover(transcript), transcript). Against another protocol P the same description gets
    P_outgoing/P_incoming (the same tampering, written for P's messages: the same victim, colluders, dropped
    nodes, sybils or substituted keys) and a run_P() = run_attack(self, P, leak_dir, Hooks(...)) whose
    transcript a test checks for the nodes' refusals and for nothing of the victim's update released."""

    nodes = 3
    num_shares: int | None = None  # None: every node (all pairs)
    threshold = 2
    victim = 0
    colluders: frozenset[int] = frozenset()

    def __init__(self, **variant) -> None:
        """An attack with some of its class attributes changed (a variant of the same attack)."""
        for name, value in variant.items():
            if not hasattr(type(self), name):
                raise AttributeError(f"{type(self).__name__} has no attribute {name!r} to change")
            setattr(self, name, value)

    def stock_hooks(self) -> Hooks:
        return Hooks(self.stock_outgoing, self.stock_incoming)

    def stock_outgoing(self, stage: str, messages: list[Message], t: Transcript) -> list[Message]:
        return messages

    def stock_incoming(self, stage: str, replies: list[Message], t: Transcript) -> list[Message]:
        return replies

    def stock_recover(self, t: Transcript):
        raise NotImplementedError

    def run_stock(self, leak_dir: str | Path):
        """(recovery, transcript) against Flower's stock SecAgg+."""
        transcript = run_attack(self, STOCK, leak_dir, self.stock_hooks())
        return self.stock_recover(transcript), transcript

    def fedchat_outgoing(self, stage: str, messages: list[Message], t: Transcript) -> list[Message]:
        return messages

    def fedchat_incoming(self, stage: str, replies: list[Message], t: Transcript) -> list[Message]:
        return replies

    def fedchat_attacker_keys(self, t: Transcript) -> dict[int, tuple[bytes, bytes]]:
        """Node id -> (channel private key, mask private key) of every key pair the attacker made and put in the
        nodes' advertisement lists (sybils, substitutes): what was sealed or masked for them, it can open."""
        return {}

    def run_fedchat(self, leak_dir: str | Path):
        """(best recovery, notes, transcript) against fedchat's secure sum (`fedchat_recover`)."""
        transcript = run_attack(self, FEDCHAT, leak_dir, Hooks(self.fedchat_outgoing, self.fedchat_incoming))
        recovered, notes = fedchat_recover(self, transcript)
        return recovered, notes, transcript


class MaskRange(Attack):
    """Modulus range 2 at setup: every stock mask is randint(0, 1) = 0, so each upload is the node's
    quantised update modulo 2, one bit per value (the coordinator picks which bit with the target range)."""

    nodes, threshold = 3, 2

    def stock_outgoing(self, stage, messages, t):
        if stage == Stage.SETUP:
            for m in messages:  # the stock workflow sends one content to all
                m.content.config_records[RECORD_KEY_CONFIGS][Key.MOD_RANGE] = 2
        return messages

    def stock_recover(self, t) -> dict[int, list[np.ndarray]]:
        """Every node's quantised update mod 2, by partition, from its upload alone."""
        return {p: [a % 2 for a in upload(t, nid)[1:]] for p, nid in t.node_ids.items()}

    # Against fedchat: the same cut in the mask range, written in fedchat's parameter set, sent at the advertise
    # stage: node p is sent the change `fedchat_tamper[p % len(fedchat_tamper)]` (modulus_bits=1: masks modulo 2;
    # levels=2: one bit of quantisation), so that one round tries both.
    fedchat_tamper: tuple[tuple[str, Any], ...] = (("modulus_bits", 1), ("levels", 2))

    def tampered(self, partition: int) -> tuple[str, Any]:
        return self.fedchat_tamper[partition % len(self.fedchat_tamper)]

    def fedchat_outgoing(self, stage, messages, t):
        if stage == wire.ADVERTISE:
            for m in messages:
                name, value = self.tampered(t.partition(m.metadata.dst_node_id))
                record = m.content.config_records[wire.RECORD]
                record[wire.PARAMETERS] = wire.canonical({**json.loads(record[wire.PARAMETERS]), name: value})
        return messages


class SelectiveForwarding(Attack):
    """At the collect stage the victim is forwarded only the colluders' key shares: it masks with colluders
    alone. Honest nodes see consistent unmask lists and reveal the victim's self-mask seed shares."""

    nodes, threshold, victim, colluders = 5, 3, 0, frozenset({3, 4})

    def stock_outgoing(self, stage, messages, t):
        if stage == Stage.COLLECT_MASKED_VECTORS:
            allies = {t.nid(c) for c in self.colluders}
            for m in messages:
                if m.metadata.dst_node_id == t.nid(self.victim):
                    cfg = m.content.config_records[RECORD_KEY_CONFIGS]
                    kept = [(s, c) for s, c in zip(cfg[Key.SOURCE_LIST], cfg[Key.CIPHERTEXT_LIST]) if s in allies]
                    cfg[Key.SOURCE_LIST] = [s for s, _ in kept]
                    cfg[Key.CIPHERTEXT_LIST] = [c for _, c in kept]
        if stage == Stage.UNMASK:  # the victim is asked only about those it holds shares of: no node complains
            allies = {t.nid(c) for c in self.colluders} | {t.nid(self.victim)}
            for m in messages:
                if m.metadata.dst_node_id == t.nid(self.victim):
                    cfg = m.content.config_records[RECORD_KEY_CONFIGS]
                    cfg[Key.ACTIVE_NODE_ID_LIST] = [n for n in cfg[Key.ACTIVE_NODE_ID_LIST] if n in allies]
        return messages

    def stock_recover(self, t) -> list[np.ndarray]:
        """The victim's quantised update."""
        v = t.nid(self.victim)
        seed_shares = [share for reply in t.received.get(Stage.UNMASK, {}).values()
                       for owner, share in zip(reply[Key.NODE_ID_LIST], reply[Key.SHARE_LIST]) if owner == v]
        states = {t.nid(c): t.colluder_state(c, Stage.COLLECT_MASKED_VECTORS) for c in self.colluders}
        seed_shares += [s.rd_seed_share_dict[v] for s in states.values()]
        pk1_v = advertised_keys(t, v)[0]
        pairs = {peer: shared_secret(states[peer].sk1, pk1_v) for peer in masked_with(t, v)}  # KeyError: honest
        return remove_masks(upload(t, v), v, combine(seed_shares), pairs)[1:]

    # Against fedchat: at the collect stage the victim is forwarded only the colluders' sealed key shares (and,
    # in the variant `fedchat_also_forwarded`, those of some honest nodes too: a neighbour set just large
    # enough, missing the others).
    fedchat_also_forwarded: frozenset[int] = frozenset()

    def fedchat_outgoing(self, stage, messages, t):
        if stage == wire.COLLECT:
            allies = {t.nid(p) for p in self.colluders | self.fedchat_also_forwarded}
            for m in messages:
                if m.metadata.dst_node_id == t.nid(self.victim):
                    replace_lists(m.content.config_records[wire.RECORD], (wire.SOURCES, wire.SEALED),
                                  lambda src: src in allies)
        return messages


class ConvenientDropouts(Attack):
    """After key sharing the two honest nodes other than the victim are dropped (their collect messages never
    leave); the stock round unmasks the sum of the victim and the colluders, who subtract their own updates."""

    nodes, threshold, victim, colluders = 5, 3, 0, frozenset({3, 4})
    dropped = frozenset({1, 2})

    def stock_outgoing(self, stage, messages, t):
        if stage == Stage.COLLECT_MASKED_VECTORS:
            gone = {t.nid(p) for p in self.dropped}
            messages = [m for m in messages if m.metadata.dst_node_id not in gone]
        return messages

    def stock_recover(self, t) -> list[np.ndarray]:
        """The victim's update (floats): survivors x the round's mean, less the colluders' own updates."""
        survivors = 1 + len(self.colluders)
        own = [t.leak(c)["update"] for c in self.colluders]
        return [survivors * mean - sum(u[i] for u in own) for i, mean in enumerate(t.aggregate)]

    # Against fedchat: the same dropouts, the honest nodes' collect messages never leave.
    def fedchat_outgoing(self, stage, messages, t):
        if stage == wire.COLLECT:
            gone = {t.nid(p) for p in self.dropped}
            messages = [m for m in messages if m.metadata.dst_node_id not in gone]
        return messages


class SybilInjection(Attack):
    """The coordinator announces two more nodes than exist (sample and share count at setup) and adds two
    sybils, ids and keys of its own, to the victim's key list: the victim encrypts a share of its self-mask
    seed and of its mask key to each sybil, and two shares reach the threshold. No node colludes."""

    nodes, threshold, victim = 3, 2, 0
    sybils = 2

    def stock_outgoing(self, stage, messages, t):
        if stage == Stage.SETUP:
            real = set(t.node_ids.values())
            ids = []
            while len(ids) < self.sybils:
                candidate = random.getrandbits(63)
                if candidate not in real and candidate not in ids:
                    ids.append(candidate)
            t.scratch["sybils"] = {sid: (key_pair(), key_pair()) for sid in ids}  # id -> ((sk1, pk1), (sk2, pk2))
            for m in messages:
                cfg = m.content.config_records[RECORD_KEY_CONFIGS]
                cfg[Key.SAMPLE_NUMBER] = cfg[Key.SHARE_NUMBER] = self.nodes + self.sybils
        if stage == Stage.SHARE_KEYS:
            for m in messages:
                if m.metadata.dst_node_id == t.nid(self.victim):
                    cfg = m.content.config_records[RECORD_KEY_CONFIGS]
                    for sid, ((_, pk1), (_, pk2)) in t.scratch["sybils"].items():
                        cfg[str(sid)] = [pk1, pk2]
        return messages

    def stock_recover(self, t) -> list[np.ndarray]:
        v = t.nid(self.victim)
        pk2_v = advertised_keys(t, v)[1]
        reply = t.received[Stage.SHARE_KEYS][v]
        seed_shares, sk1_shares = [], []
        for dst, ciphertext in zip(reply[Key.DESTINATION_LIST], reply[Key.CIPHERTEXT_LIST]):
            if dst in t.scratch["sybils"]:
                (_, _), (sk2, _) = t.scratch["sybils"][dst]
                _, _, seed_share, sk1_share = open_share(shared_secret(sk2, pk2_v), ciphertext)
                seed_shares.append(seed_share)
                sk1_shares.append(sk1_share)
        sk1_v = combine(sk1_shares)
        keys = shown_keys(t, v)
        pairs = {peer: shared_secret(sk1_v, keys[peer][0]) for peer in masked_with(t, v)}
        return remove_masks(upload(t, v), v, combine(seed_shares), pairs)[1:]

    # Against fedchat: the sample announced at the advertise stage names the two sybils too, with the parameters
    # every node derives for that size; at the share-keys stage each node's advertisement list starts with the
    # sybils' advertisements, signed with identity keys the coordinator holds: one sybil claims a name that is
    # not on the roster, the other an honest member's name (the victim meets the first first, the others the
    # second). Every node is sent them (not only the victim): every node must refuse.
    sybil_names = ("org-sybil", member_name(1))

    def fedchat_outgoing(self, stage, messages, t):
        if stage == wire.ADVERTISE:
            real = set(t.node_ids.values())
            ids: list[int] = []
            while len(ids) < self.sybils:
                candidate = random.getrandbits(63)
                if candidate not in real and candidate not in ids:
                    ids.append(candidate)
            parameters = derive_parameters(FEDCHAT_RUN, self.nodes + self.sybils, t.protocol.roster.colluder_bound)
            t.scratch["parameters"] = parameters.as_dict()
            t.scratch["sybils"] = {sid: (name, Ed25519PrivateKey.generate(), masking.new_key_pair(),
                                         masking.new_key_pair()) for sid, name in zip(ids, self.sybil_names)}
            for m in messages:
                record = m.content.config_records[wire.RECORD]
                record[wire.SAMPLE] = [*record[wire.SAMPLE], *ids]
                record[wire.PARAMETERS] = wire.canonical(parameters.as_dict())
        if stage == wire.SHARE_KEYS:
            ad = advertisement(t, t.nid(self.victim))
            fakes = []
            for sid, (name, identity, (_, channel_pk), (_, mask_pk)) in t.scratch["sybils"].items():
                blob = wire.statement("advertisement", ad["roster"], ad["run"], ad["round"], node=sid, member=name,
                                      channel_key=channel_pk.hex(), mask_key=mask_pk.hex(),
                                      seed_commitment=masking.commit(masking.random_secret(), b"sybil"),
                                      parameters=t.scratch["parameters"])
                fakes.append((blob, bytes.fromhex(sign(identity, blob))))
            for m in messages:
                order = fakes if m.metadata.dst_node_id == t.nid(self.victim) else fakes[::-1]
                record = m.content.config_records[wire.RECORD]
                record[wire.STATEMENTS] = [blob for blob, _ in order] + list(record[wire.STATEMENTS])
                record[wire.SIGNATURES] = [sig for _, sig in order] + list(record[wire.SIGNATURES])
        return messages

    def fedchat_attacker_keys(self, t):
        return {sid: (channel[0], mask[0]) for sid, (_, _, channel, mask) in t.scratch.get("sybils", {}).items()}


class KeySubstitution(Attack):
    """Man in the middle: in the key list the victim is sent, an honest peer's public keys are replaced by the
    coordinator's. The victim encrypts that peer's shares (of its self-mask seed and of its mask key) to the
    coordinator, which with one colluder's shares reaches the threshold; at the collect stage the coordinator
    forwards the victim a share message it forged under the substituted key in place of the peer's."""

    nodes, threshold, victim, colluders = 3, 2, 0, frozenset({2})
    peer = 1

    def stock_outgoing(self, stage, messages, t):
        v, h = t.nid(self.victim), t.nid(self.peer)
        if stage == Stage.SHARE_KEYS:
            t.scratch["substitute"] = (key_pair(), key_pair())
            ((_, pk1), (_, pk2)) = t.scratch["substitute"]
            for m in messages:
                if m.metadata.dst_node_id == v:
                    m.content.config_records[RECORD_KEY_CONFIGS][str(h)] = [pk1, pk2]
        if stage == Stage.COLLECT_MASKED_VECTORS:
            (_, (sk2, _)) = t.scratch["substitute"]
            key = shared_secret(sk2, advertised_keys(t, v)[1])
            for m in messages:
                if m.metadata.dst_node_id == v:
                    cfg = m.content.config_records[RECORD_KEY_CONFIGS]
                    cfg[Key.CIPHERTEXT_LIST] = [forged_share(key, h, v, b"\0" * 32, b"\0" * 32) if src == h else c
                                                for src, c in zip(cfg[Key.SOURCE_LIST], cfg[Key.CIPHERTEXT_LIST])]
                if m.metadata.dst_node_id == h:  # the peer could not open the victim's share (sealed for us): drop it
                    cfg = m.content.config_records[RECORD_KEY_CONFIGS]
                    kept = [(s, c) for s, c in zip(cfg[Key.SOURCE_LIST], cfg[Key.CIPHERTEXT_LIST]) if s != v]
                    cfg[Key.SOURCE_LIST] = [s for s, _ in kept]
                    cfg[Key.CIPHERTEXT_LIST] = [c for _, c in kept]
        if stage == Stage.UNMASK:  # nor is the peer asked for a share of the victim's it never got
            for m in messages:
                if m.metadata.dst_node_id == h:
                    cfg = m.content.config_records[RECORD_KEY_CONFIGS]
                    cfg[Key.ACTIVE_NODE_ID_LIST] = [n for n in cfg[Key.ACTIVE_NODE_ID_LIST] if n != v]
        return messages

    def stock_recover(self, t) -> list[np.ndarray]:
        v, h = t.nid(self.victim), t.nid(self.peer)
        (_, (sk2, _)) = t.scratch["substitute"]
        reply = t.received[Stage.SHARE_KEYS][v]
        ciphertext = dict(zip(reply[Key.DESTINATION_LIST], reply[Key.CIPHERTEXT_LIST]))[h]
        _, _, seed_share, sk1_share = open_share(shared_secret(sk2, advertised_keys(t, v)[1]), ciphertext)
        colluders = [t.colluder_state(c, Stage.COLLECT_MASKED_VECTORS) for c in self.colluders]
        seed = combine([seed_share] + [c.rd_seed_share_dict[v] for c in colluders])
        sk1_v = combine([sk1_share] + [c.sk1_share_dict[v] for c in colluders])
        keys = shown_keys(t, v)  # the keys the victim used: the substitute for the peer
        pairs = {peer: shared_secret(sk1_v, keys[peer][0]) for peer in masked_with(t, v)}
        return remove_masks(upload(t, v), v, seed, pairs)[1:]

    # Against fedchat: in the advertisement list the victim is sent, the peer's advertisement carries the
    # coordinator's two public keys in place of the peer's (the peer's own signature kept: the coordinator
    # cannot sign for it); at the collect stage the victim is forwarded a share forged under the substitute
    # channel key in place of the peer's, and the peer is not forwarded the victim's.
    def fedchat_outgoing(self, stage, messages, t):
        v, h = t.nid(self.victim), t.nid(self.peer)
        if stage == wire.SHARE_KEYS:
            t.scratch["substitute"] = (masking.new_key_pair(), masking.new_key_pair())  # (channel, mask)
            ((_, channel_pk), (_, mask_pk)) = t.scratch["substitute"]
            for m in messages:
                if m.metadata.dst_node_id == v:
                    record = m.content.config_records[wire.RECORD]
                    record[wire.STATEMENTS] = [
                        wire.canonical({**ad, "channel_key": channel_pk.hex(), "mask_key": mask_pk.hex()})
                        if (ad := json.loads(blob))["node"] == h else blob for blob in record[wire.STATEMENTS]]
        if stage == wire.COLLECT:
            ((channel_sk, _), _) = t.scratch["substitute"]
            ad = advertisement(t, v)
            ctx = wire.context(ad["roster"], ad["run"], ad["round"])
            for m in messages:
                record = m.content.config_records[wire.RECORD]
                if m.metadata.dst_node_id == v:
                    forged = masking.seal(masking.agree(channel_sk, bytes.fromhex(ad["channel_key"])),
                                          ctx + f":{h}->{v}".encode(),
                                          wire.canonical({"from": h, "to": v, "pair": bytes(66).hex(),
                                                          "self": bytes(66).hex()}))
                    record[wire.SEALED] = [forged if src == h else blob
                                           for src, blob in zip(record[wire.SOURCES], record[wire.SEALED])]
                if m.metadata.dst_node_id == h:
                    replace_lists(record, (wire.SOURCES, wire.SEALED), lambda src: src != v)
        return messages

    def fedchat_attacker_keys(self, t):
        if "substitute" not in t.scratch:
            return {}
        ((channel_sk, _), (mask_sk, _)) = t.scratch["substitute"]
        return {t.nid(self.peer): (channel_sk, mask_sk)}


class ListEquivocation(Attack):
    """fedchat only (Flower's SecAgg+ has no consistency round to equivocate in): the coordinator shows different
    nodes different survivor lists, to collect the victim's self-mask seed shares from one group (the victim
    survived) and its mask-key shares from another (the victim dropped out), and so both of its secrets.
    Round of 5 under a colluder bound of 1 (threshold 4), the colluder signs whatever it is handed (the
    attacker signs with its identity key). At the consistency stage `group_b` is shown every node but the victim
    as survivors, the others every node; at the unmask stage each node is sent the signatures over its own list
    (the colluder's over both)."""

    nodes, victim, colluders = 5, 0, frozenset({4})
    group_b = frozenset({3})

    def fedchat_outgoing(self, stage, messages, t):
        v, colluder = t.nid(self.victim), t.nid(next(iter(self.colluders)))
        if stage == wire.CONSISTENCY:
            for m in messages:
                if m.metadata.dst_node_id in {t.nid(p) for p in self.group_b}:
                    record = m.content.config_records[wire.RECORD]
                    record[wire.SURVIVORS] = [n for n in record[wire.SURVIVORS] if n != v]
                    kept = [(blob, sig) for blob, sig in zip(record[wire.STATEMENTS], record[wire.SIGNATURES])
                            if json.loads(blob)["node"] != v]
                    record[wire.STATEMENTS] = [blob for blob, _ in kept]
                    record[wire.SIGNATURES] = [sig for _, sig in kept]
        if stage == wire.UNMASK:
            signed: dict[tuple, dict[int, bytes]] = {}  # survivor list -> signer -> signature
            lists: dict[int, tuple] = {}
            for node, reply in t.received[wire.CONSISTENCY].items():
                statement = json.loads(reply[wire.STATEMENT])
                lists[node] = tuple(statement["survivors"])
                signed.setdefault(lists[node], {})[node] = reply[wire.SIGNATURE]
            identity = t.protocol.identity(next(iter(self.colluders)))
            for survivors, signers in signed.items():  # the colluder signs every list
                blob = wire.statement("consistency", statement["roster"], statement["run"], statement["round"],
                                      view=statement["view"], survivors=list(survivors))
                signers[colluder] = bytes.fromhex(sign(identity, blob))
            t.scratch["signed"] = {survivors: sorted(signers) for survivors, signers in signed.items()}
            for m in messages:
                signers = signed.get(lists.get(m.metadata.dst_node_id), {})
                record = m.content.config_records[wire.RECORD]
                record[wire.SIGNERS] = list(signers)
                record[wire.SIGNATURES] = list(signers.values())
        return messages


# ------------------------------------------------------------------ masks


def stock_mask(secret: bytes, num_range: int, size: int) -> np.ndarray:
    """Flower's `pseudo_rand_gen` mask of `size` values from a 256-bit `secret`."""
    return pseudo_rand_gen(secret, num_range, [(size,)])[0]


def fold_collision(secret: bytes, word: bytes = b"\xef\xbe\xad\xde") -> bytes:
    """A different 32-byte secret with the same 32-bit XOR fold: the same 4 bytes XORed into two words."""
    out = bytearray(secret)
    for start in (0, 4):
        out[start:start + 4] = bytes(a ^ b for a, b in zip(out[start:start + 4], word))
    return bytes(out)
