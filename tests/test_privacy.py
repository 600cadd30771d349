"""DP accounting: calibration, accumulation across rounds and restarts, the budget guard."""

import ast
import math
from pathlib import Path

import pytest
import torch

from client.client_app import FedchatClient
from client.policy import RoundRefused
from client.privacy import calibrate_noise, check_delta, compute_epsilon, fits_budget, plan_round, round_can_fit
from shared import ledger
from shared.adapter import attach_adapter, exchanged_names, frozen_a_fingerprint, get_arrays
from shared.config import NodeConfig, RunConfig
from shared.errors import PrivacyError
from shared.model import load_model, resolve_base_model
from shared.protocol import fit_config
from tests.support.data import conversation, write_jsonl


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("eps,q,steps", [(1.0, 0.01, 100), (4.0, 0.02, 30), (8.0, 8 / 400, 30)])
def test_calibration_meets_the_target_tightly(accountant, eps, q, steps):
    sigma = calibrate_noise(eps, 1e-5, q, steps, [], accountant)
    reached = compute_epsilon([(sigma, q, steps)], 1e-5, accountant)
    assert reached <= eps
    assert reached > eps * 0.97  # not wastefully conservative
    assert compute_epsilon([(sigma * 0.97, q, steps)], 1e-5, accountant) > reached


def test_calibration_accounts_for_what_was_already_spent():
    spent = [(1.0, 0.02, 50)]
    before = compute_epsilon(spent, 1e-5, "prv")
    sigma = calibrate_noise(8.0, 1e-5, 0.02, 50, spent, "prv")
    assert compute_epsilon(spent + [(sigma, 0.02, 50)], 1e-5, "prv") <= 8.0
    assert sigma > calibrate_noise(8.0, 1e-5, 0.02, 50, [], "prv")  # less budget left: more noise
    assert before > 0


def test_delta_must_be_below_one_over_n():
    check_delta(1e-5, 1000)
    with pytest.raises(PrivacyError, match="not below 1/n = 1/50"):
        check_delta(0.05, 50)


def _entries(history, delta=1e-5, run="r1", accountant="prv"):
    out = []
    for i in range(len(history)):
        s, q, n = history[i]
        out.append({"run": run, "noise_multiplier": s, "sample_rate": q, "steps": n,
                    "epsilon": compute_epsilon(history[: i + 1], delta, accountant)})
    return out


def test_the_accounting_lives_in_shared_for_node_and_auditor():
    import client.privacy
    import fedchat.audit.ledger_audit
    import shared.accounting

    for name in ("compute_epsilon", "calibrate_noise", "ledger_history", "check_delta"):
        assert getattr(client.privacy, name) is getattr(shared.accounting, name)
    assert fedchat.audit.ledger_audit.ledger_epsilons is shared.accounting.ledger_epsilons
    for path in (Path(shared.accounting.__file__).parent).glob("*.py"):  # shared/ uses no role package
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("client", "server", "fedchat")], (path, names)
    assert math.isinf(compute_epsilon([(1.0, 0.02, 10), (0.0, 0.02, 10)], 1e-5, "prv"))  # a round without DP


def test_plan_round_keeps_the_runs_noise_and_prices_the_next_round():
    first = plan_round([], "r1", target_epsilon=8.0, delta=1e-5, num_conversations=400, batch_size=8,
                       local_steps=10, rounds_left=3, accountant="prv")
    assert first.epsilon_before == 0 and 0 < first.epsilon_after <= 8.0
    history = [(first.noise_multiplier, first.sample_rate, first.steps)]
    second = plan_round(_entries(history), "r1", target_epsilon=8.0, delta=1e-5, num_conversations=400,
                        batch_size=8, local_steps=10, rounds_left=2, accountant="prv")
    assert second.noise_multiplier == first.noise_multiplier  # calibrated once per run
    assert second.epsilon_before == pytest.approx(first.epsilon_after, rel=1e-6)
    assert second.epsilon_after > second.epsilon_before  # cumulative, never per round
    history += [history[0]] * 2
    fourth = plan_round(_entries(history), "r1", target_epsilon=8.0, delta=1e-5, num_conversations=400,
                        batch_size=8, local_steps=10, rounds_left=0, accountant="prv")
    assert not fits_budget(fourth, 8.0)  # a round beyond the planned three would overspend


