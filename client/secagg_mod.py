"""The node's side of fedchat's secure sum: a ClientApp mod that holds up against a cheating coordinator.

The coordinator learns the sum of the round's updates and nothing of one update, even when it runs
modified code and up to the roster's colluder bound c of the members collude with it. This mod
decides everything that protects the node from what the node itself knows and has signed; it
trusts the coordinator for nothing but delivery (Bonawitz et al. 2017, the active-adversary
protocol, with parameters derived by rule: shared/secagg_rules.py):

1. **advertise**: the node checks that its operator approved the roster (by hash) and that its own
   identity key is in it, derives the round's parameters itself (refusing any other value, and any
   round its own stricter colluder bound does not allow), makes two fresh X25519 key pairs and a
   self-mask seed, and signs an advertisement of them bound to roster, run, round and node id.
2. **share-keys**: it verifies every advertisement against the roster (a member's key, one node
   each, the same parameters, its own advertisement unchanged, enough of them), then Shamir-shares
   its mask key and self-mask seed (threshold t) to each of them, sealed for each peer alone.
3. **collect**: the key shares it receives name the nodes it masks with (U2; enough of them, each
   share opened and addressed to it), it trains, quantises its clipped, weighted update, adds a
   self mask and one pairwise mask per peer in U2 (uniform over Z_2^32, from a cipher stream), and
   sends it with its signed view of U2. The weight (training conversations, capped) is summed
   securely too: the coordinator learns only the round's total.
4. **consistency**: it signs the survivor list U3 only when every survivor signed the same U2 as
   its own, U3 is within U2, and U3 is large enough (at least max(3, c + 2, t): two honest updates
   under the bound) with no more dropouts than its dropout fraction allows.
5. **unmask**: it reveals shares only after it holds t valid signatures over the same (U2, U3), so
   the coordinator cannot have shown another node other lists; it reveals the self-mask share of
   each survivor and the mask-key share of each dropped node, never both of one node.

Any failed check is a ``PrivacyError`` naming what was wrong; the node sends nothing further in that
round. The node takes each stage of a round once, in order; secrets live in the ClientApp's
context state for the round only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitRes, Parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitres

from shared import masking
from shared import secagg_wire as wire
from shared.accounting import counted_noise
from shared.config import NodeConfig, RunConfig
from shared.crypto import load_identity_key, raw_public_hex, sign, verify
from shared.errors import PrivacyError
from shared.protocol import META_ROUND, META_RUN, split_fit_config
from shared.roster import Roster, load_approved
from shared.secagg_rules import derive_parameters, parameter_mismatch, round_refusal, survivors_needed, wrap_problem

log = logging.getLogger("fedchat.node")
SECAGG_FLAG = "fedchat.secagg"  # context state: whether the current training message runs the secure sum
STATE = "fedchat.secagg.state"  # context state: this round's protocol state (JSON)
PLAN = "fedchat.secagg.plan"  # context state, during training only: this round's distributed-DP plan (JSON)


class _Round:
    """One round's protocol state on this node, kept as JSON in the ClientApp's context state."""

    def __init__(self, context: Context) -> None:
        self.context = context
        record = context.state.config_records.get(STATE)
        self.data: dict = json.loads(record["json"]) if record is not None else {}

    def save(self) -> None:
        self.context.state.config_records[STATE] = ConfigRecord({"json": json.dumps(self.data)})

    def expect(self, stage: str) -> None:
        done = self.data.get("done")
        expected = wire.STAGES[wire.STAGES.index(done) + 1] if done in wire.STAGES[:-1] else None
        if stage != expected:
            _refuse(f"stage '{stage}' arrived when this node expected "
                    f"{repr(expected) if expected else 'a new round (advertise)'}: each stage runs once, in order")


def secure_aggregation(node_config: Callable[[Context, RunConfig | None], NodeConfig], plan_share=None):
    """The ClientApp mod. `node_config(context, run)` gives the node's settings: its operator's, never the
    run's (a virtual node of a simulation, which has only a partition id, takes its folders from the run).
    `plan_share(node, run, meta, counted_shares, scale)` plans a distributed-DP round (client.privacy's
    DistributedPlan) from the node's own ledger: its noise share is announced in its advertisement, and the
    plan reaches training through the node's own context state (PLAN), never through the coordinator."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        node = node_config(context, None)
        record = msg.content.config_records.get(wire.RECORD)
        context.state.config_records[SECAGG_FLAG] = ConfigRecord({"active": record is not None})
        if record is None:
            if node.require_secagg:
                raise PrivacyError(f"node {node.node_name} requires secure aggregation (require-secagg=true); the "
                                   "coordinator asked for a plaintext update, refused.")
            return call_next(msg, context)
        stage = record.get(wire.STAGE)
        try:
            content = NodeProtocol(node_config, context, msg.metadata.dst_node_id, plan_share).run(
                stage, record, msg, call_next)
        except PrivacyError as exc:
            raise PrivacyError(f"node {node.node_name} refuses secure-aggregation stage '{stage}': {exc}") from None
        return Message(content, reply_to=msg)

    return mod


