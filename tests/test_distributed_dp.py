"""Distributed DP's mathematics: the Skellam mechanism's accounting, its noise, and the integer rounding.

The references: dp-accounting (Google's DP accounting library, from the package index) for the
Poisson-subsampled Gaussian mechanism, which the Skellam mechanism approaches at large scale, and scipy's
Skellam distribution for the sum of noise shares.
"""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from shared import secagg_wire as wire
from shared.accounting import (
    RDP_ORDERS,
    counted_noise,
    poisson_subsampled_rdp,
    randomized_round,
    rdp_epsilon,
    rounding_sensitivity,
    skellam_epsilon,
    skellam_noise,
    skellam_rdp,
)

GRID = [(1.0, 0.05, 30), (0.8, 0.01, 100), (2.0, 0.2, 10), (0.6, 0.05, 6), (1.5, 0.5, 3)]


def _gaussian_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(("z", "q", "steps"), GRID)
def test_skellam_at_large_scale_matches_the_subsampled_gaussian_bound_and_never_undercuts_it(z, q, steps):
    delta = 1e-5
    l2, l1 = rounding_sensitivity(2**22, 460_800)
    mu = (z * l2) ** 2 / 2  # the same variance as Gaussian noise of multiplier z
    skellam = skellam_epsilon([(mu, l2, l1, q, steps)], delta)
    # The same subsampling bound over the Gaussian's RDP: Skellam's extra terms vanish at this scale.
    gaussian_zw = rdp_epsilon({a: steps * poisson_subsampled_rdp(a, q, lambda j: j / (2 * z * z))
                               for a in RDP_ORDERS}, delta)
    exact_gaussian = _gaussian_epsilon(z, q, steps, delta)
    assert skellam == pytest.approx(gaussian_zw, rel=1e-3)
    # The general subsampling bound is conservative: never below the exact subsampled Gaussian's epsilon.
    assert exact_gaussian <= skellam <= 1.6 * exact_gaussian


def test_the_subsampling_bound_is_the_mechanism_at_rate_one_and_nothing_at_rate_zero():
    rdp = lambda j: skellam_rdp(j, 50.0, 3.0, 9.0)  # noqa: E731
    assert poisson_subsampled_rdp(8, 1.0, rdp) == rdp(8)
    assert poisson_subsampled_rdp(8, 0.0, rdp) == 0.0
    assert poisson_subsampled_rdp(8, 0.1, rdp) < rdp(8)


def test_skellam_at_small_scale_costs_more_than_a_gaussian_of_the_same_variance():
    l2, l1 = rounding_sensitivity(4.0, 100)  # coarse rounding: the integer terms matter
    mu = (1.0 * l2) ** 2 / 2
    for alpha in (2, 8, 32):
        assert skellam_rdp(alpha, mu, l2, l1) > alpha * l2**2 / (2 * 2 * mu)
    assert skellam_epsilon([(0.0, l2, l1, 0.1, 1)], 1e-5) == math.inf  # no noise counted: no guarantee


def test_epsilon_composes_over_rounds_and_grows_with_each():
    l2, l1 = rounding_sensitivity(2**20, 1000)
    mu = (1.2 * l2) ** 2 / 2
    one = skellam_epsilon([(mu, l2, l1, 0.05, 10)], 1e-5)
    two = skellam_epsilon([(mu, l2, l1, 0.05, 10)] * 2, 1e-5)
    assert one < two < 2 * one + 1e-9
    assert two == pytest.approx(skellam_epsilon([(mu, l2, l1, 0.05, 20)], 1e-5), rel=1e-9)


def test_the_sum_of_h_skellam_shares_is_skellam_of_h_times_the_parameter():
    rng = np.random.Generator(np.random.PCG64DXSM(12345))
    h, mu, size = 5, 3.0, 200_000
    total = sum(skellam_noise(mu, size, rng) for _ in range(h))
    values, counts = np.unique(total, return_counts=True)
    expected = stats.skellam.pmf(values, h * mu, h * mu) * size
    keep = expected >= 5  # chi-square over the cells with enough mass
    chi2 = float((((counts - expected) ** 2) / expected)[keep].sum())
    dof = int(keep.sum()) - 1
    assert stats.chi2.sf(chi2, dof) > 1e-4, f"chi2 {chi2:.1f} on {dof} degrees of freedom"
    assert total.std() == pytest.approx(math.sqrt(2 * h * mu), rel=0.01)  # the planned noise std


