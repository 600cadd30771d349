"""The coordinator's side of fedchat's secure sum: a Flower fit workflow that learns only the sum.

The node side (client/secagg_mod.py) checks everything that protects a node; this side delivers the
messages, keeps the round going when nodes drop out, and decodes the sum. It runs the strategy's
round (``configure_fit`` / ``aggregate_fit``) through five stages, each one Flower message to every
node still in the round:

=============  =========================================  =======================================
stage          the coordinator sends                      a node answers
=============  =========================================  =======================================
advertise      the fit config, the sample, the parameters  its signed advertisement (public keys)
share-keys     every advertisement (U1)                    its key shares, sealed for each peer
collect        the shares sealed for it; the fit ins       its masked update, signed view of U2
consistency    the survivors U3 and their signed views     its signature over (U2, U3)
unmask         the consistency signatures                  self-mask shares of U3, mask-key
                                                           shares of U2 minus U3
=============  =========================================  =======================================

Parameters follow by rule from the run config, the round's size and the roster's colluder bound
(shared/secagg_rules.py); the coordinator reads the roster only for that bound and to drop a
node's malformed or unsigned message early (one bad reply then costs the round one node, not
the round). The sum of the masked uint32 vectors wraps modulo 2^32, the protocol's arithmetic;
after the masks are removed it holds the sum of the weights (training conversations, capped)
and of the quantised weighted updates, and their ratio is the weighted mean the strategy applies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import ndarrays_to_parameters
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from server.aggregate import ServerAdam
from shared import masking
from shared import secagg_wire as wire
from shared.config import RunConfig
from shared.crypto import verify
from shared.errors import ConfigError
from shared.roster import Roster, load_roster
from shared.secagg_rules import SumParameters, derive_parameters, round_refusal

log = logging.getLogger("fedchat.coordinator")


@dataclass
class _RoundState:
    rnd: int = 0
    params: SumParameters | None = None
    fitins: dict[int, RecordDict] = field(default_factory=dict)
    proxies: dict = field(default_factory=dict)
    sampled: list[int] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    ads: dict[int, tuple[bytes, bytes, dict]] = field(default_factory=dict)  # node -> (statement, signature, fields)
    forward: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    views: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    masked_sum: np.ndarray | None = None
    shared_keys: list[int] = field(default_factory=list)  # U2
    consistency: dict[int, bytes] = field(default_factory=dict)
    results: list = field(default_factory=list)  # (proxy, FitRes) of the survivors
    failures: list = field(default_factory=list)


class SecureAggregation:
    """fedchat's secure sum as a fit workflow for Flower's legacy loop (a ``LegacyContext``)."""

    def __init__(self, cfg: RunConfig, roster: Roster, sizes: list[tuple[int, ...]]) -> None:
        self.cfg, self.roster, self.sizes = cfg, roster, sizes
        self.length = 1 + sum(int(np.prod(s, dtype=np.int64)) for s in sizes)  # the weight, then every value
        self.last_parameters: dict = {}
        self.server_optimizer = ServerAdam(cfg.learning_rate)  # distributed DP: the federation's optimizer

    def __call__(self, grid, context: LegacyContext) -> None:
        state = _RoundState(rnd=int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]))
        self.last_parameters = {"protocol": wire.PROTOCOL, "stage_seconds": {}, "active_after_stage": {}}
        for name, stage in ((wire.ADVERTISE, self._advertise), (wire.SHARE_KEYS, self._share_keys),
                            (wire.COLLECT, self._collect), (wire.CONSISTENCY, self._consistency),
                            (wire.UNMASK, self._unmask)):
            started = time.perf_counter()
            before = set(state.active)
            ok = stage(grid, context, state)
            self.last_parameters["stage_seconds"][name] = round(time.perf_counter() - started, 3)
            self.last_parameters["active_after_stage"][name] = len(state.active)
            if gone := (before or set(state.sampled)) - set(state.active):
                self.last_parameters.setdefault("dropped_at_stage", {})[name] = sorted(gone)
            if not ok:
                self.last_parameters["halted_at"] = name
                record = getattr(context.strategy, "record_halt", None)
                if record is not None and state.params is not None:  # who had sent a masked update, and why
                    record(state.results, state.failures)
                return

    # ------------------------------------------------------------ messaging
    def _exchange(self, grid, state: _RoundState, stage: str, records: dict[int, dict],
                  fitins: dict[int, RecordDict] | None = None) -> dict[int, ConfigRecord]:
        """Send each node its stage record; the valid replies' records by node. A node that fails or
        answers without a record drops out of the round."""
        messages = []
        for node, values in records.items():
            content = fitins[node] if fitins else RecordDict()
            content.config_records[wire.RECORD] = ConfigRecord({wire.STAGE: stage, **values})
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(state.rnd)))
        replies = grid.send_and_receive(messages, timeout=self.cfg.secagg_timeout)
        answered: dict[int, ConfigRecord] = {}
        self.last_replies: dict[int, Message] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                state.failures.append(Exception(reply.error))
            elif node in records and wire.RECORD in reply.content.config_records:
                answered[node] = reply.content.config_records[wire.RECORD]
                self.last_replies[node] = reply
        state.active = [n for n in state.active if n in answered]
        return answered

    def _enough(self, state: _RoundState, stage: str, needed: int) -> bool:
        if len(state.active) >= needed:
            return True
        log.error("secure aggregation halted at '%s': %d node(s) remain, %d are needed; no update is revealed",
                  stage, len(state.active), needed)
        self.last_parameters["needed"] = needed
        return False

    def _signed_by(self, node: int, blob: bytes, signature: bytes, kind: str) -> dict | None:
        """The statement's fields when `node`'s roster member signed it for this round, else None."""
        try:
            payload = wire.parse_statement(blob, kind)
            member = self.roster.member(payload["member"] if kind == "advertisement" else
                                        self._member_of[node])
            if verify(member.public_key, blob, signature.hex()) and payload["roster"] == self.roster.sha256:
                return payload
        except Exception:  # noqa: BLE001 (any malformed statement is dropped the same way)
            pass
        log.error("node %s sent an invalid %s; it is left out of this round", node, kind)
        return None

    # ------------------------------------------------------------ stages
    def _advertise(self, grid, context: LegacyContext, state: _RoundState) -> bool:
        parameters = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD],
                                                      keep_input=True)
        chosen = context.strategy.configure_fit(state.rnd, parameters, context.client_manager)
        if not chosen:
            return False
        state.fitins = {proxy.node_id: compat.fitins_to_recorddict(ins, True) for proxy, ins in chosen}
        state.proxies = {proxy.node_id: proxy for proxy, _ in chosen}
        state.sampled = state.active = sorted(state.fitins)
        n, colluders = len(state.sampled), self.roster.colluder_bound
        if problem := round_refusal(n, colluders):
            outcome = getattr(context.strategy, "outcome", None)
            if outcome is not None:
                outcome.error = f"{problem}; the round was not run and the global adapter is unchanged"
            log.error("round %d: %s", state.rnd, problem)
            return False
        state.params = derive_parameters(self.cfg, n, colluders)
        self.last_parameters.update({"nodes": n, **state.params.as_dict(),
                                     "dropout_tolerance": state.params.dropout_tolerance})
        log.info("secure sum over %d nodes: threshold %d, at least %d survivors (colluder bound %d)", n,
                 state.params.threshold, state.params.min_survivors, colluders)
        settings = wire.canonical(state.params.as_dict())
        records = {node: {wire.PARAMETERS: settings, wire.SAMPLE: list(state.sampled),
                          wire.RUN_CONFIG: wire.canonical(dict(ins.config_records["fitins.config"]))}
                   for node, ins in state.fitins.items()}
        self._member_of: dict[int, str] = {}
        for node, record in self._exchange(grid, state, wire.ADVERTISE, records).items():
            blob, signature = record.get(wire.STATEMENT), record.get(wire.SIGNATURE)
            ad = self._signed_by(node, blob, signature, "advertisement") if isinstance(blob, bytes) and \
                isinstance(signature, bytes) else None
            if ad is None or ad.get("node") != node or ad["member"] in self._member_of.values():
                state.active.remove(node)
                continue
            state.ads[node] = (blob, signature, ad)
            self._member_of[node] = ad["member"]
        return self._enough(state, wire.ADVERTISE, state.params.min_survivors)

    def _share_keys(self, grid, context, state: _RoundState) -> bool:
        u1 = list(state.active)
        records = {node: {wire.STATEMENTS: [state.ads[n][0] for n in u1],
                          wire.SIGNATURES: [state.ads[n][1] for n in u1]} for node in u1}
        sent: dict[int, dict[int, bytes]] = {}
        for node, record in self._exchange(grid, state, wire.SHARE_KEYS, records).items():
            destinations, sealed = record.get(wire.DESTINATIONS, []), record.get(wire.SEALED, [])
            if isinstance(destinations, list) and isinstance(sealed, list) and len(destinations) == len(sealed):
                sent[node] = dict(zip(destinations, sealed, strict=True))
        # A node that did not seal a share for every other advertiser is left out: every survivor must
        # hold the same set of peers' shares, or their signed views differ and no one unmasks.
        state.active = [n for n in state.active if n in sent and set(sent[n]) >= set(u1) - {n}]
        state.shared_keys = list(state.active)
        state.forward = {dst: [(src, sent[src][dst]) for src in state.active if src != dst] for dst in state.active}
        return self._enough(state, wire.SHARE_KEYS, state.params.min_survivors)

    def _collect(self, grid, context, state: _RoundState) -> bool:
        records = {node: {wire.SOURCES: [src for src, _ in state.forward[node]],
                          wire.SEALED: [blob for _, blob in state.forward[node]]} for node in state.active}
        fitins = {node: state.fitins[node] for node in state.active}
        replies = self._exchange(grid, state, wire.COLLECT, records, fitins)
        total = np.zeros(self.length, dtype=np.uint32)
        malformed = self.last_parameters.setdefault("malformed_replies", [])
        for node, record in replies.items():
            blob, signature = record.get(wire.STATEMENT), record.get(wire.SIGNATURE)
            try:
                vector = wire.vector_from(record.get(wire.MASKED), self.length)
                view = self._signed_by(node, blob, signature, "view")
                fitres = compat.recorddict_to_fitres(self.last_replies[node].content, keep_input=True)
            except (ValueError, TypeError, KeyError):
                view = None
            if view is None or view.get("node") != node:
                malformed.append(node)
                log.error("node %s sent a malformed masked update; it is left out of this round's sum", node)
                state.active.remove(node)
                continue
            total += vector  # wraps modulo 2^32
            state.views[node] = (blob, signature)
            state.results.append((state.proxies[node], fitres))
        state.masked_sum = total
        return self._enough(state, wire.COLLECT, state.params.min_survivors)

    def _consistency(self, grid, context, state: _RoundState) -> bool:
        u3 = list(state.active)
        records = {node: {wire.SURVIVORS: u3, wire.STATEMENTS: [state.views[n][0] for n in u3],
                          wire.SIGNATURES: [state.views[n][1] for n in u3]} for node in u3}
        for node, record in self._exchange(grid, state, wire.CONSISTENCY, records).items():
            signature = record.get(wire.SIGNATURE)
            if isinstance(signature, bytes) and self._signed_by(node, record.get(wire.STATEMENT), signature,
                                                                "consistency") is not None:
                state.consistency[node] = signature
            else:
                state.active.remove(node)
        state.active = [n for n in state.active if n in state.consistency]
        self.survivors = u3
        return self._enough(state, wire.CONSISTENCY, state.params.threshold)

    def _unmask(self, grid, context: LegacyContext, state: _RoundState) -> bool:
        signers = list(state.active)
        records = {node: {wire.SIGNERS: signers, wire.SIGNATURES: [state.consistency[n] for n in signers]}
                   for node in signers}
        point = {node: i + 1 for i, node in enumerate(sorted(state.ads))}  # each holder's Shamir point
        shares: dict[tuple[int, str], dict[int, bytes]] = {}
        for holder, record in self._exchange(grid, state, wire.UNMASK, records).items():
            owners, kinds, blobs = record.get(wire.OWNERS, []), record.get(wire.KINDS, []), record.get(wire.SHARES, [])
            for owner, kind, blob in zip(owners, kinds, blobs, strict=False):
                shares.setdefault((owner, kind), {})[point[holder]] = blob
        if not self._enough(state, wire.UNMASK, state.params.threshold):
            return False
        survivors, dropped = self.survivors, [n for n in state.shared_keys if n not in self.survivors]
        ctx = wire.context(self.roster.sha256, state.ads[survivors[0]][2]["run"], state.rnd)
        total = state.masked_sum
        t = state.params.threshold
        try:
            for owner in survivors:
                seed = masking.combine_shares(dict(list(shares[(owner, wire.SELF)].items())[:t]))
                label = masking.self_label(ctx, owner)
                if masking.commit(seed, label) != state.ads[owner][2]["seed_commitment"]:
                    raise ValueError(f"the self-mask seed of node {owner} did not rebuild (a wrong share)")
                total -= masking.mask_stream(seed, label, self.length)
            for owner in dropped:
                key = masking.combine_shares(dict(list(shares[(owner, wire.PAIR)].items())[:t]))
                if masking.public_of(key).hex() != state.ads[owner][2]["mask_key"]:
                    raise ValueError(f"the mask key of dropped node {owner} did not rebuild (a wrong share)")
                for node in survivors:
                    secret = masking.agree(key, bytes.fromhex(state.ads[node][2]["mask_key"]))
                    stream = masking.mask_stream(secret, masking.pair_label(ctx, node, owner), self.length)
                    if masking.pair_sign(node, owner) > 0:
                        total -= stream
                    else:
                        total += stream
        except (KeyError, ValueError) as exc:
            log.error("secure aggregation halted at 'unmask': %s; no update is revealed", exc)
            state.failures.append(Exception(f"unmask failed: {exc}"))
            return False
        weight = int(total[0])
        if weight <= 0:
            state.failures.append(Exception("the unmasked sum of weights is zero"))
            return False
        p = state.params
        if p.mode == "distributed":  # the noised sum of clipped gradients, in integer units: one federation step
            total_gradient = total[1:].view(np.int32).astype(np.float64) * (p.clip / p.scale)
            values = self.server_optimizer.step(total_gradient / (len(survivors) * self.cfg.batch_size))
        else:
            values = masking.dequantise_sum(total[1:], len(survivors), p.clip, p.levels) * (p.max_weight / weight)
        arrays, offset = [], 0
        for shape in self.sizes:
            size = int(np.prod(shape, dtype=np.int64))
            arrays.append(values[offset:offset + size].reshape(shape).astype(np.float32))
            offset += size
        self.last_parameters.update({"survivors": len(survivors), "dropped": len(dropped), "total_weight": weight})
        mean = ndarrays_to_parameters(arrays)
        for _, fitres in state.results:
            fitres.parameters, fitres.num_examples = mean, weight
        aggregated, metrics = context.strategy.aggregate_fit(state.rnd, state.results, state.failures)
        if aggregated:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(aggregated, True)
            context.history.add_metrics_distributed_fit(server_round=state.rnd, metrics=metrics)
        return True


def quantisation_error_bound(params: SumParameters, weights: list[int]) -> float:
    """Largest per-value error of the unmasked weighted mean of nodes with these weights (capped)."""
    step = 2 * params.clip / (params.levels - 1)
    return len(weights) * step * params.max_weight / sum(min(w, params.max_weight) for w in weights)


def load_run_roster(cfg: RunConfig) -> Roster:
    """The coordinator's copy of the federation roster (secagg-roster; in simulation SIM-DATA-DIR/roster.json)."""
    path = cfg.secagg_roster or (str(Path(cfg.sim_data_dir) / "roster.json") if cfg.sim_data_dir else "")
    if not path:
        raise ConfigError("secure aggregation needs the federation roster for its colluder bound: set the run config "
                          "'secagg-roster' to the roster file the nodes approved (`fedchat roster show` prints it).")
    return load_roster(path)
