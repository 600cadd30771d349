"""Privacy accounting: the one place where (epsilon, delta) is computed, for the node and the auditor.

A history is one (noise multiplier, sample rate, steps) triple per round trained, oldest
first, as the privacy ledger records it. Epsilon is that of the composition of every
round (Opacus' PRV or RDP accountant), so it is cumulative over every round the node
ever trained. A round trained without DP has noise multiplier 0: any history holding
one has infinite epsilon.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

from shared.errors import PrivacyError

ACCOUNTANTS = ("prv", "rdp")
SIGMA_MAX = 1e4  # the most noise calibration chooses


def compute_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of a composition of subsampled Gaussian mechanisms (0 for none, inf if one had no noise)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)}.")
    if not history:
        return 0.0
    if any(float(s) <= 0 for s, _, _ in history):
        return math.inf  # a round without noise: nothing bounds what it revealed
    acc = {"prv": PRVAccountant, "rdp": RDPAccountant}[accountant]()
    acc.history = _grouped(history)
    try:
        eps = float(acc.get_epsilon(delta))
    except (ValueError, RuntimeError, OverflowError):
        return math.inf  # outside the accountant's numeric domain: far too little noise
    return eps if math.isfinite(eps) and eps >= 0 else math.inf


def _grouped(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The same composition with the rounds of one mechanism (noise multiplier, sample rate) taken together, as
    Opacus' own step() does for consecutive steps: the PRV accountant's cost grows with the entries it is given
    (about 0.8 s each on 2 cores), and a node's ledger holds a line per round, with one noise for all of a run's
    rounds. Composition does not depend on the order, so equal mechanisms anywhere in the history are merged."""
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        key = (float(s), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in steps.items()]


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    history: list[tuple[float, float, int]], accountant: str) -> float:
    """Smallest noise multiplier (to 0.1%) with which `steps` more steps keep epsilon <= target."""
    def eps_at(sigma: float) -> float:
        return compute_epsilon(history + [(sigma, sample_rate, steps)], delta, accountant)

    if eps_at(SIGMA_MAX) > target_epsilon:
        spent = compute_epsilon(history, delta, accountant)
        why = ("a round was trained without DP, so no budget is left" if math.isinf(spent)
               else f"the budget is already spent (epsilon so far {spent:.3f})")
        raise PrivacyError(f"no noise level keeps epsilon within {target_epsilon}: {why}.")
    lo, hi = 0.0, 1.0
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if eps_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def check_delta(delta: float, num_conversations: int) -> None:
    if delta >= 1.0 / num_conversations:
        raise PrivacyError(
            f"target-delta {delta:g} is not below 1/n = 1/{num_conversations} = {1 / num_conversations:.3g}: "
            "with so few conversations such a delta allows leaking a whole record. "
            f"Lower target-delta below {1 / num_conversations:.1e}, or add data."
        )


def ledger_history(entries: list[dict]) -> list[tuple[float, float, int]]:
    """The accountant history of ledger entries (a round without DP has noise 0)."""
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]


# ------------------------------------------------------------------ distributed DP: the Skellam mechanism
#
# In distributed DP each node adds a share of integer noise, Skellam(mu_i) per value (the difference of two
# Poisson(mu_i) draws), to its integer-rounded, clipped gradient sum, and only the secure sum is seen: its
# noise is Skellam(sum of the shares), exactly (Agarwal, Kairouz, Liu 2021, arXiv 2110.04995). Opacus'
# Gaussian accountants are no proof for integer noise; the bound here is the Skellam RDP of that paper
# (Theorem 3.5) under the general Poisson-subsampling RDP bound of Zhu and Wang 2019 (Theorem 6), composed
# over rounds and converted to (epsilon, delta) as Balle et al. 2020 (Opacus' and dp-accounting's rule).

RDP_ORDERS = tuple(range(2, 65)) + (72, 80, 96, 128, 192, 256)  # integer orders: Zhu and Wang's bound needs them


def skellam_rdp(alpha: int, mu: float, l2: float, l1: float) -> float:
    """RDP of order `alpha` of adding Skellam(mu) noise (variance 2 mu) to a query of integer values with L2
    sensitivity `l2` and L1 sensitivity `l1` (Agarwal, Kairouz, Liu 2021, Theorem 3.5)."""
    if mu <= 0:
        return math.inf
    return alpha * l2**2 / (4 * mu) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu))


def poisson_subsampled_rdp(alpha: int, q: float, rdp) -> float:
    """Upper bound on the RDP of order `alpha` (an integer >= 2) of a mechanism with RDP `rdp(j)` run on a
    Poisson sample at rate `q` (Zhu and Wang 2019, Theorem 6). `rdp` is a function of the order, or an array
    of its values at orders 2, 3, ..., alpha (or more)."""
    import numpy as np
    from scipy.special import gammaln, logsumexp

    if q <= 0:
        return 0.0
    j = np.arange(2, alpha + 1)
    inner = np.asarray(rdp[: alpha - 1], dtype=float) if not callable(rdp) else np.array([rdp(int(k)) for k in j])
    if q >= 1:
        return float(inner[-1])
    log_comb = gammaln(alpha + 1) - gammaln(j + 1) - gammaln(alpha - j + 1)
    terms = log_comb + j * math.log(q) + (alpha - j) * math.log1p(-q) + (j - 1) * inner
    terms[1:] += math.log(3)  # the terms from j = 3 on count three times
    first = (alpha - 1) * math.log1p(-q) + math.log(alpha * q - q + 1)
    return float(logsumexp(np.append(terms, first))) / (alpha - 1)


