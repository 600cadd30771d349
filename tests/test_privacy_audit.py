"""Canaries and the one-run lower bound on epsilon (issue 11).

The bound is checked against an independent brute-force evaluation of Steinke, Nasr and
Jagielski's Theorem 3 (exact binomial coefficients, a grid over epsilon), against the paper's
figures, and on synthetic mechanisms whose epsilon is known. The end-to-end test trains the
tiny model on canaries through the real DP trainer with the noise forced to 0 while the node's
ledger claims epsilon 1: `fedchat audit empirical` must fail it, and pass the honest run.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedchat.audit.one_run import audit_scores, epsilon_lower_bound, make_guesses, p_value, rank_exposure
from fedchat.cli import main
from shared.errors import ConfigError, DataError
from tests.support.data import conversation, write_jsonl

# ----------------------------------------------------------------- the bound


def brute_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 3 term by term with exact binomial coefficients (no numpy, no log-gamma)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    f = lambda x: sum(pmf[max(x, 0):])  # noqa: E731  P[Binomial(r, q) >= x]
    alpha = max(((f(v - i) - f(v)) / i for i in range(1, v + 1)), default=0.0)
    return min(f(v) + 2 * m * delta * alpha, 1.0)


def brute_bound(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """Largest epsilon on a 0.001 grid whose p-value is below p (a coarse pass, then a fine one)."""
    coarse = max((e / 10 for e in range(0, 120) if brute_p_value(m, r, v, e / 10, delta) < p), default=0.0)
    fine = [coarse + e / 1000 for e in range(0, 101)]
    return max((e for e in fine if brute_p_value(m, r, v, e, delta) < p), default=0.0)


def test_all_guesses_right_gives_the_papers_figures():
    # r guesses all right, p = 0.05, delta = 0: P[Bin(r, q) >= r] = q^r = 0.05, epsilon = logit(0.05^(1/r))
    for r, paper in ((20, 1.8), (100, 3.5)):
        closed = math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r)))
        assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(closed, abs=1e-5)
        assert round(epsilon_lower_bound(r, r, r, 0.0), 1) == paper
    assert epsilon_lower_bound(20, 20, 20, 0.0) == pytest.approx(1.8227, abs=1e-4)
    assert epsilon_lower_bound(100, 100, 100, 0.0) == pytest.approx(3.4930, abs=1e-4)


@pytest.mark.parametrize("m,r,v,delta", [
    (20, 20, 20, 0.0), (100, 100, 100, 1e-5), (100, 40, 38, 1e-5), (100, 40, 30, 1e-5),
    (200, 60, 50, 1e-3), (1000, 100, 95, 1e-4), (50, 10, 9, 0.0), (100, 40, 20, 1e-5),
])
def test_bound_matches_an_independent_brute_force(m, r, v, delta):
    ours = epsilon_lower_bound(m, r, v, delta)
    assert ours == pytest.approx(brute_bound(m, r, v, delta), abs=1.5e-3)
    for eps in (0.0, 0.5, 1.7, 4.0):
        assert p_value(m, r, v, eps, delta) == pytest.approx(brute_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)


def test_delta_lowers_the_bound_and_chance_gives_none():
    assert epsilon_lower_bound(1000, 100, 100, 1e-3) < epsilon_lower_bound(1000, 100, 100, 1e-5) \
        < epsilon_lower_bound(1000, 100, 100, 0.0)
    assert epsilon_lower_bound(100, 40, 20, 1e-5) == 0.0  # half right: what a coin gets


def test_no_audit_of_realistic_size_can_refute_epsilon_8():
    # Why the end-to-end test below claims epsilon 1: at delta 1e-5 even 10,000 canaries all guessed right
    # stay under 8 (each guess can be right with probability e^8 / (1 + e^8) = 0.9997 under epsilon 8).
    assert epsilon_lower_bound(10_000, 10_000, 10_000, 1e-5) < 8
    assert epsilon_lower_bound(200, 80, 80, 1e-5) < 3.5


def _randomized_response(rng, m: int, eps: float):
    """Each canary's coin, reported truthfully with probability e^eps / (1 + e^eps): exactly eps-DP."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    says_in = np.where(truthful, included, ~included)
    scores = np.where(says_in, -1.0, 1.0) + rng.uniform(0, 0.01, m)  # low score = "included"
    return scores, included


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_bound_stays_below_a_known_epsilon(eps):
    rng = np.random.default_rng(11)
    bounds = []
    for _ in range(200):
        scores, included = _randomized_response(rng, 400, eps)
        bounds.append(audit_scores(scores, included, k_plus=100, k_minus=100, delta=0.0).epsilon_lower)
    assert np.mean(np.array(bounds) > eps) <= 0.08  # at most 5% in theory; 200 trials
    assert np.median(bounds) > 0.4 * eps  # and not vacuous


