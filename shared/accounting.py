"""Privacy accounting: the one place where (epsilon, delta) is computed, for the node and the auditor.

A history is one (noise multiplier, sample rate, steps) triple per round trained, oldest
first, as the privacy ledger records it. Epsilon is that of the composition of every
round (Opacus' PRV or RDP accountant), so it is cumulative over every round the node
ever trained. A round trained without DP has noise multiplier 0: any history holding
one has infinite epsilon.
"""

from __future__ import annotations

import math

from shared.errors import PrivacyError

ACCOUNTANTS = ("prv", "rdp")
_SIGMA_MAX = 1e4


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
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    try:
        eps = float(acc.get_epsilon(delta))
    except (ValueError, RuntimeError, OverflowError):
        return math.inf  # outside the accountant's numeric domain: far too little noise
    return eps if math.isfinite(eps) and eps >= 0 else math.inf


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    history: list[tuple[float, float, int]], accountant: str) -> float:
    """Smallest noise multiplier (to 0.1%) with which `steps` more steps keep epsilon <= target."""
    def eps_at(sigma: float) -> float:
        return compute_epsilon(history + [(sigma, sample_rate, steps)], delta, accountant)

    if eps_at(_SIGMA_MAX) > target_epsilon:
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