class NodeProtocol:
    def __init__(self, node_config, context: Context, node_id: int, plan_share=None) -> None:
        self.node_config, self.context, self.node_id, self.plan_share = node_config, context, node_id, plan_share
        self.round = _Round(context)

    def run(self, stage, record: ConfigRecord, msg: Message, call_next) -> RecordDict:
        if stage == wire.ADVERTISE:
            self.round.data = {}  # a new round starts; whatever an unfinished one held is dropped
            try:
                self.fit_config = json.loads(_bytes(record, wire.RUN_CONFIG))
                self.cfg, self.meta = split_fit_config(self.fit_config)
            except (ValueError, TypeError) as exc:
                _refuse(f"the setup message's run config is malformed: {exc}")
        elif stage in wire.STAGES:
            self.round.expect(stage)
            self.fit_config = self.round.data["fit_config"]
            self.cfg, self.meta = split_fit_config(self.fit_config)
        else:
            _refuse(f"unknown stage {stage!r}")
        self.node = self.node_config(self.context, self.cfg)
        handler = {wire.ADVERTISE: self.advertise, wire.SHARE_KEYS: self.share_keys, wire.COLLECT: self.collect,
                   wire.CONSISTENCY: self.consistency, wire.UNMASK: self.unmask}[stage]
        content = RecordDict()
        reply = handler(record, msg, call_next, content)
        self.round.data["done"] = stage
        self.round.save()
        content.config_records[wire.RECORD] = ConfigRecord(reply)
        return content

    # ------------------------------------------------------------ identity and checks
    def _roster(self) -> Roster:
        if not self.node.roster or not self.node.roster_sha256:
            _refuse("the node has no approved roster: set 'roster' and 'roster-sha256' in its node config "
                    "(`fedchat roster approve node.toml roster.json`)")
        return load_approved(self.node.roster, self.node.roster_sha256)

    def _identity(self):
        path = self.node.identity_key or str(Path(self.node.state_dir) / "identity-key.pem")
        return load_identity_key(path)

    def _colluders(self, roster: Roster) -> int:
        """The colluder bound this node holds rounds to: the roster's, or its own stricter one."""
        return max(roster.colluder_bound, self.node.secagg_colluders)

    def _survivors_needed(self, nodes: int, colluders: int) -> int:
        return max(self.node.secagg_min_nodes, survivors_needed(nodes, colluders))

    def _verify_statement(self, blob: bytes, signature: bytes, kind: str, member: str, roster: Roster) -> dict:
        d = self.round.data
        try:
            payload = wire.parse_statement(blob, kind)
        except (ValueError, TypeError):
            _refuse(f"a forwarded {kind} statement is malformed")
        if (payload["roster"], payload["run"], payload["round"]) != (d["roster"], d["run"], d["round"]):
            _refuse(f"a {kind} statement was made for another roster, run or round (a replay)")
        listed = next((m for m in roster.members if m.name == member), None)
        if listed is None:
            _refuse(f"{member!r} made a {kind} statement but is not on the roster this node's operator approved (a "
                    "node outside the federation)")
        if not verify(listed.public_key, blob, signature.hex()):
            _refuse(f"the {kind} statement of roster member {member!r} does not carry that member's signature")
        return payload

    # ------------------------------------------------------------ stages
    def advertise(self, record: ConfigRecord, msg, call_next, content) -> dict:
        roster = self._roster()
        identity = self._identity()
        me = roster.by_key(raw_public_hex(identity))
        if me is None:
            _refuse("this node's identity key is not in the roster its operator approved: send its public key "
                    "(`fedchat roster key`) to the roster keeper, then approve the new roster")
        cfg, meta = self.cfg, self.meta
        try:
            sent = json.loads(_bytes(record, wire.PARAMETERS))
        except (ValueError, TypeError) as exc:
            _refuse(f"the setup message's parameters are malformed: {exc}")
        sample = _ids(record, wire.SAMPLE)
        if len(set(sample)) != len(sample) or self.node_id not in sample:
            _refuse("the sample lists a node twice or does not list this node")
        colluders = self._colluders(roster)
        if problem := round_refusal(len(sample), colluders):
            _refuse(problem + f" (colluder bound {colluders}: the roster's {roster.colluder_bound}, this node's "
                              f"secagg-colluders {self.node.secagg_colluders})")
        expected = derive_parameters(cfg, len(sample), roster.colluder_bound)
        if problem := parameter_mismatch(sent, expected):
            _refuse(problem)
        if expected.threshold < (len(sample) + colluders) // 2 + 1:  # a stricter node's own bound
            _refuse(f"threshold {expected.threshold} lets two different survivor lists both reach a quorum when "
                    f"{colluders} members collude (this node's secagg-colluders)")
        needed = self._survivors_needed(len(sample), colluders)
        if len(sample) < needed:
            _refuse(f"a round of {len(sample)} nodes; this node needs at least {needed} (secagg-min-nodes)")
        run, rnd = str(meta[META_RUN]), int(meta[META_ROUND])
        self.context.state.config_records.pop(PLAN, None)
        need, plan = 0.0, None
        if expected.mode == "distributed":  # the noise share this node adds, from its own ledger
            if self.plan_share is None:
                _refuse("this node cannot plan distributed DP (no planner in its ClientApp)")
            plan = self.plan_share(self.node, cfg, meta, needed - colluders - 1, expected.scale)
            if not math.isfinite(plan.share) or plan.epsilon_after > self.node.target_epsilon or \
                    plan.local_after > self.node.local_epsilon_cap:
                _refuse(f"no noise share keeps this round within the node's budget (epsilon {plan.epsilon_before:.3f} "
                        f"of {self.node.target_epsilon:g} spent, local {plan.local_before:.3f} of "
                        f"{self.node.local_epsilon_cap:g})")
            need = coarsened(plan.counted)
        channel_sk, channel_pk = masking.new_key_pair()
        mask_sk, mask_pk = masking.new_key_pair()
        seed = masking.random_secret()
        ctx = wire.context(roster.sha256, run, rnd)
        blob = wire.statement("advertisement", roster.sha256, run, rnd, node=self.node_id, member=me.name,
                              channel_key=channel_pk.hex(), mask_key=mask_pk.hex(),
                              seed_commitment=masking.commit(seed, masking.self_label(ctx, self.node_id)),
                              parameters=expected.as_dict(), noise_need=need)
        self.round.data = {"roster": roster.sha256, "run": run, "round": rnd, "member": me.name,
                           "sample": sorted(sample), "parameters": expected.as_dict(), "colluders": colluders,
                           "needed": needed, "channel_sk": channel_sk.hex(), "mask_sk": mask_sk.hex(),
                           "seed": seed.hex(), "advertisement": blob.hex(), "fit_config": self.fit_config,
                           "plan": None if plan is None else {**plan.__dict__, "scale": expected.scale, "need": need}}
        return {wire.STATEMENT: blob, wire.SIGNATURE: bytes.fromhex(sign(identity, blob))}

    def share_keys(self, record: ConfigRecord, msg, call_next, content) -> dict:
        d = self.round.data
        roster = self._roster()
        blobs, signatures = _blobs(record, wire.STATEMENTS), _blobs(record, wire.SIGNATURES)
        if len(blobs) != len(signatures):
            _refuse("the advertisements and their signatures do not pair up")
        peers: dict[int, dict] = {}
        members: set[str] = set()
        for blob, signature in zip(blobs, signatures, strict=True):
            try:
                member = wire.parse_statement(blob, "advertisement")["member"]
            except (ValueError, TypeError, KeyError):
                _refuse("a forwarded advertisement is malformed")
            ad = self._verify_statement(blob, signature, "advertisement", member, roster)
            node = ad["node"]
            if type(node) is not int or node in peers or member in members:  # noqa: E721
                _refuse(f"roster member {member!r} or node {node} advertises twice in one round")
            if node not in d["sample"]:
                _refuse(f"node {node} advertises in a round it was not sampled for")
            if ad["parameters"] != d["parameters"]:
                _refuse(f"roster member {member!r} signed other parameters than this node's: the coordinator "
                        "showed nodes different rounds")
            need = ad.get("noise_need")
            if type(need) not in (int, float) or not math.isfinite(need) or need < 0:
                _refuse(f"roster member {member!r} announced no valid noise need")
            peers[node] = ad
            members.add(member)
        if peers.get(self.node_id, {}).get("member") != d["member"] or \
                wire.canonical(peers[self.node_id]) != bytes.fromhex(d["advertisement"]):
            _refuse("this node's own advertisement is missing or was changed")
        if len(peers) < d["needed"]:
            _refuse(f"{len(peers)} node(s) advertised; this node needs at least {d['needed']} to take part")
        if d["plan"] is not None:  # every node adds at least the largest need over the counted shares
            counted_shares = d["needed"] - d["colluders"] - 1
            common = max(ad["noise_need"] for ad in peers.values()) / counted_shares
            d["plan"].update(share=max(common, d["plan"]["share"]), counted=counted_shares * common, common=common)
            if problem := wrap_problem(len(peers), self.cfg.batch_size, d["parameters"]["scale"], len(peers) * common,
                                       d["plan"]["values"]):
                _refuse(problem)
        order = sorted(peers)
        xs = {node: i + 1 for i, node in enumerate(order)}  # each node's Shamir point
        threshold = d["parameters"]["threshold"]
        mask_shares = masking.split_secret(bytes.fromhex(d["mask_sk"]), list(xs.values()), threshold)
        seed_shares = masking.split_secret(bytes.fromhex(d["seed"]), list(xs.values()), threshold)
        ctx = wire.context(d["roster"], d["run"], d["round"])
        destinations, sealed = [], []
        for node in order:
            plaintext = wire.canonical({"from": self.node_id, "to": node, "pair": mask_shares[xs[node]].hex(),
                                        "self": seed_shares[xs[node]].hex()})
            if node == self.node_id:
                d["received"] = {str(node): json.loads(plaintext)}
                continue
            channel = masking.agree(bytes.fromhex(d["channel_sk"]), bytes.fromhex(peers[node]["channel_key"]))
            destinations.append(node)
            sealed.append(masking.seal(channel, ctx + f":{self.node_id}->{node}".encode(), plaintext))
        d["peers"] = {str(k): {"member": v["member"], "channel_key": v["channel_key"], "mask_key": v["mask_key"],
                               "seed_commitment": v["seed_commitment"]}
                      for k, v in peers.items()}
        return {wire.DESTINATIONS: destinations, wire.SEALED: sealed}

    def collect(self, record: ConfigRecord, msg: Message, call_next, content: RecordDict) -> dict:
        d = self.round.data
        peers = {int(k): v for k, v in d["peers"].items()}
        sources, sealed = _ids(record, wire.SOURCES), _blobs(record, wire.SEALED)
        if len(sources) != len(sealed) or len(set(sources)) != len(sources) or self.node_id in sources:
            _refuse("the forwarded key shares list a source twice, or this node itself")
        if unknown := set(sources) - set(peers):
            _refuse(f"key shares arrived from node(s) {sorted(unknown)} that did not advertise in this round")
        given = msg.content.config_records.get("fitins.config")
        if given is None or json.loads(wire.canonical(dict(given))) != d["fit_config"]:
            _refuse("the training instruction's config differs from the one this node's advertisement was made for")
        view = sorted({*sources, self.node_id})
        if len(view) < d["needed"]:
            _refuse(f"key shares reached this node from {len(sources)} other node(s); it masks only with at least "
                    f"{d['needed'] - 1} others (its update would be part of too small a sum)")
        ctx = wire.context(d["roster"], d["run"], d["round"])
        for source, blob in zip(sources, sealed, strict=True):
            channel = masking.agree(bytes.fromhex(d["channel_sk"]), bytes.fromhex(peers[source]["channel_key"]))
            opened = masking.open_sealed(channel, ctx + f":{source}->{self.node_id}".encode(), blob)
            shares = json.loads(opened) if opened is not None else {}
            if shares.get("from") != source or shares.get("to") != self.node_id:
                _refuse(f"the key share from node {source} does not open under that node's channel key: it was "
                        "altered or made by someone else")
            d["received"][str(source)] = shares
        if d["plan"] is not None:  # for this round's training only; the node's own state, not the message
            plan = {k: v for k, v in d["plan"].items() if k != "common"}
            self.context.state.config_records[PLAN] = ConfigRecord({"json": json.dumps(plan)})
        try:
            reply_msg = call_next(msg, self.context)
        finally:
            self.context.state.config_records.pop(PLAN, None)
        if reply_msg.has_error():
            raise PrivacyError(f"training failed: {reply_msg.error.reason}")
        fit = recorddict_to_fitres(reply_msg.content, keep_input=True)
        if fit.num_examples <= 0:
            _refuse("this node has no update for this round; it does not add an empty one to a secure sum")
        masked = self._masked_vector(parameters_to_ndarrays(fit.parameters), fit.num_examples, view, peers, ctx)
        # The reply's fit result keeps the node's metrics only: the update and its weight travel masked.
        public = fitres_to_recorddict(FitRes(fit.status, Parameters([], ""), 0, fit.metrics), keep_input=True)
        content.config_records.update(public.config_records)
        content.metric_records.update(public.metric_records)
        content.array_records.update(public.array_records)
        d["view"] = view
        blob = wire.statement("view", d["roster"], d["run"], d["round"], node=self.node_id, view=view)
        d["view_statement"] = blob.hex()
        identity = self._identity()
        return {wire.MASKED: wire.vector_bytes(masked), wire.STATEMENT: blob,
                wire.SIGNATURE: bytes.fromhex(sign(identity, blob))}

    def _masked_vector(self, update: list[np.ndarray], num_examples: int, view: list[int], peers: dict,
                       ctx: bytes) -> np.ndarray:
        p = self.round.data["parameters"]
        if p["mode"] == "distributed":  # integers already: the gradient sum in scale units plus the noise share
            ints = np.concatenate([np.asarray(u).ravel() for u in update])
            if ints.dtype.kind not in "iu":
                _refuse("a distributed-DP update must be integers (the rounded, noised gradient sum)")
            vector = np.empty(ints.size + 1, dtype=np.uint32)
            vector[0] = 1  # one contributor; the weight is the federation's expected batch, a public number
            vector[1:] = np.mod(ints.astype(np.int64), 2**32).astype(np.uint32)
        else:
            weight = min(int(num_examples), p["max_weight"])
            flat = np.concatenate([np.asarray(u, dtype=np.float64).ravel() for u in update]) * (weight /
                                                                                                 p["max_weight"])
            vector = np.empty(flat.size + 1, dtype=np.uint32)
            vector[0] = weight
            # Rounding at random from 256 bits of the OS (the node's other processes need not load torch for it).
            rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(int.from_bytes(os.urandom(32)))))
            vector[1:] = masking.quantise(flat, p["clip"], p["levels"], rng)
        vector += masking.mask_stream(bytes.fromhex(self.round.data["seed"]),
                                      masking.self_label(ctx, self.node_id), vector.size)
        mask_sk = bytes.fromhex(self.round.data["mask_sk"])
        for peer in view:
            if peer == self.node_id:
                continue
            secret = masking.agree(mask_sk, bytes.fromhex(peers[peer]["mask_key"]))
            stream = masking.mask_stream(secret, masking.pair_label(ctx, self.node_id, peer), vector.size)
            if masking.pair_sign(self.node_id, peer) > 0:
                vector += stream
            else:
                vector -= stream
        return vector

    def consistency(self, record: ConfigRecord, msg, call_next, content) -> dict:
        d = self.round.data
        roster = self._roster()
        survivors = _ids(record, wire.SURVIVORS)
        blobs, signatures = _blobs(record, wire.STATEMENTS), _blobs(record, wire.SIGNATURES)
        if len(set(survivors)) != len(survivors) or self.node_id not in survivors:
            _refuse("the survivor list repeats a node or leaves out this node, which sent its masked update")
        if outside := set(survivors) - set(d["view"]):
            _refuse(f"the survivor list names node(s) {sorted(outside)} this node did not mask with")
        if len(survivors) < d["needed"]:
            _refuse(f"only {len(survivors)} masked updates would be summed; this node needs at least {d['needed']} "
                    f"(two honest updates when {d['colluders']} members may collude)")
        dropped = len(d["view"]) - len(survivors)
        allowed = int(self.node.secagg_dropout_fraction * len(d["sample"]) + 1e-9)
        if dropped > allowed:
            _refuse(f"{dropped} node(s) dropped out after key sharing; this node lets at most {allowed} "
                    f"(secagg-dropout-fraction {self.node.secagg_dropout_fraction:g})")
        if d["plan"] is not None:  # the noise the sum will hold, counting only shares this node cannot know
            counted = counted_noise([d["plan"]["common"]] * len(survivors), d["colluders"])
            if counted < d["plan"]["need"] * (1 - 1e-9):
                _refuse(f"the survivors' noise shares give {counted:.4g} that this node can count on, less than the "
                        f"{d['plan']['need']:.4g} its privacy budget was planned with (too few honest survivors)")
        if len(blobs) != len(survivors) or len(signatures) != len(blobs):
            _refuse("each survivor's signed view must be forwarded, once")
        peers = {int(k): v for k, v in d["peers"].items()}
        seen = set()
        for blob, signature in zip(blobs, signatures, strict=True):
            try:
                node = wire.parse_statement(blob, "view")["node"]
                member = peers[node]["member"]
            except (ValueError, TypeError, KeyError):
                _refuse("a forwarded view is malformed or from a node that did not advertise")
            view = self._verify_statement(blob, signature, "view", member, roster)
            if view["view"] != d["view"]:
                _refuse(f"node {node} masked with other nodes than this one did: the coordinator forwarded key "
                        "shares selectively")
            seen.add(node)
        if seen != set(survivors):
            _refuse("the signed views do not match the survivor list")
        blob = wire.statement("consistency", d["roster"], d["run"], d["round"], view=d["view"],
                              survivors=sorted(survivors))
        d["survivors"] = sorted(survivors)
        d["consistency"] = blob.hex()
        return {wire.STATEMENT: blob, wire.SIGNATURE: bytes.fromhex(sign(self._identity(), blob))}

    def unmask(self, record: ConfigRecord, msg, call_next, content) -> dict:
        d = self.round.data
        roster = self._roster()
        signers, signatures = _ids(record, wire.SIGNERS), _blobs(record, wire.SIGNATURES)
        if len(signers) != len(signatures) or len(set(signers)) != len(signers):
            _refuse("the consistency signatures and their signers do not pair up, or a signer repeats")
        peers = {int(k): v for k, v in d["peers"].items()}
        own = bytes.fromhex(d["consistency"])
        valid = {node for node, signature in zip(signers, signatures, strict=True)
                 if node in d["survivors"] and verify(roster.member(peers[node]["member"]).public_key, own,
                                                      signature.hex())}
        threshold = d["parameters"]["threshold"]
        if len(valid) < threshold:
            _refuse(f"{len(valid)} survivor(s) signed the same survivor list as this node; it reveals shares only "
                    f"after {threshold} have (else the coordinator may have shown others another list)")
        owners, kinds, shares = [], [], []
        for node in d["view"]:
            kind = wire.SELF if node in d["survivors"] else wire.PAIR
            owners.append(node)
            kinds.append(kind)
            shares.append(bytes.fromhex(d["received"][str(node)][kind]))
        for key in ("mask_sk", "seed", "channel_sk", "received"):  # nothing of this round is needed again
            d.pop(key, None)
        return {wire.OWNERS: owners, wire.KINDS: kinds, wire.SHARES: shares}


def coarsened(need: float) -> float:
    """A noise need rounded up to a power of 2^(1/4): what a node announces of it says little of its data size
    or its spent budget, and more noise never costs privacy."""
    return 2 ** (math.ceil(4 * math.log2(need)) / 4) if need > 0 else 0.0


def _bytes(record: ConfigRecord, key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        _refuse(f"'{key}' must be bytes")
    return value


def _blobs(record: ConfigRecord, key: str) -> list[bytes]:
    value = record.get(key, [])
    if not isinstance(value, list) or any(not isinstance(v, bytes) for v in value):
        _refuse(f"'{key}' must be a list of bytes")
    return list(value)


def _ids(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key)
    if not isinstance(value, list) or any(type(v) is not int for v in value):  # noqa: E721
        _refuse(f"'{key}' must be a list of node ids")
    return list(value)


def _refuse(reason: str):
    raise PrivacyError(reason)