def test_bound_approaches_the_truth_with_many_canaries():
    rng = np.random.default_rng(12)
    scores, included = _randomized_response(rng, 20_000, 2.0)
    bound = audit_scores(scores, included, k_plus=5000, k_minus=5000, delta=0.0).epsilon_lower
    assert 1.8 < bound <= 2.0


def test_gaussian_mechanism_with_delta():
    # Each canary moves its own score by mu: the mechanism is mu-GDP, (eps, delta)-DP with the eps below.
    from statistics import NormalDist

    mu, delta, phi = 2.0, 1e-5, NormalDist().cdf
    gdp_delta = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)  # noqa: E731
    lo, hi = 0.0, 50.0
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if gdp_delta((lo + hi) / 2) > delta else (lo, (lo + hi) / 2)
    true_eps = hi  # about 6.7
    rng = np.random.default_rng(13)
    bounds = []
    for _ in range(100):
        included = rng.random(2000) < 0.5
        scores = -mu * included + rng.standard_normal(2000)
        bounds.append(audit_scores(scores, included, k_plus=50, k_minus=50, delta=delta).epsilon_lower)
    assert np.mean(np.array(bounds) > true_eps) <= 0.05
    assert np.median(bounds) > 2.0  # 100 well-separated guesses, most right


def test_guesses_and_exposure():
    scores = np.array([-3.0, -2.0, 0.1, 0.0, 2.0, 3.0])
    assert make_guesses(scores, 2, 1).tolist() == [1, 1, 0, 0, 0, -1]
    audit = audit_scores(scores, np.array([1, 1, 0, 0, 0, 0], bool), k_plus=2, k_minus=2, delta=0.0)
    assert (audit.guesses, audit.correct, audit.correct_included, audit.correct_excluded) == (4, 4, 2, 2)
    exposure = rank_exposure(np.array([-1.0, 5.0, 0.5]), np.array([0.0, 1.0, 2.0]))
    assert exposure.tolist() == pytest.approx([2.0, 0.0, 1.0])  # beats all 3 -> log2(4); none -> 0; 2 of 3 -> 1


@pytest.mark.parametrize("call,needle", [
    (lambda: epsilon_lower_bound(10, 5, 6, 1e-5), "correct (6) <= guesses (5)"),
    (lambda: epsilon_lower_bound(10, 20, 5, 1e-5), "guesses (20) <= canaries (10)"),
    (lambda: epsilon_lower_bound(10, 5, 5, 1.5), "delta must be in [0, 1)"),
    (lambda: epsilon_lower_bound(10, 5, 5, 1e-5, confidence=95), "confidence must be in (0, 1)"),
    (lambda: make_guesses(np.zeros(10), 6, 6), "exceed the 10 canaries"),
    (lambda: make_guesses(np.array([0.0, np.nan]), 1, 0), "not finite"),
])
def test_bad_inputs_are_named(call, needle):
    with pytest.raises(ConfigError, match=None) as err:
        call()
    assert needle in str(err.value)


# ----------------------------------------------------------------- canaries


def test_canary_make_writes_data_the_node_accepts_and_a_private_secret(tmp_path, tiny_dir, tokenizer, capsys):
    from fedchat.audit.canary import encode_secret, read_secret

    node = write_jsonl(tmp_path / "node.jsonl", [conversation(f"Question {i}?", f"Answer {i}.") for i in range(30)])
    out, secret = tmp_path / "node-with-canaries.jsonl", tmp_path / "auditor" / "secret.json"
    argv = ["canary", "make", "--m", "40", "--base-model", "tiny", "--data", str(node), "--out", str(out),
            "--secret", str(secret), "--seed", "5"]
    assert main(argv) == 0
    canaries = read_secret(secret)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    inc = canaries.included
    assert 10 <= inc.sum() <= 30 and (canaries.k_plus, canaries.k_minus) == (8, 8)
    assert len({c.secret for c in canaries.canaries}) == 40 and len({c.id for c in canaries.canaries}) == 40
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 30 + inc.sum()
    assert sorted(json.dumps(c.messages) for c in canaries.canaries if c.included) == \
        sorted(json.dumps(rec["messages"]) for rec in lines if "recovery code" in rec["messages"][0]["content"])
    capsys.readouterr()
    assert main(["data", "check", str(out), "--base-model", "tiny"]) == 0
    assert "OK" in capsys.readouterr().out
    # the same seed gives the same canaries; the labels cover exactly the secret's words
    again = tmp_path / "again.json"
    assert main(argv[:-4] + ["--out", str(tmp_path / "o2.jsonl"), "--secret", str(again), "--seed", "5"]) == 0
    assert [c.secret for c in read_secret(again).canaries] == [c.secret for c in canaries.canaries]
    enc = encode_secret(tokenizer, canaries.canaries[0])
    labelled = tokenizer.decode([t for t in enc.labels if t != -100])
    assert labelled.strip() == canaries.canaries[0].secret


