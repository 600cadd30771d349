"""A node's privacy budget: cumulative accounting, calibration, and the budget guard.

The accountant history is one (noise multiplier, sample rate, steps) triple per round
trained, read from the node's own privacy ledger on disk: epsilon is cumulative over
every round the node ever trained, across runs and restarts, and the ledger is the
single record of it. The maths is Opacus' (PRV or RDP).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from shared.errors import PrivacyError

_SIGMA_MAX = 1e4


def compute_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of a composition of subsampled Gaussian mechanisms (0 for none)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if not history:
        return 0.0
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
        raise PrivacyError(
            f"no noise level keeps epsilon within {target_epsilon}: the budget is already spent "
            f"(epsilon so far {compute_epsilon(history, delta, accountant):.3f})."
        )
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


@dataclass(frozen=True)
class RoundPlan:
    """What a node will spend if it trains this round."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_before: float
    epsilon_after: float


def check_delta(delta: float, num_conversations: int) -> None:
    if delta >= 1.0 / num_conversations:
        raise PrivacyError(
            f"target-delta {delta:g} is not below 1/n = 1/{num_conversations} = {1 / num_conversations:.3g}: "
            "with so few conversations such a delta allows leaking a whole record. "
            f"Lower target-delta below {1 / num_conversations:.1e}, or add data."
        )


def ledger_history(entries: list[dict]) -> list[tuple[float, float, int]]:
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]


def plan_round(entries: list[dict], run_id: str, *, target_epsilon: float, delta: float,
               num_conversations: int, batch_size: int, local_steps: int, rounds_left: int,
               accountant: str) -> RoundPlan:
    """Calibrate the noise for the run's planned participation, and price this round.

    `entries` is the node's ledger so far. The noise multiplier is calibrated once per
    run (the run's first ledger entry keeps it) so that training every remaining round
    fits what is left of the budget; the guard then prices the actual next round.
    """
    check_delta(delta, num_conversations)
    history = ledger_history(entries)
    sample_rate = min(1.0, batch_size / num_conversations)
    same_run = [e for e in entries if e["run"] == run_id]
    if same_run:
        sigma = float(same_run[0]["noise_multiplier"])
    else:
        try:
            sigma = calibrate_noise(target_epsilon, delta, sample_rate, local_steps * max(rounds_left, 1),
                                    history, accountant)
        except PrivacyError:
            sigma = math.inf  # nothing fits: the guard refuses below
    before = compute_epsilon(history, delta, accountant)
    after = math.inf if math.isinf(sigma) else compute_epsilon(
        history + [(sigma, sample_rate, local_steps)], delta, accountant)
    return RoundPlan(sigma, sample_rate, local_steps, before, after)


def fits_budget(plan: RoundPlan, target_epsilon: float) -> bool:
    # The PRV accountant's own estimate error is about 1e-2 relative; no slack on top.
    return plan.epsilon_after <= target_epsilon


def secure_seed() -> int:
    """A fresh seed for DP noise and Poisson sampling, unknown to anyone else."""
    return int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
