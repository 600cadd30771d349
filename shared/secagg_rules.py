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

In distributed DP (dp-mode "distributed") the nodes send integers, not quantised floats: each node's clipped
gradient sum in units of ``scale`` per clipping norm, rounded at random, plus its Skellam noise share. The
scale is the largest power of two for which the sum cannot wrap around 2^32 except with probability below
2^-40: n nodes' Poisson samples each hold at most batch + t conversations (t from a Chernoff bound at 2^-45),
each adds at most ``scale`` per value, rounding adds less than 1 per node, and 64 units of ``scale`` are left
for the noise (11.5 standard deviations, 2^-45 per value over 2^25 values, of noise up to 5.5 times the
sensitivity).

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
    mode: str = "local"  # the DP mode: "distributed" sends integer gradient sums with noise shares
    scale: int = 0  # distributed: integer units per clipping norm

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
    distributed = cfg.dp and cfg.dp_mode == "distributed"
    return SumParameters(nodes=nodes, colluders=colluders, threshold=threshold_for(nodes, colluders),
                         min_survivors=survivors_needed(nodes, colluders),
                         levels=2 ** (MODULUS_BITS - math.ceil(math.log2(max(nodes, 2)))),
                         clip=float(cfg.dp_max_grad_norm if distributed else cfg.update_bound),
                         max_weight=int(cfg.secagg_max_weight), mode="distributed" if distributed else "local",
                         scale=integer_scale(nodes, cfg.batch_size) if distributed else 0)


def batch_bound(batch_size: int, bits: int = 45) -> int:
    """Conversations a Poisson sample of expected size `batch_size` exceeds with probability below 2^-bits
    (Chernoff: P[X >= m + t] <= exp(-t^2 / (2 (m + t / 3))))."""
    log_p = bits * math.log(2)
    t = (2 * log_p / 3 + math.sqrt((2 * log_p / 3) ** 2 + 8 * log_p * batch_size)) / 2
    return math.ceil(batch_size + t)


def integer_scale(nodes: int, batch_size: int, noise_room: int = 64) -> int:
    """Distributed DP's integer units per clipping norm: see the module docstring."""
    room = (2**31 - 1 - nodes) / (nodes * batch_bound(batch_size) + noise_room)
    return 2 ** int(math.floor(math.log2(room)))


def wrap_problem(nodes: int, batch_size: int, scale: int, noise_total: float, values: int,
                 bits: int = 40) -> str | None:
    """Why a distributed-DP sum of `values` values from `nodes` nodes could wrap around 2^32 with probability
    2^-bits or more once their Skellam shares total `noise_total` (None when it cannot). The scale leaves room
    for noise up to about 5.5 times the sensitivity; a stricter budget, more rounds or a smaller batch needs
    more, and a wrapped sum decodes to garbage, so a node refuses such a round before it sends anything.
    Bound: the gradients as in integer_scale, plus Bernstein's inequality for the Skellam noise (a difference
    of two Poisson sums, variance 2 * noise_total), P[|X| >= t] <= 2 exp(-t^2 / (2 (2 mu + t / 3))), at
    2^-(bits + 1) over all values."""
    log_p = (bits + 2) * math.log(2) + math.log(max(values, 1))
    tail = (2 * log_p / 3 + math.sqrt((2 * log_p / 3) ** 2 + 16 * log_p * noise_total)) / 2
    signal = nodes * (batch_bound(batch_size) * scale + 1)
    if signal + tail <= 2**31 - 1:
        return None
    return (f"the noise this round's {nodes} nodes would add (Skellam {noise_total:.3g} in all, {tail / scale:.1f} "
            f"clipping norms at its 2^-{bits} tail) does not fit the sum's {(2**31 - 1 - signal) / scale:.1f}: the "
            "sum could wrap around 2^32 and decode to garbage. Lower the noise each round needs: a larger "
            "batch-size, fewer rounds, or a larger target-epsilon / local-epsilon-cap")


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