def test_canary_make_refuses_what_would_break_an_audit(tmp_path, tiny_dir, capsys):
    from fedchat.audit.canary import check_template, make_canaries

    secret, out = tmp_path / "s.json", tmp_path / "c.jsonl"
    base = ["canary", "make", "--base-model", "tiny", "--out", str(out), "--secret", str(secret)]
    assert main(base + ["--m", "10"]) == 0
    capsys.readouterr()
    assert main(base + ["--m", "10"]) == 2  # would overwrite the auditor's secret
    assert "exists" in capsys.readouterr().err
    assert main(base + ["--m", "1", "--force"]) == 2
    assert main(base + ["--m", "10", "--k-plus", "6", "--k-minus", "6", "--force"]) == 2
    assert "sum to at most" in capsys.readouterr().err
    with pytest.raises(DataError, match="exactly once, in an assistant message"):
        check_template([{"role": "user", "content": "{secret}"}, {"role": "assistant", "content": "ok"}])
    with pytest.raises(DataError, match="exactly once"):
        make_canaries(4, ["abcd"] * 2000, template=[{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "no secret here"}])


def test_audit_empirical_refuses_bad_inputs(tmp_path, tiny_dir, capsys):
    secret = tmp_path / "s.json"
    assert main(["canary", "make", "--m", "10", "--base-model", "tiny", "--out", str(tmp_path / "c.jsonl"),
                 "--secret", str(secret)]) == 0
    audit = ["audit", "empirical", "--base-model", "tiny", "--secret", str(secret)]
    capsys.readouterr()
    assert main(audit) == 2
    assert "--model DIR" in capsys.readouterr().err
    assert main(audit + ["--model", str(tiny_dir), "--epsilon", "1", "--ledger", "x.jsonl"]) == 2
    assert "not both" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"canaries": []}))
    assert main(["audit", "empirical", "--base-model", "tiny", "--secret", str(bad), "--model", str(tiny_dir)]) == 2
    assert "not a canary secret file" in capsys.readouterr().err
    # the base model against itself: nothing learned, no bound, exit 0
    assert main(audit + ["--model", str(tiny_dir), "--epsilon", "0.5", "--k-plus", "2", "--k-minus", "2"]) == 0


# ----------------------------------------------------------------- end to end on the tiny model


def _tiny_trainee(cfg) -> tuple:
    """The tiny model with `cfg`'s adapter, seeded: (tokenizer, model, exchanged names)."""
    import torch

    from shared.adapter import attach_adapter, exchanged_names
    from shared.model import load_model, load_tokenizer, resolve_base_model

    base = resolve_base_model("tiny")
    tokenizer = load_tokenizer(base)
    torch.manual_seed(0)
    model = attach_adapter(load_model(base, torch.device("cpu"), torch.float32), cfg)
    return tokenizer, model, exchanged_names(model, cfg.aggregation)


def _train(tmp_path: Path, name: str, data_file: Path, *, broken: bool) -> tuple[Path, Path, Path]:
    """One node round through the real trainer and ledger, claiming epsilon 1: (adapter, ledger, public key).
    broken=True trains with noise multiplier 0 while the ledger records the calibrated one."""

    from client.data import load_local_data
    from client.privacy import plan_round
    from client.train import train_round
    from shared import ledger
    from shared.adapter import fingerprint, save_adapter
    from shared.config import RunConfig
    from shared.crypto import load_or_create_signing_key

    # The tiny random model's logits barely move through q/v alone; LoRA on lm_head lets it memorise. 20 steps
    # are enough (measured: without noise 16/16 guesses right, bound 1.58, median exposure 4.2; honest bound 0).
    cfg = RunConfig(base_model="tiny", local_steps=20, batch_size=8, learning_rate=0.02, secagg=False,
                    lora_target_modules="q_proj,v_proj,lm_head", aggregation="fedavg", lora_r=8, lora_alpha=16)
    tokenizer, model, names = _tiny_trainee(cfg)
    data = load_local_data(str(data_file), tokenizer, max_len=cfg.max_seq_len, validation_fraction=0.0, seed=0)
    state = tmp_path / name
    key = load_or_create_signing_key(state / "ledger-key.pem")
    with ledger.open_for_training(state / "ledger.jsonl", key) as book:
        plan = plan_round(book.entries, "run-1", target_epsilon=1.0, delta=1e-5, num_conversations=len(data.train),
                          batch_size=cfg.batch_size, local_steps=cfg.local_steps, rounds_left=1, accountant="prv")
        result = train_round(model, names, data.train, cfg, pad_id=tokenizer.pad_token_id, seed=1234,
                             noise_multiplier=0.0 if broken else plan.noise_multiplier)
        book.append({"node": "org-1", "run": "run-1", "round": 1, "time": "2026-01-01T00:00:00+00:00",
                     "num_examples": len(data.train), "sample_rate": plan.sample_rate,
                     "noise_multiplier": plan.noise_multiplier, "max_grad_norm": cfg.dp_max_grad_norm,
                     "steps": plan.steps, "delta": 1e-5, "accountant": "prv", "epsilon": plan.epsilon_after,
                     "target_epsilon": 1.0, "update_sha256": fingerprint(result.delta)})
    save_adapter(model, state / "adapter", {"base_model": "tiny"})
    return state / "adapter", state / "ledger.jsonl", state / "ledger-key.pub"


