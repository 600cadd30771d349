"""SecAgg+ for fedchat: protocol parameters chosen from the round's sample and the update scale.

Flower's SecAgg+ (``SecAggPlusWorkflow`` here, ``secaggplus_mod`` on nodes) masks every
update so the coordinator only ever learns the sum. Each node sends
``quantise(w/max_weight * update)`` plus pairwise and private masks, mod 2**32.

Parameters, per round, for n sampled nodes (each can be set in the run config):

* at least 3 contributing nodes (``SECAGG_MIN_NODES``): the sum of two updates is the
  other node's update to each of them, and the coordinator learns it from the next
  global model; a round with fewer nodes able to train fails before key sharing.
* graph: every sampled node shares keys with every other (k = n shares) and the
  reconstruction threshold is a strict majority, n // 2 + 1, so no minority of colluding
  nodes with the coordinator can unmask one node (an honest node gives the coordinator
  either the mask seed or the key of another node, never both, and a majority is needed
  for each), and the round survives up to n - threshold dropouts. From
  ``secagg-sparse-from`` nodes, when the run assumes fewer colluders than any minority
  (``secagg-colluding-fraction`` below 0.5), a sparse graph: the fewest shares k (about
  log n, Bell et al. 2020) that keep one update hidden except with probability 2**-40 when
  at most that fraction colludes and ``secagg-dropout-fraction`` drops out, threshold a
  strict majority of the k shares (shared/secagg_graph.py). Explicit ``secagg-num-shares``
  / ``secagg-reconstruction-threshold`` are refused unless they meet the same rules.
  Nodes check them too, under their own assumptions (client/secagg_guard.py).
* clipping range c: ``RunConfig.update_bound`` = 4 * learning-rate * local-steps, which
  AdamW updates never exceed; nodes clip to it and report what they clipped.
* quantisation range Q: 2**(31 - ceil(log2 n)), the most levels for which the sum of n
  quantised values (each < Q) stays below 2**31 and cannot wrap around the 2**32 modulus.

Bytes: nodes send their masked update as uint32 (shared/secagg_wire.py), the size of a
float32 update; Flower's sum of them wraps modulo 2**32, the protocol's own arithmetic, and
its unmask stage widens to int64 when it subtracts the masks. A reply whose masked arrays are
not the round's shapes is dropped before that sum (the node then counts as dropped out and
its masks are rebuilt), so one malformed reply cannot break the round.

Quantisation error: each node's value is stochastically rounded to a step of 2c/Q
(unbiased, error < one step), so the aggregate (a weighted mean) is off by at most
``n * (2c/Q) / sum_i(w_i / max_weight)`` per value; ``quantisation_error_bound`` computes
it and the tests measure it.
"""

from __future__ import annotations

import logging
import math
import time

from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

from shared.config import SECAGG_MIN_NODES, RunConfig
from shared.errors import ConfigError, FederationError
from shared.secagg_graph import any_minority_safe, failure_bounds, majority, sparse_refusal, sparse_shares
from shared.secagg_wire import shapes

log = logging.getLogger("fedchat.coordinator")

MODULUS = 2**32


def protocol_parameters(cfg: RunConfig, n: int) -> dict:
    """SecAgg+ settings for a round of `n` contributing nodes; refuses any that would expose one."""
    if n < SECAGG_MIN_NODES:
        raise FederationError(f"{n} node(s) can train this round; secure aggregation needs at least "
                              f"{SECAGG_MIN_NODES} (the sum of fewer updates reveals them): the round is not run.")
    colluding, dropout = cfg.secagg_colluding_fraction, cfg.secagg_dropout_fraction
    explicit = cfg.secagg_num_shares or cfg.secagg_reconstruction_threshold
    sparse = None if explicit or n < cfg.secagg_sparse_from else sparse_shares(n, colluding, dropout)
    shares = min(cfg.secagg_num_shares or sparse or n, n)
    if shares < n and shares % 2 == 0:
        raise ConfigError(f"secagg-num-shares={shares} for a round of {n} nodes must be odd (each node shares with "
                          f"as many neighbours on either side): set it to 0 or to {shares + 1}.")
    # A threshold that is a majority of the whole round holds against any minority; a sparse graph's is a majority
    # of its shares (an explicit secagg-num-shares gets the former where it can).
    threshold = cfg.secagg_reconstruction_threshold or (
        majority(n) if majority(n) < shares and not sparse else majority(shares))
    if shares <= threshold:
        raise ConfigError(f"a reconstruction threshold of {threshold} needs more than {threshold} key shares, and this "
                          f"round of {n} nodes has {shares}: set secagg-num-shares and "
                          "secagg-reconstruction-threshold to 0 (automatic), or run more nodes.")
    problem = sparse_refusal(n, shares, threshold, colluding, dropout)
    if problem:
        raise ConfigError(f"secagg-num-shares={cfg.secagg_num_shares} / secagg-reconstruction-threshold="
                          f"{cfg.secagg_reconstruction_threshold} could expose one node's update: {problem}. Set "
                          "both to 0 (automatic), or state the assumption with secagg-colluding-fraction.")
    privacy, correctness = failure_bounds(n, shares, threshold, colluding, dropout)
    q_range = cfg.secagg_quantization_range or 2 ** (31 - math.ceil(math.log2(n)))
    return {"num_shares": shares, "reconstruction_threshold": threshold,
            "graph": "all-pairs" if shares == n else "sparse",
            "assumption": ("any minority colludes" if any_minority_safe(n, shares, threshold) else
                           f"at most {colluding:g} collude, {dropout:g} drop out"),
            "privacy_failure_bound": 0.0 if any_minority_safe(n, shares, threshold) else privacy,
            "halt_bound": correctness,
            "clipping_range": cfg.update_bound, "quantization_range": q_range,
            "max_weight": float(cfg.secagg_max_weight)}


