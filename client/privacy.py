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

from shared.accounting import SIGMA_MAX, calibrate_noise, check_delta, compute_epsilon, ledger_history
from shared.errors import PrivacyError

__all__ = ["RoundPlan", "calibrate_noise", "check_delta", "compute_epsilon", "fits_budget", "ledger_history",
           "plan_round", "round_can_fit"]


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


def round_can_fit(entries: list[dict], run_id: str, *, target_epsilon: float, delta: float, num_conversations: int,
                  batch_size: int, local_steps: int, rounds_left: int, accountant: str) -> bool:
    """What `fits_budget(plan_round(...), target_epsilon)` answers, without calibrating (one or two evaluations
    of the accountant instead of a dozen): the question a node answers before a round, when fit() plans it.

    Epsilon grows with every step, so the next round fits whenever a whole plan for the rounds left does: the
    run's kept noise if it still covers them, or else the most noise calibration may choose (calibration
    fails exactly when that does not fit). fit() plans again under the ledger's lock and decides."""
    check_delta(delta, num_conversations)
    history = ledger_history(entries)
    sample_rate = min(1.0, batch_size / num_conversations)
    same_run = [e for e in entries if e["run"] == run_id]
    steps = local_steps * max(rounds_left, 1)

    def fits(sigma: float) -> bool:
        return compute_epsilon(history + [(sigma, sample_rate, steps)], delta, accountant) <= target_epsilon

    if same_run and rounds_left >= 1 and fits(float(same_run[-1]["noise_multiplier"])):
        return True
    return fits(SIGMA_MAX)


def fits_budget(plan: RoundPlan, target_epsilon: float) -> bool:
    # The PRV accountant's own estimate error is about 1e-2 relative; no slack on top.
    return plan.epsilon_after <= target_epsilon



@dataclass(frozen=True)
class DistributedPlan:
    """What a node adds and spends if it takes part in this distributed-DP round (one DP step of the federation)."""

    share: float  # the Skellam parameter of the noise this node adds
    counted: float  # the Skellam parameter it counts on in the sum: the smallest honest shares it cannot know
    l2: float  # sensitivities of one conversation, in the sum's integer units
    l1: float
    sample_rate: float
    epsilon_before: float  # against an observer of the sums
    epsilon_after: float
    local_before: float  # of the node's own noise alone
    local_after: float
    values: int  # the values of the sum (the exchanged tensors'): the planner's, and the wrap check's

    def ledger_fields(self) -> dict:
        return {"dp_mode": "distributed", "noise_share": self.share, "noise_counted": self.counted,
                "l2_sensitivity": self.l2, "l1_sensitivity": self.l1, "sample_rate": self.sample_rate, "steps": 1,
                "noise_multiplier": (2 * self.counted) ** 0.5 / self.l2, "epsilon": self.epsilon_after,
                "local_epsilon": self.local_after}


def plan_distributed_round(entries: list[dict], *, target_epsilon: float, local_cap: float, delta: float,
                           num_conversations: int, batch_size: int, rounds_left: int, scale: int, values: int,
                           counted_shares: int, accountant: str) -> DistributedPlan:
    """The noise share for this round: the smallest whose sum keeps the epsilon against an observer of the sums
    within `target_epsilon`, and whose share alone keeps the local epsilon within `local_cap`, over every round
    left of the run, when the node counts on `counted_shares` shares as large as its own (the rule is the same
    for every node; at the consistency stage it checks the shares the survivors announced)."""
    from shared.accounting import ledger_epsilons, rounding_sensitivity

    check_delta(delta, num_conversations)
    q = min(1.0, batch_size / num_conversations)
    l2, l1 = rounding_sensitivity(scale, values)
    rounds = max(rounds_left, 1)

    def entry(counted: float, share: float) -> dict:
        return {"dp_mode": "distributed", "noise_counted": counted, "noise_share": share, "l2_sensitivity": l2,
                "l1_sensitivity": l1, "sample_rate": q, "steps": rounds}

    def spent(share: float) -> tuple[float, float]:
        return ledger_epsilons(entries + [entry(counted_shares * share, share)], delta, accountant)

    def fits(share: float) -> bool:
        dist, local = spent(share)
        return dist <= target_epsilon and local <= local_cap

    before = ledger_epsilons(entries, delta, accountant)
    hi = l2**2
    while not fits(hi):
        hi *= 4
        if hi > 1e8 * l2**2:  # no noise fits: the budget is spent
            return DistributedPlan(math.inf, math.inf, l2, l1, q, before[0], math.inf, before[1], math.inf, values)
    lo = 0.0
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    one = {**entry(counted_shares * hi, hi), "steps": 1}
    after = ledger_epsilons(entries + [one], delta, accountant)
    return DistributedPlan(hi, counted_shares * hi, l2, l1, q, before[0], after[0], before[1], after[1], values)