def _train_distributed(tmp_path: Path, name: str, data_file: Path, *, rounds: int, target_epsilon: float,
                       nodes: int = 3, broken: bool = False) -> tuple[Path, Path, Path]:
    """Distributed-DP rounds of a federation in which one node holds the canaries: the node's own steps (the
    round's share planned from its ledger, counting the other nodes' shares as its roster allows; the clipped
    gradient sum of a Poisson sample in the sum's integer units, rounded at random, plus its Skellam share), the
    other nodes' shares, and the coordinator's (the exact integer sum, rescaled and divided by the federation's
    expected batch, then Adam). The ledger claims the distributed epsilon: (adapter, ledger, public key).
    broken=True: no node adds noise, while the ledger records the planned shares."""

    from client.data import load_local_data
    from client.privacy import plan_distributed_round
    from client.train import clipped_gradient_sum, dp_streams, secure_seed
    from server.aggregate import ServerAdam
    from shared import ledger
    from shared.accounting import ledger_epsilons, randomized_round, skellam_noise
    from shared.adapter import fingerprint, get_arrays, save_adapter, set_arrays
    from shared.config import RunConfig
    from shared.crypto import load_or_create_signing_key
    from shared.secagg_rules import integer_scale, wrap_problem

    cfg = RunConfig(base_model="tiny", batch_size=8, learning_rate=0.02, secagg=True, dp_mode="distributed",
                    lora_target_modules="q_proj,v_proj,lm_head", aggregation="fedavg", lora_r=8, lora_alpha=16)
    tokenizer, model, names = _tiny_trainee(cfg)
    shapes = [a.shape for a in get_arrays(model, names)]
    values = sum(int(np.prod(s)) for s in shapes)
    data = load_local_data(str(data_file), tokenizer, max_len=cfg.max_seq_len, validation_fraction=0.0, seed=0)
    scale, units = integer_scale(nodes, cfg.batch_size), integer_scale(nodes, cfg.batch_size) / cfg.dp_max_grad_norm
    adam = ServerAdam(cfg.learning_rate)
    state = tmp_path / name
    key = load_or_create_signing_key(state / "ledger-key.pem")
    with ledger.open_for_training(state / "ledger.jsonl", key) as book:
        # colluder bound 0: an observer of the sum does not know the other nodes' shares (nodes - 0 - 1)
        plan = plan_distributed_round([], target_epsilon=target_epsilon, local_cap=1e6, delta=1e-5,
                                      num_conversations=len(data.train), batch_size=cfg.batch_size, rounds_left=rounds,
                                      scale=scale, values=values, counted_shares=nodes - 1, accountant="prv")
        assert wrap_problem(nodes, cfg.batch_size, scale, nodes * plan.share, values) is None  # nodes accept it
        for rnd in range(1, rounds + 1):
            sampling, noise = dp_streams(secure_seed())
            sums, _ = clipped_gradient_sum(model, names, data.train, cfg, pad_id=tokenizer.pad_token_id,
                                           sampling=sampling)
            total = np.concatenate([randomized_round(s.ravel() * units, noise) for s in sums])
            for _ in range(nodes):  # each node's share; the other nodes' gradient sums hold no canary
                total += skellam_noise(0.0 if broken else plan.share, values, noise)
            step = adam.step(total / units / (nodes * cfg.batch_size))
            arrays, offset = [], 0
            for old, shape in zip(get_arrays(model, names), shapes):
                arrays.append(old + step[offset:offset + old.size].reshape(shape).astype(np.float32))
                offset += old.size
            set_arrays(model, names, arrays)
            line = {**plan.ledger_fields(), "steps": rnd}  # the spend so far: rounds of one step compose
            eps, local = ledger_epsilons([line], 1e-5, "prv")
            book.append({"node": "org-1", "run": "run-1", "round": rnd, "time": "2026-01-01T00:00:00+00:00",
                         "num_examples": len(data.train), "max_grad_norm": cfg.dp_max_grad_norm, "delta": 1e-5,
                         "accountant": "prv", "target_epsilon": target_epsilon, "update_sha256": fingerprint(arrays),
                         **plan.ledger_fields(), "epsilon": eps, "local_epsilon": local})
    save_adapter(model, state / "adapter", {"base_model": "tiny"})
    return state / "adapter", state / "ledger.jsonl", state / "ledger-key.pub"


