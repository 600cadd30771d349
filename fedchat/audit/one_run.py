"""An empirical lower bound on epsilon from one training run (Steinke, Nasr, Jagielski 2023).

"Privacy Auditing with One (1) Training Run" (arXiv 2305.08846): m canaries, each put in
the training data by an independent fair coin. After training, the auditor guesses
"included" for some canaries and "excluded" for others, r guesses in all, fixed in advance,
and counts v correct. If training is (epsilon, delta)-DP, their Theorem 3 bounds the chance
of v or more correct guesses:

    P[W >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]

(with delta = 0 this is plain randomized response: each guess right with probability at
most e^eps / (1 + e^eps), independently). The lower bound at confidence 1 - p is the largest
epsilon that this p-value still rejects (p-value < p): the paper's numerical procedure
(its appendix code), here by bisection. An (epsilon, delta)-DP training run gives a bound
above its true epsilon with probability at most p.

The bound is limited by the number of guesses: r guesses all right give at most about
ln(r / ln(1/p)) (1.8 for r = 20, 3.5 for r = 100 at p = 0.05), so no audit with a few
hundred canaries can refute a claim of epsilon 8. Binomial tails are computed in numpy
from log-gamma, with no other dependency.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from shared.errors import ConfigError

EPS_MAX = 50.0  # beyond this e^-eps is below float64 resolution next to 1: "no DP at all"


def _check_counts(m: int, r: int, v: int) -> None:
    if not (isinstance(m, (int, np.integer)) and isinstance(r, (int, np.integer)) and isinstance(v, (int, np.integer))):
        raise ConfigError(f"canaries m, guesses r and correct guesses v must be integers (got {m!r}, {r!r}, {v!r}).")
    if not 0 <= v <= r <= m:
        raise ConfigError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m}): fewer guesses than "
                          "canaries, and no more correct guesses than guesses.")


def _binomial_pmf(r: int, epsilon: float) -> np.ndarray:
    """P[Binomial(r, e^eps / (1 + e^eps)) = k] for k = 0..r, from log-gamma (stable for large eps)."""
    k = np.arange(r + 1)
    log_q = -math.log1p(math.exp(-epsilon))  # log(e^eps / (1 + e^eps))
    log_1mq = -epsilon + log_q  # log(1 / (1 + e^eps))
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, r + 1)))))  # log k!, k = 0..r
    log_choose = log_fact[r] - log_fact[k] - log_fact[r - k]
    return np.exp(log_choose + k * log_q + (r - k) * log_1mq)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[v or more of r guesses correct] for any (epsilon, delta)-DP training (Theorem 3)."""
    _check_counts(m, r, v)
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ConfigError(f"need epsilon >= 0 and 0 <= delta <= 1 (got {epsilon!r}, {delta!r}).")
    pmf = _binomial_pmf(r, min(epsilon, EPS_MAX))
    tail = float(pmf[v:].sum())  # f(v)
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= Binomial < v], i = 1..v
    gaps = np.cumsum(pmf[:v][::-1])
    alpha = float(np.max(gaps / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that v correct of r guesses on m canaries refutes at `confidence`
    (0 when even epsilon 0 is not refuted), to 1e-6."""
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), e.g. 0.95 (got {confidence!r}).")
    if not 0 <= delta < 1:
        raise ConfigError(f"delta must be in [0, 1), e.g. 1e-5 (got {delta!r}).")
    p = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:  # p-value grows with epsilon; at EPS_MAX it is 1 unless v = 0
        lo, hi = hi, hi * 2
        if hi > EPS_MAX:
            return EPS_MAX
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------- guesses and their evaluation


def make_guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("included") for the k_plus lowest scores, -1 ("excluded") for the k_minus highest, 0 (abstain)
    for the rest. A score is trained loss minus base loss: the lower, the more the run learned it."""
    scores = np.asarray(scores, dtype=float)
    m = len(scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus == 0:
        raise ConfigError(f"--k-plus and --k-minus must be >= 0 and not both 0 (got {k_plus}, {k_minus}).")
    if k_plus + k_minus > m:
        raise ConfigError(f"--k-plus {k_plus} + --k-minus {k_minus} guesses exceed the {m} canaries: lower them.")
    if not np.all(np.isfinite(scores)):
        raise ConfigError("a canary's score is not finite (NaN or infinite loss): check the models.")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(m, dtype=int)
    guesses[order[:k_plus]] = 1
    if k_minus:
        guesses[order[-k_minus:]] = -1
    return guesses


@dataclass
class OneRunAudit:
    canaries: int
    included: int
    guesses: int  # r
    guessed_included: int  # k+
    guessed_excluded: int  # k-
    correct: int  # v
    correct_included: int
    correct_excluded: int
    delta: float
    confidence: float
    epsilon_lower: float

    def to_dict(self) -> dict:
        return asdict(self)


def audit_scores(scores: np.ndarray, included: np.ndarray, *, k_plus: int, k_minus: int, delta: float,
                 confidence: float = 0.95) -> OneRunAudit:
    """Guess from the scores, count the correct guesses against the coins, bound epsilon."""
    included = np.asarray(included, dtype=bool)
    if len(included) != len(scores):
        raise ConfigError(f"{len(scores)} scores for {len(included)} canaries: score every canary.")
    guesses = make_guesses(scores, k_plus, k_minus)
    right_in = int(np.sum((guesses == 1) & included))
    right_out = int(np.sum((guesses == -1) & ~included))
    r, v = int(np.count_nonzero(guesses)), right_in + right_out
    return OneRunAudit(len(scores), int(included.sum()), r, k_plus, k_minus, v, right_in, right_out, delta,
                       confidence, epsilon_lower_bound(len(scores), r, v, delta, confidence))


def rank_exposure(losses: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Exposure of each secret (Carlini et al., "The Secret Sharer", arXiv 1802.08232), rank-based:
    log2(candidates) - log2(rank of the secret's loss among the candidates), the candidates being
    the secret itself and every reference secret (same template and randomness, never trained on).
    0 when the secret ranks last, log2(len(reference) + 1) when it beats every reference."""
    losses, reference = np.asarray(losses, dtype=float), np.sort(np.asarray(reference, dtype=float))
    if len(reference) == 0:
        raise ConfigError("exposure needs reference secrets (excluded canaries): every canary was included.")
    rank = 1 + np.searchsorted(reference, losses, side="left")  # 1 + references with a lower loss
    return np.log2(len(reference) + 1) - np.log2(rank)


def draw_scores(ax, scores: np.ndarray, included: np.ndarray, guesses: np.ndarray, title: str) -> None:
    """Histogram of the scores of included and excluded canaries on `ax`, the guessed regions shaded."""
    scores, included, guesses = np.asarray(scores, dtype=float), np.asarray(included, bool), np.asarray(guesses)
    bins = np.linspace(scores.min(), scores.max(), 31) if scores.max() > scores.min() else 10
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"excluded ({int((~included).sum())})")
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"included ({int(included.sum())})")
    if np.any(guesses == 1):
        ax.axvspan(scores.min(), scores[guesses == 1].max(), color="green", alpha=0.08, label="guessed included")
    if np.any(guesses == -1):
        ax.axvspan(scores[guesses == -1].min(), scores.max(), color="red", alpha=0.08, label="guessed excluded")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("trained - base loss on the secret (negative = learned)")
    ax.set_ylabel("canaries")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def plot_scores(scores: np.ndarray, included: np.ndarray, guesses: np.ndarray, out, title: str) -> None:
    """`draw_scores` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    draw_scores(ax, scores, included, guesses, title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def audit_report(base_losses: np.ndarray, trained_losses: np.ndarray, included: np.ndarray, *, k_plus: int,
                 k_minus: int, delta: float, epsilon_claimed: float | None, confidence: float = 0.95) -> dict:
    """Everything `fedchat audit empirical` reports, from the canaries' secret losses under the base
    and the trained model: guesses, correct guesses, the bound, exposure, and the verdict (the bound
    must not exceed the claimed epsilon; with no claim there is nothing to refute)."""
    base_losses, trained_losses = np.asarray(base_losses, dtype=float), np.asarray(trained_losses, dtype=float)
    included = np.asarray(included, dtype=bool)
    scores = trained_losses - base_losses
    audit = audit_scores(scores, included, k_plus=k_plus, k_minus=k_minus, delta=delta, confidence=confidence)
    exposure = rank_exposure(trained_losses[included], trained_losses[~included]) if (~included).any() else None
    refuted = epsilon_claimed is not None and audit.epsilon_lower > epsilon_claimed
    return {
        **audit.to_dict(),
        "epsilon_claimed": epsilon_claimed,
        "verdict": "FAIL" if refuted else "OK",
        "exposure": None if exposure is None or not len(exposure) else {
            "reference": "excluded canaries (rank of each included secret's trained loss among theirs)",
            "references": int((~included).sum()), "max_possible": float(np.log2((~included).sum() + 1)),
            "mean": float(exposure.mean()), "median": float(np.median(exposure)), "max": float(exposure.max())},
        "score_mean_included": float(scores[included].mean()) if included.any() else None,
        "score_mean_excluded": float(scores[~included].mean()) if (~included).any() else None,
        "guesses_per_canary": make_guesses(scores, k_plus, k_minus).tolist(),
        "scores": scores.tolist(),
    }
