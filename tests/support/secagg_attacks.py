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
`STOCK` is Flower 1.41's `secaggplus_mod` with its `SecAggPlusWorkflow`. A second protocol (fedchat's own
node mod and coordinator workflow) is another `Protocol`; an attack then gets a `run_<protocol>()` beside
`run_stock()` that calls `run_attack(self, PROTOCOL, leak_dir, hooks)` with hooks written for that protocol's
messages, and asserts on the transcript (the nodes' refusals in `Transcript.errors`, nothing of the update in
`Transcript.received`) instead of a recovery.
"""

from __future__ import annotations

import os
import pickle
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

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

    def nid(self, partition: int) -> int:
        return self.node_ids[partition]

    def partition(self, node_id: int) -> int:
        return {v: k for k, v in self.node_ids.items()}[node_id]

    def leak(self, partition: int) -> dict:
        """A colluder's leak: its node id, own update and state snapshots."""
        return pickle.loads(leak_path(self.leak_dir, partition).read_bytes())

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


# ------------------------------------------------------------------ running an attack


@contextmanager
def one_ray_session():
    """One Ray session for every simulation inside: Flower's Ray backend shuts Ray down after each run,
    and starting it again costs tens of seconds on 2 cores. Shut down for real at the end."""
    import ray

    shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ray.shutdown = shutdown
        shutdown()


def run_attack(attack: Attack, protocol: Protocol, leak_dir: str | Path, hooks: Hooks) -> Transcript:
    """Run one round of `protocol` among `attack.nodes` simulated nodes, the coordinator being the attacker."""
    from flwr.simulation import run_simulation

    leak_dir = Path(leak_dir)
    leak_dir.mkdir(parents=True, exist_ok=True)
    transcript = Transcript(leak_dir)
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
