"""Which SecAgg+ graphs keep every node's update hidden: all-pairs, or sparse (Bell et al. 2020).

Flower's SecAgg+ puts a round's n sampled nodes on a ring in a random order (the stock
ServerApp shuffles them) and connects each to the (k - 1) / 2 nearest on either side: k is
``num_shares`` (the node and its k - 1 neighbours, the Harary graph H(k - 1, n)). A node
masks its update with one mask per neighbour and secret-shares its mask seed and its key
among them; any t of those k shares (the reconstruction threshold) rebuild either.

The coordinator, plus the nodes that collude with it, learns one honest node's update when

1. t of the node's neighbours collude: they hand over both its seed and its key; or
2. the honest nodes that sent a masked update fall apart in the graph once colluding and
   dropped nodes are taken out (the masks of dropped nodes are rebuilt, so they count as
   gone): each part's sum is then unmasked alone, and a part of one node is its update.
   On the ring this takes two runs of at least (k - 1) / 2 consecutive removed nodes.

**All-pairs** (k = n) with t a strict majority (t > n / 2) of the sample rules out both for
any minority of colluders, whatever the order: that is the guarantee without assumptions.
The same holds for any k > t > n / 2 (every node then has more than n / 2 neighbours).

**Sparse** (k < n, t a strict majority of the k shares): following Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS 2020), k can grow like
log n if at most a fraction ``colluding`` of the sample colludes and at most a fraction
``dropout`` drops out (each count rounded up), both fixed before the (random) order is drawn. ``failure_bounds``
gives, for Flower's ring, union bounds on the probability over that order of (1) + (2)
(privacy) and of a node left with fewer than t live neighbours (the round then halts:
no update is revealed). A sparse graph is acceptable when privacy fails with probability
at most 2**-40 and correctness at most 2**-20 (Bell et al. use the same two targets).
"""

from __future__ import annotations

from math import ceil, comb

SECURITY_BITS = 40  # privacy failure probability at most 2**-40 over the random graph
CORRECTNESS_BITS = 20  # a halted round (nothing revealed) at most 2**-20
ANY_MINORITY = 0.5  # a colluding fraction of 0.5 assumes only that colluders are a minority


def majority(count: int) -> int:
    """The smallest strict majority of `count`."""
    return count // 2 + 1


def _tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[X >= at_least] for X hypergeometric: `draws` of `population`, of which `marked` are marked."""
    top = min(marked, draws)
    if at_least > top:
        return 0.0
    at_least = max(at_least, 0)
    return sum(comb(marked, j) * comb(population - marked, draws - j)
               for j in range(at_least, top + 1)) / comb(population, draws)


def _all_removed(n: int, removed: int, positions: int) -> float:
    """Probability that `positions` given places of a random order of n all hold one of `removed` nodes."""
    p = 1.0
    for j in range(positions):
        p *= max(removed - j, 0) / (n - j)
    return p


def failure_bounds(n: int, k: int, t: int, colluding: float, dropout: float) -> tuple[float, float]:
    """(privacy, correctness) failure probabilities (union bounds) of a round of n nodes on Flower's
    SecAgg+ ring with k shares and threshold t, when at most ceil(colluding * n) nodes collude and
    at most ceil(dropout * n) drop out, both independent of the ring's random order."""
    bad, gone = ceil(colluding * n - 1e-9), ceil(dropout * n - 1e-9)
    neighbours, half = k - 1, (k - 1) // 2
    revealed_by_shares = n * _tail(n - 1, bad, neighbours, t)
    split = 0.0 if k >= n else n * n / 2 * _all_removed(n, bad + gone, 2 * half)
    # An active node needs t live shares of its seed, itself included; a dropped one t of its key, from others.
    halted = n * (_tail(n - 1, gone, neighbours, k - t + 1) + _tail(n - 1, gone - 1, neighbours, k - t))
    return min(1.0, revealed_by_shares + split), min(1.0, halted)


def any_minority_safe(n: int, k: int, t: int) -> bool:
    """Whether no minority of the n nodes, however placed, can unmask one node (needs no assumption)."""
    return 2 * t > n and k > t


def sparse_refusal(n: int, k: int, t: int, colluding: float, dropout: float) -> str | None:
    """Why a graph of k shares and threshold t for n nodes is not acceptable under these assumptions
    (None when it is): neither any-minority safe nor a sparse graph meeting the 2**-40 / 2**-20 targets."""
    if any_minority_safe(n, k, t):
        return None
    if colluding >= ANY_MINORITY:
        return (f"{k} shares with threshold {t} for {n} nodes hold only if fewer than half the nodes collude and "
                "they are placed at random; with secagg-colluding-fraction 0.5 (any minority) the threshold must be "
                f"a strict majority of the sample ({majority(n)} or more) with more shares than that")
    if 2 * t <= k:
        return f"threshold {t} is not a strict majority of the {k} shares ({majority(k)} or more)"
    privacy, correctness = failure_bounds(n, k, t, colluding, dropout)
    if privacy > 2.0 ** -SECURITY_BITS:
        return (f"{k} shares for {n} nodes: if {colluding:g} of them collude and {dropout:g} drop out, one update "
                f"is revealed with probability up to {privacy:.1e} (more than 2^-{SECURITY_BITS})")
    if correctness > 2.0 ** -CORRECTNESS_BITS:
        return (f"{k} shares with threshold {t} for {n} nodes: if {dropout:g} of them drop out, the round halts with "
                f"probability up to {correctness:.1e} (more than 2^-{CORRECTNESS_BITS})")
    return None


def sparse_shares(n: int, colluding: float, dropout: float) -> int | None:
    """The fewest shares (odd, fewer than n, threshold a majority of them) acceptable for n nodes under
    these assumptions; None when only all-pairs is (always so with colluding = 0.5)."""
    if colluding >= ANY_MINORITY:
        return None
    for k in range(3, n, 2):
        if sparse_refusal(n, k, majority(k), colluding, dropout) is None:
            return k
    return None