@pytest.mark.slow
def test_broken_dp_fails_the_empirical_audit_and_honest_dp_passes(tmp_path, tiny_dir, capsys):
    filler = write_jsonl(tmp_path / "node.jsonl", [conversation(f"How do I reset password {i}?",
                                                                f"Open settings, step {i}.") for i in range(16)])
    data, secret = tmp_path / "train.jsonl", tmp_path / "auditor" / "secret.json"
    assert main(["canary", "make", "--m", "32", "--base-model", "tiny", "--data", str(filler), "--out", str(data),
                 "--secret", str(secret), "--k-plus", "8", "--k-minus", "8", "--seed", "7"]) == 0
    verdicts = {}
    for name, broken in (("broken", True), ("honest", False)):
        adapter, ledger_path, pub = _train(tmp_path, name, data, broken=broken)
        capsys.readouterr()
        assert main(["audit", str(ledger_path), "--key", str(pub)]) == 0  # the ledger itself verifies
        report = tmp_path / f"{name}.json"
        code = main(["audit", "empirical", "--adapter", str(adapter), "--base-model", "tiny", "--secret",
                     str(secret), "--ledger", str(ledger_path), "--key", str(pub), "--json", str(report),
                     "--plot", str(tmp_path / f"{name}.png")])
        out = capsys.readouterr().out
        verdicts[name] = (code, json.loads(report.read_text()), out)
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    code, broken, out = verdicts["broken"]
    assert code == 1 and broken["verdict"] == "FAIL" and "FAIL" in out
    assert broken["epsilon_claimed"] == pytest.approx(1.0, abs=0.02)
    assert broken["epsilon_lower"] > 1.0 and broken["guesses"] == 16
    assert broken["exposure"]["median"] > 2
    code, honest, out = verdicts["honest"]
    assert code == 0 and honest["verdict"] == "OK"
    assert honest["epsilon_lower"] <= honest["epsilon_claimed"]


@pytest.mark.slow
def test_the_canary_bound_on_a_distributed_dp_model_stays_below_its_distributed_claim(tmp_path, tiny_dir, capsys):
    """Distributed DP at epsilon 1 over 20 rounds, as an observer of the sum counts it (the other two nodes'
    shares): the canaries' bound stays below the claim. Without the noise shares the same run fails: all 16
    guesses right, bound 1.58 > 1 (measured with broken=True; the local-DP test above keeps a broken run)."""
    filler = write_jsonl(tmp_path / "node.jsonl", [conversation(f"How do I reset password {i}?",
                                                                f"Open settings, step {i}.") for i in range(16)])
    data, secret = tmp_path / "train.jsonl", tmp_path / "auditor" / "secret.json"
    assert main(["canary", "make", "--m", "32", "--base-model", "tiny", "--data", str(filler), "--out", str(data),
                 "--secret", str(secret), "--k-plus", "8", "--k-minus", "8", "--seed", "7"]) == 0
    adapter, ledger_path, pub = _train_distributed(tmp_path, "distributed", data, rounds=20, target_epsilon=1.0)
    capsys.readouterr()
    assert main(["audit", str(ledger_path), "--key", str(pub)]) == 0  # both epsilons recompute
    report = tmp_path / "distributed.json"
    code = main(["audit", "empirical", "--adapter", str(adapter), "--base-model", "tiny", "--secret", str(secret),
                 "--ledger", str(ledger_path), "--key", str(pub), "--json", str(report)])
    honest = json.loads(report.read_text())
    assert code == 0 and honest["verdict"] == "OK", honest
    assert honest["epsilon_claimed"] == pytest.approx(1.0, abs=0.02)
    assert honest["epsilon_lower"] <= honest["epsilon_claimed"]
