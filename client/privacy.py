"""A node's privacy budget: cumulative accounting, calibration, and the budget guard.

The accountant history is one (noise multiplier, sample rate, steps) triple per round
trained, read from the node's own privacy ledger on disk: epsilon is cumulative over
every round the node ever trained, across runs and restarts, and the ledger is the
single record of it. The maths (Opacus' PRV or RDP) lives in shared/accounting.py, which the
auditor uses too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.accounting import calibrate_noise, check_delta, compute_epsilon, ledger_history
from shared.errors import PrivacyError

__all__ = ["RoundPlan", "calibrate_noise", "check_delta", "compute_epsilon", "fits_budget", "ledger_history",
           "plan_round"]


@dataclass(frozen=True)
class RoundPlan:
    """What a node will spend if it trains this round."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_before: float
    epsilon_after: float


def plan_round(entries: list[dict], run_id: str, *, target_epsilon: float, delta: float,
               num_conversations: int, batch_size: int, local_steps: int, rounds_left: int,
               accountant: str) -> RoundPlan:
    """Calibrate the noise for the run's planned participation, and price this round.

    `entries` is the node's ledger so far. The noise multiplier is calibrated once per
    run (the run's ledger entries keep it) so that training every remaining round fits
    what is left of the budget; the guard then prices the actual next round. A run that
    trained more rounds than it planned (a coordinator that stopped mid-round and resumed
    runs that round again, and the node has a line for each time) is calibrated again for
    the rounds it has left, with what is left of the budget: it goes on with more noise
    instead of running out before its last round, and never past the budget.
    """
    check_delta(delta, num_conversations)
    history = ledger_history(entries)
    sample_rate = min(1.0, batch_size / num_conversations)
    same_run = [e for e in entries if e["run"] == run_id]
    sigma = float(same_run[-1]["noise_multiplier"]) if same_run else None
    if sigma is not None and rounds_left >= 1 and compute_epsilon(
            history + [(sigma, sample_rate, local_steps * rounds_left)], delta, accountant) > target_epsilon:
        sigma = None  # the plan no longer fits the rounds left
    if sigma is None:
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

