"""SecAgg+ for fedchat: protocol parameters chosen from the round's sample and the update scale.

Flower's SecAgg+ (``SecAggPlusWorkflow`` here, ``secaggplus_mod`` on nodes) masks every
update so the coordinator only ever learns the sum. Each node sends
``quantise(w/max_weight * update)`` plus pairwise and private masks, mod 2**32.

Parameters, per round, for n sampled nodes (each can be set in the run config):

* at least 3 contributing nodes (``SECAGG_MIN_NODES``): the sum of two updates is the
  other node's update to each of them, and the coordinator learns it from the next
  global model; a round with fewer nodes able to train fails before key sharing.
* shares: every sampled node (n); reconstruction threshold: a strict majority,
  n // 2 + 1, so no minority of colluding nodes with the coordinator can unmask one
  node (an honest node gives the coordinator either the mask seed or the key of another
  node, never both, and a majority is needed for each), and the round survives up to
  n - threshold dropouts. Explicit ``secagg-num-shares`` / ``secagg-reconstruction-threshold``
  never lower the threshold below that majority: a setting that would is refused.
  Nodes check the same rules themselves (client/secagg_guard.py).
* clipping range c: ``RunConfig.update_bound`` = 4 * learning-rate * local-steps, which
  AdamW updates never exceed; nodes clip to it and report what they clipped.
* quantisation range Q: 2**(31 - ceil(log2 n)), the most levels for which the sum of n
  quantised values (each < Q) stays below 2**31 and cannot wrap around the 2**32 modulus.

Quantisation error: each node's value is stochastically rounded to a step of 2c/Q
(unbiased, error < one step), so the aggregate (a weighted mean) is off by at most
``n * (2c/Q) / sum_i(w_i / max_weight)`` per value; ``quantisation_error_bound`` computes
it and the tests measure it.
"""

from __future__ import annotations

import math
import time

from flwr.server.workflow import SecAggPlusWorkflow

from shared.config import SECAGG_MIN_NODES, RunConfig
from shared.errors import ConfigError, FederationError

MODULUS = 2**32


def protocol_parameters(cfg: RunConfig, n: int) -> dict:
    """SecAgg+ settings for a round of `n` contributing nodes; refuses any that would expose one."""
    if n < SECAGG_MIN_NODES:
        raise FederationError(f"{n} node(s) can train this round; secure aggregation needs at least "
                              f"{SECAGG_MIN_NODES} (the sum of fewer updates reveals them): the round is not run.")
    majority = n // 2 + 1
    threshold = cfg.secagg_reconstruction_threshold or majority
    if threshold < majority:
        raise ConfigError(f"secagg-reconstruction-threshold={threshold} is not a strict majority of the {n} nodes of "
                          f"this round (at least {majority}): set it to 0 (automatic) or to {majority} or more.")
    shares = min(cfg.secagg_num_shares or n, n)
    if shares <= threshold and cfg.secagg_num_shares:
        raise ConfigError(f"secagg-num-shares={cfg.secagg_num_shares} is too few for a round of {n} nodes: the "
                          f"reconstruction threshold stays a strict majority ({threshold}) and needs more shares than "
                          f"that; set secagg-num-shares to 0 (every sampled node) or to {threshold + 1} or more.")
    if shares <= threshold:
        raise ConfigError(f"secagg-reconstruction-threshold={threshold} needs more than {threshold} nodes and this "
                          f"round has {n}: set it to 0 (automatic, {majority}) or run more nodes.")
    if shares < n and shares % 2 == 0:
        raise ConfigError(f"secagg-num-shares={shares} for a round of {n} nodes must be odd (each node shares with "
                          f"as many neighbours on either side): set it to 0 or to {shares + 1}.")
    q_range = cfg.secagg_quantization_range or 2 ** (31 - math.ceil(math.log2(n)))
    return {"num_shares": shares, "reconstruction_threshold": threshold,
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
        super().__call__(grid, context)

    def _timed(self, name: str, stage, grid, context, state) -> bool:
        started = time.perf_counter()
        ok = stage(grid, context, state)
        self.last_parameters["stage_seconds"][name] = round(time.perf_counter() - started, 3)
        self.last_parameters["active_after_stage"][name] = len(state.active_node_ids)
        if not ok:
            self.last_parameters["halted_at"] = name
        return ok

    # Each protocol stage, timed: where the round's time goes, and where a round halted.
    def setup_stage(self, grid, context, state):
        return self._timed("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid, context, state):
        return self._timed("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state):
        return self._timed("collect_masked_vectors", super().collect_masked_vectors_stage, grid, context, state)

    def unmask_stage(self, grid, context, state):
        return self._timed("unmask", super().unmask_stage, grid, context, state)