def quantisation_error_bound(cfg: RunConfig, weights: list[int], sampled: int | None = None) -> float:
    """Largest per-value error of the unmasked weighted mean of the surviving nodes' updates."""
    p = protocol_parameters(cfg, sampled or len(weights))
    step = 2 * p["clipping_range"] / p["quantization_range"]
    return len(weights) * step / (sum(weights) / p["max_weight"])


class FedchatSecAgg(SecAggPlusWorkflow):
    """SecAgg+ whose parameters are set each round from the number of sampled nodes."""

    def __init__(self, cfg: RunConfig, sample_size) -> None:
        # Placeholders Flower accepts; every value is set from the round's sample in __call__.
        super().__init__(num_shares=1.0, reconstruction_threshold=1.0, max_weight=float(cfg.secagg_max_weight),
                         clipping_range=cfg.update_bound, quantization_range=MODULUS // 2, modulus_range=MODULUS,
                         timeout=cfg.secagg_timeout)
        self.cfg = cfg
        self.sample_size = sample_size  # () -> number of nodes the strategy samples this round
        self.last_parameters: dict = {}

    def __call__(self, grid, context) -> None:
        n = self.sample_size()
        self.last_parameters = {"nodes": n, "stage_seconds": {}, "active_after_stage": {}}
        if n >= SECAGG_MIN_NODES:  # with fewer, the strategy's configure_fit refuses the round before setup
            p = protocol_parameters(self.cfg, n)
            # As ints, exactly as computed: Flower would read a float as a fraction of the sample.
            self.num_shares, self.reconstruction_threshold = p["num_shares"], p["reconstruction_threshold"]
            self.quantization_range = p["quantization_range"]
            self.clipping_range = p["clipping_range"]
            self.last_parameters.update(p)
            log.info("SecAgg+ over %d nodes: %s graph, %d key shares each, threshold %d (%s)", n, p["graph"],
                     p["num_shares"], p["reconstruction_threshold"], p["assumption"])
        super().__call__(grid, context)

    def _timed(self, name: str, stage, grid, context, state) -> bool:
        started = time.perf_counter()
        before = set(state.active_node_ids)
        ok = stage(grid, context, state)
        self.last_parameters["stage_seconds"][name] = round(time.perf_counter() - started, 3)
        self.last_parameters["active_after_stage"][name] = len(state.active_node_ids)
        gone = (before or set(state.sampled_node_ids)) - set(state.active_node_ids)  # setup starts from none
        if gone:
            self.last_parameters.setdefault("dropped_at_stage", {})[name] = sorted(gone)
        if not ok:
            self.last_parameters["halted_at"] = name
            record = getattr(context.strategy, "record_halt", None)
            if record is not None:  # who had sent a masked update, and why nodes failed, for the report
                record(state.legacy_results, state.failures)
        return ok

    # Each protocol stage, timed: where the round's time goes, and where a round halted.
    def setup_stage(self, grid, context, state):
        return self._timed("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid, context, state):
        return self._timed("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state):
        arrays = context.state.array_records[MAIN_PARAMS_RECORD].values()  # legacy arrays: npy bytes, no shape
        expected = [(1,)] + [shape for _, shape in shapes([a.data for a in arrays])]
        checked = _WellFormedReplies(grid, expected, self.last_parameters.setdefault("malformed_replies", []))
        return self._timed("collect_masked_vectors", super().collect_masked_vectors_stage, checked, context, state)

    def unmask_stage(self, grid, context, state):
        return self._timed("unmask", super().unmask_stage, grid, context, state)


class _WellFormedReplies:
    """The grid, for the collect stage: replies whose masked arrays are not uint32 or int64 arrays of the
    round's shapes (the weight factor, then each tensor) are left out, as if the node had dropped."""

    def __init__(self, grid, expected: list[tuple[int, ...]], malformed: list[int]) -> None:
        self._grid, self._expected, self._malformed = grid, expected, malformed

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return [m for m in self._grid.send_and_receive(messages, timeout=timeout) if self._well_formed(m)]

    def _well_formed(self, reply: Message) -> bool:
        if reply.has_error():
            return True  # Flower counts it as a failure
        try:
            masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            found = shapes(masked)
            ok = [s for _, s in found] == self._expected and all(d.name in ("uint32", "int64") for d, _ in found)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            node = reply.metadata.src_node_id
            self._malformed.append(node)
            log.error("node %s sent a malformed masked update; it is left out of this round's sum", node)
        return ok