def subsampled_rdp_curve(q: float, rdp_values) -> dict[int, float]:
    """The subsampled RDP at every order of RDP_ORDERS, from the mechanism's RDP at orders 2..max."""
    return {a: poisson_subsampled_rdp(a, q, rdp_values) for a in RDP_ORDERS}


def rdp_epsilon(rdp_by_order: dict[int, float], delta: float) -> float:
    """(epsilon, delta)-DP from RDP at each order (Balle et al. 2020's conversion), the smallest over orders."""
    best = math.inf
    for alpha, rdp in rdp_by_order.items():
        if math.isfinite(rdp):
            eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
            best = min(best, max(eps, 0.0))
    return best


def rounding_sensitivity(scale: float, values: int) -> tuple[float, float]:
    """(L2, L1) sensitivity, in integer units, of one conversation's clipped gradient (L2 norm <= 1 before
    scaling by `scale`, the integer units per clipping norm) in a sum of `values` values rounded at random to
    integers: a coupled rounding moves each value by less than 1 more, so L2 <= scale + sqrt(values) and
    L1 <= sqrt(values) * scale + values, whatever the gradient (Kairouz, Liu, Steinke 2021)."""
    root = math.sqrt(values)
    return scale + root, root * scale + values


def skellam_rdp_curve(mu: float, l2: float, l1: float, q: float, steps: int) -> dict[int, float]:
    """RDP at every order of RDP_ORDERS of `steps` Poisson-subsampled Skellam mechanisms."""
    inner = [skellam_rdp(j, mu, l2, l1) for j in range(2, max(RDP_ORDERS) + 1)]
    return {a: steps * r for a, r in subsampled_rdp_curve(q, inner).items()}


def skellam_epsilon(history: list[tuple[float, float, float, float, int]], delta: float) -> float:
    """Epsilon of a composition of Poisson-subsampled Skellam mechanisms: `history` holds (mu, l2, l1,
    sample rate, steps) per round, mu the Skellam parameter of the noise counted on (0 or less: infinite)."""
    if not history:
        return 0.0
    if any(mu <= 0 for mu, *_ in history):
        return math.inf
    total = {a: 0.0 for a in RDP_ORDERS}
    for entry in history:
        for a, r in skellam_rdp_curve(*entry).items():
            total[a] += r
    return rdp_epsilon(total, delta)


def counted_noise(shares: list[float], colluders: int) -> float:
    """The Skellam parameter a node can count on in a secure sum of `shares` (one announced share per
    survivor, its own included): the smallest len - colluders - 1 of them, since the coordinator's colluders
    know theirs and an observing node knows its own (0 when no share is left to count)."""
    counted = len(shares) - colluders - 1
    return float(sum(sorted(shares)[:counted])) if counted > 0 else 0.0


def skellam_noise(mu: float, size: int, rng) -> np.ndarray:
    """`size` draws of Skellam(mu): the difference of two Poisson(mu) draws, from `rng` (a CSPRNG-seeded
    generator: client/train.dp_streams), as int64."""
    return rng.poisson(mu, size).astype("int64") - rng.poisson(mu, size).astype("int64")


def randomized_round(values: np.ndarray, rng) -> np.ndarray:
    """Each value to the integer below or above it, up with probability its fractional part: unbiased."""
    import numpy as np

    low = np.floor(values)
    return (low + (rng.random(values.shape) < values - low)).astype("int64")


def gaussian_rdp_curve(noise_multiplier: float, q: float, steps: int) -> dict[int, float]:
    """RDP at every order of RDP_ORDERS of `steps` Poisson-subsampled Gaussian mechanisms (Opacus' analysis)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    if noise_multiplier <= 0:
        return {a: math.inf for a in RDP_ORDERS}
    values = compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=list(RDP_ORDERS))
    return dict(zip(RDP_ORDERS, (float(v) for v in values)))


def ledger_epsilons(entries: list[dict], delta: float, accountant: str) -> tuple[float, float]:
    """(epsilon against an observer of the sums, epsilon of the node's own noise alone) of ledger entries.

    A ledger of local-DP rounds only gives the same number twice, from the chosen accountant. Once it holds a
    distributed-DP round, both compose every round in RDP: a local round's Gaussian noise protects either way,
    a distributed round counts the noise of the sum (`noise_counted`) or the node's own share (`noise_share`)."""
    if not any(e.get("dp_mode") == "distributed" for e in entries):
        eps = compute_epsilon(ledger_history(entries), delta, accountant)
        return eps, eps
    totals = []
    for counted in ("noise_counted", "noise_share"):
        total = {a: 0.0 for a in RDP_ORDERS}
        for e in entries:
            if e.get("dp_mode") == "distributed":
                curve = skellam_rdp_curve(float(e[counted]), float(e["l2_sensitivity"]), float(e["l1_sensitivity"]),
                                          float(e["sample_rate"]), int(e["steps"]))
            else:
                curve = gaussian_rdp_curve(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
            for a in RDP_ORDERS:
                total[a] += curve[a]
        totals.append(rdp_epsilon(total, delta))
    return totals[0], totals[1]