def test_randomized_rounding_is_unbiased():
    rng = np.random.Generator(np.random.PCG64DXSM(7))
    values = np.array([0.25, -1.75, 3.5, 1e6 + 0.125])
    draws = np.stack([randomized_round(values, rng) for _ in range(40_000)])
    assert np.allclose(draws.mean(axis=0), values, atol=0.02)
    assert set(np.unique(draws[:, 0])) <= {0, 1}


def test_the_rounding_sensitivity_holds_for_adversarial_gradients():
    """Neighbouring sums differ by one clipped gradient (norm <= scale); a coupled rounding (one uniform draw
    per value for both) never moves them further apart than the bound, whichever way the fractions fall."""
    rng = np.random.Generator(np.random.PCG64DXSM(11))
    scale, d = 50.0, 400
    l2, l1 = rounding_sensitivity(scale, d)
    for trial in range(200):
        base = rng.normal(0, 1e3, d) + 0.5  # fractional parts where rounding is most uncertain
        if trial % 2:  # all the gradient in one value, or spread evenly: the extremes of L1 and L2
            g = np.zeros(d)
            g[trial % d] = scale
        else:
            g = np.full(d, scale / math.sqrt(d)) * rng.choice([-1, 1], d)
        u = rng.random(d)
        rounded = np.floor(base + u)
        neighbour = np.floor(base + g + u)
        diff = neighbour - rounded
        assert np.linalg.norm(diff) <= l2 + 1e-9
        assert np.abs(diff).sum() <= l1 + 1e-9


def test_a_node_counts_only_the_shares_of_honest_nodes_it_does_not_know():
    shares = [5.0, 1.0, 3.0, 4.0, 2.0]  # five survivors' announced shares
    assert counted_noise(shares, colluders=1) == 1.0 + 2.0 + 3.0  # the smallest 5 - 1 - 1
    assert counted_noise(shares, colluders=0) == 1.0 + 2.0 + 3.0 + 4.0
    assert counted_noise(shares[:2], colluders=1) == 0.0  # nothing to count on: the node must refuse


# ------------------------------------------------------------------ distributed DP inside the secure sum


def _planner(needs: dict[str, float]):
    """A planner as client.client_app's, with a fixed need per node (its data and ledger stand behind it there)."""
    from client.privacy import DistributedPlan

    def plan(node, cfg, meta, counted_shares, scale):
        need = needs[node.node_name]
        return DistributedPlan(need / counted_shares, need, 1.0, 1.0, 0.1, 0.0, 1.0, 0.0, 2.0, 34)

    return plan


def _distributed(tmp_path, n=5, colluders=0, needs=None):
    from shared.config import RunConfig
    from tests.support.secagg_federation import Federation

    cfg = RunConfig(dp=True, secagg=True, dp_mode="distributed", batch_size=10, dp_max_grad_norm=0.5,
                    learning_rate=0.01)
    needs = needs or {f"org-{i + 1}": 100.0 * (i + 1) for i in range(n)}
    fed = Federation(tmp_path, n, colluders=colluders, cfg=cfg, plan_share=_planner(needs))
    rng = np.random.default_rng(3)
    for node in fed.nodes.values():  # integers, as a node's rounded gradient sum plus noise; some near +-2^31
        node.update = [rng.integers(-(2**28), 2**28, s) for s in ((6, 4), (10,))]
        node.update[1][0] = 2**31 // n - 1 if node.node_id % 2 else -(2**31 // n) + 1
    return fed


class _Recording:
    """The coordinator's optimizer, recording the mean gradient it is handed."""

    def __init__(self):
        self.grads = []

    def step(self, grad):
        self.grads.append(grad)
        return np.zeros_like(grad)