def test_a_round_run_again_after_a_resume_is_paid_for_by_the_rounds_left():
    """A coordinator killed after the nodes trained round 1 resumes from its last checkpoint and runs round 1
    again: each node's ledger holds round 1 twice. The run still fits its budget: the rounds left get more noise,
    and the last round is not refused (tests.support.drill, fault 'coordinator-killed')."""
    kw = dict(target_epsilon=8.0, delta=1e-5, num_conversations=400, batch_size=8, local_steps=10, accountant="prv")
    first = plan_round([], "r1", rounds_left=2, **kw)
    twice = _entries([(first.noise_multiplier, first.sample_rate, first.steps)] * 2)  # round 1, then round 1 again
    on_plan = plan_round(twice[:1], "r1", rounds_left=1, **kw)
    assert on_plan.noise_multiplier == first.noise_multiplier  # on plan: the run's noise is kept
    last = plan_round(twice, "r1", rounds_left=1, **kw)
    assert fits_budget(last, 8.0) and last.epsilon_after <= 8.0
    assert last.noise_multiplier > first.noise_multiplier  # what is left, spread over the round left
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in twice]
    assert compute_epsilon(history + [(last.noise_multiplier, last.sample_rate, last.steps)], 1e-5, "prv") <= 8.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_a_ledgers_rounds_of_one_noise_compose_as_one_entry_of_their_steps(accountant):
    """compute_epsilon gives the accountant equal mechanisms taken together (a run's lines share one noise):
    the same epsilon as the accountant fed every line, interleaved runs included."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    lines = [(0.7, 0.2, 1)] * 4 + [(1.1, 0.05, 3)] + [(0.7, 0.2, 1)] * 2 + [(1.1, 0.05, 3)]
    per_line = {"prv": PRVAccountant, "rdp": RDPAccountant}[accountant]()
    per_line.history = list(lines)
    assert compute_epsilon(lines, 1e-5, accountant) == pytest.approx(per_line.get_epsilon(1e-5), rel=1e-6)
    assert compute_epsilon(lines[:-1], 1e-5, accountant) < compute_epsilon(lines, 1e-5, accountant)


def test_the_answer_before_a_round_is_the_plans_answer_without_calibrating(monkeypatch):
    """round_can_fit (get_properties) answers what fits_budget(plan_round(...)) (fit) does, in every case of the
    plan: a fresh run, a run on its plan, one whose kept noise no longer covers the rounds left, a round beyond
    the plan, an exhausted budget; and it evaluates the accountant at most twice."""
    kw = dict(delta=1e-5, num_conversations=400, batch_size=8, local_steps=10, accountant="rdp")
    first = plan_round([], "r1", target_epsilon=8.0, rounds_left=3, **kw)
    on_plan = _entries([(first.noise_multiplier, first.sample_rate, first.steps)] * 2, accountant="rdp")
    cases = [([], "r1", 8.0, 3), (on_plan[:1], "r1", 8.0, 2), (on_plan, "r1", 8.0, 1), (on_plan, "r1", 8.0, 0),
             (on_plan * 2, "r1", 8.0, 1), (on_plan, "r1", 3.0, 1), (on_plan, "r2", 8.0, 2),
             (_entries([(0.8, 0.02, 30)], accountant="rdp"), "r2", 0.5, 3)]
    answers = []
    for entries, run, target, left in cases:
        planned = fits_budget(plan_round(entries, run, target_epsilon=target, rounds_left=left, **kw), target)
        calls = []
        monkeypatch.setattr("client.privacy.compute_epsilon",
                            lambda *a, calls=calls, **k: calls.append(1) or compute_epsilon(*a, **k))
        answered = round_can_fit(entries, run, target_epsilon=target, rounds_left=left, **kw)
        monkeypatch.undo()
        assert answered == planned, (len(entries), run, target, left)
        assert len(calls) <= 2
        answers.append(answered)
    assert True in answers and False in answers


def test_a_lowered_budget_below_what_was_spent_refuses_every_round():
    entries = _entries([(0.8, 0.02, 30)])
    plan = plan_round(entries, "r2", target_epsilon=0.5, delta=1e-5, num_conversations=400, batch_size=8,
                      local_steps=10, rounds_left=3, accountant="prv")
    assert math.isinf(plan.epsilon_after) and not fits_budget(plan, 0.5)


def _fit(node: NodeConfig, cfg: RunConfig, rnd: int, run: str):
    """One real fit() of a node, as its ClientApp would run it (a new object = a restarted process)."""
    model = attach_adapter(load_model(resolve_base_model("tiny"), torch.device("cpu"), torch.float32), cfg)
    params = get_arrays(model, exchanged_names(model, cfg.aggregation))
    client = FedchatClient(node, secagg_active=False)
    return client.fit(params, fit_config(cfg, rnd, run, frozen_a_fingerprint(model)))


def test_epsilon_accumulates_across_rounds_and_restarts(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(f"q{i}", f"a{i}") for i in range(60)])
    node = NodeConfig(data_path=str(data), state_dir=str(tmp_path / "state"), node_name="n1", target_epsilon=4.0,
                      target_delta=1e-3, require_secagg=False)
    cfg = RunConfig(base_model="tiny", num_rounds=3, local_steps=2, batch_size=4, secagg=False)
    epsilons = []
    for rnd in (1, 2, 3):  # a fresh client object each round: the process restarted
        update, weight, metrics = _fit(node, cfg, rnd, "run-a")
        assert metrics["status"] == "ok" and weight > 0
        epsilons.append(metrics["epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 4.0
    entries = ledger.read_entries(tmp_path / "state" / "ledger.jsonl")
    assert [e["round"] for e in entries] == [1, 2, 3]
    assert len({e["noise_multiplier"] for e in entries}) == 1
    # A fourth round the run did not plan is paid for by what is left of the budget (client.privacy.plan_round):
    # far more noise, and never past the budget.
    _, _, metrics = _fit(node, cfg.replace(num_rounds=4), 4, "run-a")
    entries = ledger.read_entries(tmp_path / "state" / "ledger.jsonl")
    assert len(entries) == 4 and entries[3]["noise_multiplier"] > entries[0]["noise_multiplier"]
    assert epsilons[-1] <= metrics["epsilon"] <= 4.0


def test_a_node_that_trains_without_dp_records_it_and_spends_its_whole_budget(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(f"q{i}", f"a{i}") for i in range(60)])
    node = NodeConfig(data_path=str(data), state_dir=str(tmp_path / "state"), node_name="n1", target_epsilon=4.0,
                      target_delta=1e-3, require_secagg=False, require_dp=False)
    cfg = RunConfig(base_model="tiny", num_rounds=2, local_steps=1, batch_size=4, secagg=False)
    _fit(node, cfg.replace(dp=False), 1, "plain")
    entry, = ledger.read_entries(tmp_path / "state" / "ledger.jsonl")
    assert entry["noise_multiplier"] == 0 and entry["epsilon"] is None  # never invisible
    with pytest.raises(RoundRefused, match="past its budget"):  # epsilon is infinite: no DP round can follow
        _fit(node, cfg, 1, "private")


def test_node_refuses_rounds_its_operator_did_not_allow(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(f"q{i}", f"a{i}") for i in range(20)])
    node = NodeConfig(data_path=str(data), state_dir=str(tmp_path / "s"))
    with pytest.raises(RoundRefused, match="requires DP"):
        _fit(node, RunConfig(base_model="tiny", dp=False, secagg=False), 1, "r")
    with pytest.raises(RoundRefused, match="requires secure aggregation"):
        _fit(node, RunConfig(base_model="tiny", secagg=False), 1, "r")
    with pytest.raises(RoundRefused, match="PrivacyError"):  # the reason stays in the node's log
        _fit(node.replace(target_delta=0.1, require_secagg=False), RunConfig(base_model="tiny", secagg=False), 1, "r")
