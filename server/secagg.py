"""SecAgg+ for fedchat: protocol parameters chosen from the round's sample and the update scale.

Flower's SecAgg+ (``SecAggPlusWorkflow`` here, ``secaggplus_mod`` on nodes) masks every
update so the coordinator only ever learns the sum. Each node sends
``quantise(w/max_weight * update)`` plus pairwise and private masks, mod 2**32.

Parameters, per round, for n sampled nodes (each can be set in the run config):

* shares: every sampled node (n); reconstruction threshold: a strict majority,
  n // 2 + 1 (at least 2), so no minority of colluding nodes with the coordinator can
  unmask one node, and the round survives up to n - threshold dropouts.
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

from shared.config import RunConfig

MODULUS = 2**32


def protocol_parameters(cfg: RunConfig, n: int) -> dict:
    shares = cfg.secagg_num_shares or n
    threshold = cfg.secagg_reconstruction_threshold or max(2, n // 2 + 1)
    q_range = cfg.secagg_quantization_range or 2 ** (31 - math.ceil(math.log2(max(n, 2))))
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
        p = protocol_parameters(cfg, 3)
        super().__init__(num_shares=p["num_shares"], reconstruction_threshold=p["reconstruction_threshold"],
                         max_weight=p["max_weight"], clipping_range=p["clipping_range"],
                         quantization_range=p["quantization_range"], modulus_range=MODULUS,
                         timeout=cfg.secagg_timeout)
        self.cfg = cfg
        self.sample_size = sample_size  # () -> number of nodes the strategy samples this round
        self.last_parameters: dict = {}

    def __call__(self, grid, context) -> None:
        n = self.sample_size()
        p = protocol_parameters(self.cfg, n)
        # Flower takes an int share count > 2, or a float fraction of the sample.
        self.num_shares = p["num_shares"] if p["num_shares"] > 2 else 1.0
        self.reconstruction_threshold = p["reconstruction_threshold"]
        if isinstance(self.num_shares, int) and self.reconstruction_threshold >= self.num_shares:
            self.reconstruction_threshold = self.num_shares - 1
        self.quantization_range = p["quantization_range"]
        self.clipping_range = p["clipping_range"]
        self.last_parameters = {**p, "num_shares": n if self.num_shares == 1.0 else self.num_shares,
                                "reconstruction_threshold": self.reconstruction_threshold, "nodes": n,
                                "stage_seconds": {}, "active_after_stage": {}}
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