def test_the_unmasked_signed_sum_is_the_exact_integer_sum_near_the_modulus_and_with_dropouts(tmp_path):
    from server.secagg_workflow import SecureAggregation

    fed = _distributed(tmp_path)
    gone = sorted(fed.nodes)[-1]
    recording = _Recording()

    class Drop(SecureAggregation):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.server_optimizer = recording

        def _collect(self, grid, context, state):
            grid.offline = {gone}
            return super()._collect(grid, context, state)

    _, workflow = fed.run(Drop)
    survivors = [n for n in sorted(fed.nodes) if n != gone]
    exact = sum(np.concatenate([u.ravel() for u in fed.nodes[n].update]).astype(np.int64) for n in survivors)
    params = workflow.last_parameters
    got = recording.grads[0] * (len(survivors) * fed.cfg.batch_size) * params["scale"] / params["clip"]
    assert np.array_equal(np.rint(got).astype(np.int64), exact)
    assert params["mode"] == "distributed" and params["dropped"] == 1


def test_every_node_adds_at_least_the_largest_need_and_counts_only_honest_shares(tmp_path):
    from server.secagg_workflow import SecureAggregation
    from tests.support.secagg_federation import Federation  # noqa: F401 (the harness the helper builds on)

    fed = _distributed(tmp_path, n=5, colluders=1, needs={"org-1": 800.0, "org-2": 100.0, "org-3": 100.0,
                                                           "org-4": 100.0, "org-5": 100.0})
    plans = {}

    class Record(SecureAggregation):
        def _collect(self, grid, context, state):
            ok = super()._collect(grid, context, state)
            for node in fed.nodes.values():
                plans[node.name] = json.loads(node.context.state.config_records["fedchat.secagg.state"]["json"])["plan"]
            return ok

    fed.run(Record)
    counted_shares = 4 - 1 - 1  # at least 4 survivors of 5 with one colluder; minus the observer's own
    for plan in plans.values():  # the largest need announced (800, rounded up to a power of 2^(1/4)), over 2 shares
        assert 800 <= plan["counted"] == counted_shares * plan["common"] <= 800 * 2**0.25
        assert plan["share"] >= plan["common"]


def test_a_coordinator_cannot_announce_a_smaller_need_for_a_node(tmp_path):
    from server.secagg_workflow import SecureAggregation

    fed = _distributed(tmp_path, n=3)
    victim = sorted(fed.nodes)[0]

    class Shrink(SecureAggregation):
        def _share_keys(self, grid, context, state):
            blob, signature, ad = state.ads[victim]
            fields = {k: v for k, v in ad.items() if k not in ("protocol", "kind", "roster", "run", "round")}
            state.ads[victim] = (wire.statement("advertisement", ad["roster"], ad["run"], ad["round"],
                                                **{**fields, "noise_need": 1.0}), signature, ad)
            return super()._share_keys(grid, context, state)

    _, workflow = fed.run(Shrink)
    assert workflow.last_parameters["halted_at"] == wire.SHARE_KEYS
    assert all(n.trained == 0 for n in fed.nodes.values())


def test_the_sum_leaves_room_for_noise_to_five_and_a_half_sensitivities_and_no_more_than_it_can_hold():
    from shared.secagg_rules import batch_bound, integer_scale, wrap_problem

    def fits(nodes: int, batch: int, z: float) -> bool:  # total noise std z sensitivities, 40M values
        scale = integer_scale(nodes, batch)
        l2 = scale + 40_000_000**0.5
        return wrap_problem(nodes, batch, scale, z**2 * l2**2 / 2, 40_000_000) is None

    for nodes in (3, 6, 20, 100):
        for batch in (8, 40, 256):
            scale = integer_scale(nodes, batch)
            l2 = scale + 40_000_000**0.5
            assert fits(nodes, batch, 5.5), (nodes, batch)  # the noise the scale was chosen for
            limit = next(z for z in np.geomspace(1, 1e6, 3000) if not fits(nodes, batch, z))
            # the first noise refused is about where a Gaussian of its std would leave the room left after the
            # gradients at 2^-40 over all values (Bernstein's bound is a little wider than the Gaussian's tail)
            room = 2**31 - 1 - nodes * (batch_bound(batch) * scale + 1)
            gaussian_tail = stats.norm.isf(2**-42 / 40_000_000) * limit * l2
            assert room < gaussian_tail * 1.05 and gaussian_tail < room * 1.25, (nodes, batch, limit)


