"""The one parameter set of a secure sum, derived by rule, and the limits a node holds it to.

A masked sum only decodes when every node uses the same modulus, quantisation and clipping, and
it only protects a node when the threshold and the number of survivors suit the number of nodes
that may collude with the coordinator. So nothing here is chosen by the coordinator: the
parameters follow from the run config, the round's size n and the roster's colluder bound c, the
coordinator sends them inside the messages every node signs, and each node derives them again
and refuses any other value.

* modulus 2^32; ``levels`` = 2^(32 - ceil(log2 n)) quantisation levels, so the sum of n quantised
  values (each below ``levels``) never wraps around the modulus;
* clipping range: the run's update bound (4 * learning-rate * local-steps, or secagg-clipping-range);
* threshold t = floor((n + c) / 2) + 1 shares, also the quorum of the consistency round: two
  different survivor lists cannot both collect t signatures when at most c signers sign both, since
  2 (t - c) > n - c; and t > c, so colluders alone rebuild no secret;
* at least max(3, c + 2, t) survivors: the unmasked sum then holds at least two honest updates
  (c + 2) under the bound, and at least three updates (a node that knows its own and sees the sum of
  two learns the other).

Dropout tolerance, n - max(3, c + 2, t): with c = 0, 0 of 3, 2 of 5 and 9 of 20 nodes; with c = 1,
0 of 3, 1 of 5 and 9 of 20; with the largest minority (c = (n - 1) // 2), 0 of 3, 1 of 5, 5 of 20.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from shared.config import SECAGG_MIN_NODES, RunConfig

MODULUS_BITS = 32


@dataclass(frozen=True)
class SumParameters:
    nodes: int  # n: the nodes the round was sampled with
    colluders: int  # c: the roster's colluder bound
    threshold: int  # t: shares that rebuild a secret; quorum of the consistency round
    min_survivors: int
    levels: int  # quantisation levels per value
    clip: float  # |value| bound before quantisation
    max_weight: int  # a node's weight (training conversations) is capped at this
    modulus_bits: int = MODULUS_BITS

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def dropout_tolerance(self) -> int:
        return self.nodes - self.min_survivors


def threshold_for(nodes: int, colluders: int) -> int:
    return (nodes + colluders) // 2 + 1


def survivors_needed(nodes: int, colluders: int, min_nodes: int = SECAGG_MIN_NODES) -> int:
    return max(min_nodes, colluders + 2, threshold_for(nodes, colluders))


def derive_parameters(cfg: RunConfig, nodes: int, colluders: int) -> SumParameters:
    """The parameters of a round of `nodes` sampled nodes under a roster that allows `colluders`."""
    return SumParameters(nodes=nodes, colluders=colluders, threshold=threshold_for(nodes, colluders),
                         min_survivors=survivors_needed(nodes, colluders),
                         levels=2 ** (MODULUS_BITS - math.ceil(math.log2(max(nodes, 2)))),
                         clip=float(cfg.update_bound), max_weight=int(cfg.secagg_max_weight))


def round_refusal(nodes: int, colluders: int) -> str | None:
    """Why a round of `nodes` cannot hide an update when `colluders` may collude (None when it can)."""
    needed = survivors_needed(nodes, colluders)
    if nodes < needed:
        return (f"a round of {nodes} node(s) cannot hide one update when {colluders} roster member(s) may collude "
                f"with the coordinator: a secure sum needs at least {needed} surviving nodes")
    return None


def parameter_mismatch(sent: dict, expected: SumParameters) -> str | None:
    """The first parameter the coordinator sent that differs from the node's own derivation, said plainly."""
    mine = expected.as_dict()
    for key in sorted(set(mine) | set(sent)):
        if sent.get(key) != mine.get(key):
            return (f"the coordinator's '{key}' is {sent.get(key)!r}; this node derives {mine.get(key)!r} from the run "
                    "config, the round's size and its approved roster")
    return None