def test_a_node_refuses_a_round_whose_noise_could_wrap_the_sum(tmp_path):
    from server.secagg_workflow import SecureAggregation
    from shared.secagg_rules import integer_scale

    scale = integer_scale(3, 10)
    needs = {"org-1": (100.0 * scale) ** 2, "org-2": 100.0, "org-3": 100.0}  # one node's need: 100 clip norms
    fed = _distributed(tmp_path, n=3, needs=needs)
    _, workflow = fed.run(SecureAggregation)
    assert workflow.last_parameters["halted_at"] == wire.SHARE_KEYS
    assert all(n.trained == 0 for n in fed.nodes.values())
    refusals = [r for n in fed.nodes.values() for r in n.refusals]
    assert len(refusals) == 3 and all("could wrap around 2^32" in r and "batch-size" in r for r in refusals)


def test_a_ledger_of_local_then_distributed_rounds_is_audited_on_both_epsilons(tmp_path):
    """Migration and audit: format-1 lines of local DP keep their spent budget when distributed rounds follow
    (both epsilons compose every round), and the audit recomputes both, failing a line that understates either."""
    from client.privacy import plan_distributed_round
    from fedchat.audit.ledger_audit import audit_ledger
    from shared import ledger
    from shared.accounting import compute_epsilon, ledger_epsilons
    from shared.crypto import load_or_create_signing_key
    from tests.support.ledger import entry, rewrite, signed_lines

    key = load_or_create_signing_key(tmp_path / "ledger-key.pem")
    path = tmp_path / "ledger.jsonl"
    history = [(0.9, 0.02, 10)] * 2
    rewrite(path, signed_lines([entry(r, history[:r]) for r in (1, 2)], key))  # format 1, local DP
    with ledger.open_for_training(path, key) as book:
        plan = plan_distributed_round(book.entries, target_epsilon=8.0, local_cap=64.0, delta=1e-5,
                                      num_conversations=400, batch_size=8, rounds_left=2, scale=2**20, values=1000,
                                      counted_shares=2, accountant="prv")
        assert plan.epsilon_before == pytest.approx(compute_epsilon(history, 1e-5, "prv"), rel=0.05)  # kept
        assert plan.epsilon_after <= 8.0 and plan.local_after <= 64.0 and plan.local_after > plan.epsilon_after
        line = book.append({**entry(3, None), **plan.ledger_fields()})
    audit = audit_ledger(path, tmp_path / "ledger-key.pem")
    assert audit.ok, audit.problems
    dist, local = ledger_epsilons(ledger.verify_lines(path, ledger.read_lines(path), key.public_key()), 1e-5, "prv")
    assert audit.epsilon_recomputed == pytest.approx(dist) and line["local_epsilon"] == pytest.approx(local)
    lines = [json.loads(x) for x in ledger.read_lines(path)]
    lines[-1]["local_epsilon"] = line["local_epsilon"] / 2  # understated, and re-signed with the node's own key
    rewrite(path, signed_lines(lines, key))
    assert any("claims local epsilon" in p for p in audit_ledger(path, tmp_path / "ledger-key.pem").problems)


@pytest.mark.slow
def test_the_demo_in_distributed_dp_shows_both_epsilons_as_the_ledgers_state_them(tmp_path, caplog):
    """A real distributed-DP demo (4 tiny nodes, the roster's colluder bound 1): the report and the log give each
    node's epsilon against an observer of the sum and of its own share alone, both as recomputed from its ledger,
    within the budget; the second is larger unless the node counts on no more noise than its own share (at the
    fewest survivors this roster allows, 3 - 1 colluder - itself = 1 share). Resumed for a second round, the run
    steps the coordinator's Adam on from the moments its first round checkpointed."""
    import functools
    import logging

    from fedchat.demo import run_demo
    from shared import ledger
    from shared.accounting import ledger_epsilons

    caplog.set_level(logging.INFO, logger="fedchat.demo")
    demo_log = logging.getLogger("fedchat.demo")  # the ServerApp's setup_logging stops fedchat's records at
    demo_log.addHandler(caplog.handler)  # "fedchat" (propagate off) once it runs in this process
    demo = functools.partial(run_demo, out=str(tmp_path / "demo"), clients=4, local_steps=1, base_model="tiny",
                             aggregation="ffa", dp=True, secagg=True,
                             extra={"dp-mode": "distributed", "batch-size": 16, "merge": False})
    try:
        report = demo(rounds=1, target_epsilon=8.0, fresh=True)
    finally:
        demo_log.removeHandler(caplog.handler)
    assert len(report["privacy"]) == 4
    for p in report["privacy"]:
        path = tmp_path / "demo" / "nodes" / p["node"] / "ledger.jsonl"
        dist, local = ledger_epsilons(ledger.read_entries(path), 1e-5, "prv")
        assert p["dp_mode"] == "distributed" and p["epsilon"] == pytest.approx(dist, rel=1e-6)
        assert p["local_epsilon"] == pytest.approx(local, rel=1e-6) and 0 < p["epsilon"] <= p["local_epsilon"]
        last = ledger.read_entries(path)[-1]
        assert (p["epsilon"] < p["local_epsilon"]) == (last["noise_counted"] > last["noise_share"])
        assert p["epsilon"] <= 8.0
        assert f"{p['node']} (distributed DP, 1 round(s) in its ledger): epsilon {p['epsilon']:.2f} against an " \
               f"observer of the secure sum, {p['local_epsilon']:.2f} of its own noise alone" in caplog.text
    assert "(secure sum) /" in caplog.text and "(a node's own noise) of 8 (distributed DP)" in caplog.text
    # the coordinator's Adam moments go into the round's checkpoint, and a resumed run steps on from them
    from server.checkpoint import latest_checkpoint, load_optimizer

    checkpoint = latest_checkpoint(tmp_path / "demo")
    first = load_optimizer(checkpoint)
    assert checkpoint.name == "round-0001" and int(first["t"]) == 1 and np.abs(first["m"]).max() > 0
    demo(rounds=2, target_epsilon=16.0, fresh=False)  # resumed; the first round spent the budget of 8
    checkpoint = latest_checkpoint(tmp_path / "demo")
    second = load_optimizer(checkpoint)
    assert checkpoint.name == "round-0002"
    assert int(second["t"]) == 2  # 1 if the resumed run restarted Adam's moments from zero


def test_the_coordinators_adam_continues_from_a_checkpoint_as_if_never_stopped(tmp_path, tiny_dir):
    import torch

    from server.aggregate import ServerAdam
    from server.checkpoint import RunState, load_optimizer, save_checkpoint
    from shared.adapter import attach_adapter
    from shared.config import RunConfig
    from shared.model import load_model

    grads = [np.random.default_rng(i).normal(size=50) for i in range(4)]
    straight = ServerAdam(0.01)
    expected = [straight.step(g) for g in grads]
    first = ServerAdam(0.01)
    for g in grads[:2]:
        first.step(g)
    model = attach_adapter(load_model(tiny_dir, torch.device("cpu"), torch.float32), RunConfig(base_model="tiny"))
    checkpoint = save_checkpoint(tmp_path, RunState(run_id="r", config={}, round=2), model, {}, first.state())
    again = ServerAdam(0.01)
    again.load(load_optimizer(checkpoint))
    assert all(np.array_equal(again.step(g), e) for g, e in zip(grads[2:], expected[2:]))
    fresh = ServerAdam(0.01)  # what a resumed run did before: moments from zero, a different step
    assert not np.allclose(fresh.step(grads[2]), expected[2])
    assert load_optimizer(tmp_path) == {}  # a checkpoint of a run without distributed DP holds none
