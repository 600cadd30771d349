"""The node's budget guard on its ledger: one run at a time, every line verified, never a fresh budget by accident."""

import json
import math
import multiprocessing
import shutil

import pytest

from client.privacy import fits_budget, plan_round
from fedchat.audit.ledger_audit import audit_ledger
from shared import ledger
from shared.accounting import compute_epsilon, ledger_history
from shared.crypto import load_or_create_signing_key, load_signing_key, new_signing_key, public_pem
from shared.errors import LedgerError
from tests.support.ledger import entry, rewrite, signed_lines, write_ledger


@pytest.fixture
def key(tmp_path):
    return load_or_create_signing_key(tmp_path / "ledger-key.pem")


def test_an_intact_ledger_opens_with_its_entries_and_head(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key, rounds=3)
    with ledger.open_for_training(path, key) as book:
        assert [e["round"] for e in book.entries] == [1, 2, 3]
        assert book.head() == ledger.head(path)
    assert json.loads((tmp_path / "ledger.head").read_text()) == {"entries": 3, "head": ledger.head(path)[0]}


def _hold(key_path, ledger_path, holding, release):
    key = load_signing_key(key_path)
    with ledger.open_for_training(ledger_path, key) as book:
        holding.set()
        release.wait(30)
        book.append(entry(len(book.entries) + 1, None))


def test_concurrent_runs_cannot_overspend(tmp_path, key):
    """While one run plans and trains, a second run on the node is refused at once: it cannot
    plan against the same remaining budget."""
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key, rounds=1)
    ctx = multiprocessing.get_context("spawn")
    holding, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(tmp_path / "ledger-key.pem", path, holding, release))
    other.start()
    try:
        assert holding.wait(60)
        with pytest.raises(LedgerError, match="another run is training on this node"):
            with ledger.open_for_training(path, key):
                pass
    finally:
        release.set()
        other.join(60)
    assert other.exitcode == 0
    with ledger.open_for_training(path, key) as book:  # the lock is free again, the other run's line is there
        assert [e["round"] for e in book.entries] == [1, 2]


def _hammer(key_path, ledger_path, lines, results):
    """Write `lines` entries, retrying whenever the other process holds the lock."""
    key = load_signing_key(key_path)
    written = refused = 0
    while written < lines and refused < 100_000:
        try:
            with ledger.open_for_training(ledger_path, key) as book:
                n = len(book.entries) + 1
                book.append(entry(n, None))
                written += 1
        except LedgerError as exc:
            assert "another run is training" in str(exc), exc
            refused += 1
    results.put((written, refused))


def test_concurrent_appends_never_lose_a_line(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(tmp_path / "ledger-key.pem", path, 15, results)) for _ in range(2)]
    for p in procs:
        p.start()
    counts = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert [w for w, _ in counts] == [15, 15]
    with ledger.open_for_training(path, key) as book:  # every line verifies, none lost
        assert [e["round"] for e in book.entries] == list(range(1, 31))


def test_a_deleted_ledger_beside_its_head_is_refused(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key, rounds=2)
    path.unlink()
    with pytest.raises(LedgerError, match="missing, but this node .* recorded 2 entries.*never a fresh budget"):
        with ledger.open_for_training(path, key):
            pass
    path.write_bytes(b"")  # an emptied ledger is no better
    with pytest.raises(LedgerError, match="has 0 entries, but this node"):
        with ledger.open_for_training(path, key):
            pass


def test_a_rolled_back_ledger_is_refused(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key, rounds=2)
    shutil.copy(path, tmp_path / "backup.jsonl")
    shutil.copy(tmp_path / "ledger.head", tmp_path / "backup.head")
    with ledger.open_for_training(path, key) as book:
        book.append(entry(3, [(0.9, 0.02, 10)] * 3))
        recorded = book.head()[1], book.head()[0]  # what the coordinator saw in the node's reply
    shutil.copy(tmp_path / "backup.jsonl", path)  # an older copy, intact and signed on its own
    with pytest.raises(LedgerError, match="has 2 entries, but this node .* recorded 3: the ledger was rolled back"):
        with ledger.open_for_training(path, key):
            pass
    shutil.copy(tmp_path / "backup.head", tmp_path / "ledger.head")  # head file rolled back too: the coordinator knows
    with pytest.raises(LedgerError, match="has 2 entries, but the coordinator recorded 3"):
        with ledger.open_for_training(path, key, recorded):
            pass
    with ledger.open_for_training(path, key, None) as book:  # no record anywhere: nothing can tell
        assert len(book.entries) == 2


def test_a_ledger_behind_or_beside_the_coordinators_record_is_refused(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    entries = write_ledger(path, key, rounds=2)
    head, count = ledger.head(path)
    with ledger.open_for_training(path, key, (count, head)):
        pass
    with pytest.raises(LedgerError, match="has 2 entries, but the coordinator recorded 3"):
        with ledger.open_for_training(path, key, (3, "cd" * 32)):
            pass
    with pytest.raises(LedgerError, match="line 2 differs from the line the coordinator recorded"):
        with ledger.open_for_training(path, key, (2, "cd" * 32)):
            pass
    (tmp_path / "ledger.head").unlink()
    path.unlink()  # no head file either: only the coordinator's record stands between this and a fresh budget
    with pytest.raises(LedgerError, match="missing, but the coordinator recorded 2"):
        with ledger.open_for_training(path, key, (count, head)):
            pass
    assert entries


def test_a_forged_line_is_refused_on_read(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key, rounds=3)
    intact = path.read_bytes()
    lines = intact.split(b"\n")[:-1]
    edited = json.loads(lines[1])
    edited["epsilon"] /= 2  # understate what was spent, keep the old signature
    rewrite(path, [lines[0], ledger.canonical(edited), lines[2]])
    with pytest.raises(LedgerError, match="line 2: signature does not verify"):
        with ledger.open_for_training(path, key):
            pass
    other = new_signing_key()  # the whole ledger re-signed by another key: a valid chain, the wrong signer
    rewrite(path, signed_lines([json.loads(line) for line in lines], other))
    with pytest.raises(LedgerError, match="line 1: signature does not verify"):
        with ledger.open_for_training(path, key):
            pass
    rewrite(path, [lines[0], lines[2]])  # a line removed in the middle
    with pytest.raises(LedgerError, match="line 2: hash chain broken"):
        with ledger.open_for_training(path, key):
            pass
    rewrite(path, signed_lines([json.loads(lines[0]), {**json.loads(lines[1]), "node": "org-9"}], key))
    with pytest.raises(LedgerError, match="line 2: node 'org-9' differs"):
        with ledger.open_for_training(path, key):
            pass
    path.write_bytes(intact[:-10])
    with pytest.raises(LedgerError, match="incomplete"):
        with ledger.open_for_training(path, key):
            pass
    path.write_bytes(intact.replace(b'"steps":10', b'"steps":1e1', 1))  # JSON, same value, not canonical
    with pytest.raises(LedgerError, match="line 1: .*wrong type|line 1: .*canonical"):
        with ledger.open_for_training(path, key):
            pass


def test_a_round_without_dp_is_recorded_with_infinite_epsilon(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key, rounds=1)
    with ledger.open_for_training(path, key) as book:
        no_dp = {k: v for k, v in entry(2, []).items() if k not in ("noise_multiplier", "epsilon")}
        written = book.append({**no_dp, **ledger.no_dp_fields(0.02, 10)})
    assert written["noise_multiplier"] == 0 and written["epsilon"] is None
    assert b'"epsilon":null' in path.read_bytes().split(b"\n")[1]  # strict JSON, no Infinity
    with ledger.open_for_training(path, key) as book:
        entries = book.entries
    assert math.isinf(compute_epsilon(ledger_history(entries), 1e-5, "prv"))
    assert math.isinf(compute_epsilon([(0.0, 0.02, 1)], 1e-5, "rdp"))
    plan = plan_round(entries, "run-2", target_epsilon=8.0, delta=1e-5, num_conversations=400, batch_size=8,
                      local_steps=10, rounds_left=3, accountant="prv")
    assert math.isinf(plan.epsilon_before) and not fits_budget(plan, 8.0)  # no DP round can follow
    pub = tmp_path / "ledger-key.pub"
    pub.write_bytes(public_pem(key))
    audit = audit_ledger(path, pub)
    assert not audit.ok and audit.rounds_without_dp == 1 and math.isinf(audit.epsilon_recomputed)
    assert "line 2: round 2 of run run-1 was trained WITHOUT DP" in " ".join(audit.problems)
    assert audit.to_dict()["epsilon_recomputed"] is None  # the JSON report stays strict JSON


@pytest.mark.parametrize("bad,expected", [
    ({"steps": -900}, "steps -900 is not >= 1"),
    ({"delta": 0.01}, "not below 1/num_examples"),
    ({"noise_multiplier": 0.0}, "must record epsilon null"),
    ({"epsilon": float("inf")}, "epsilon inf is not a finite number"),
    ({"extra": 1}, "unknown fields"),
])
def test_an_invalid_entry_is_never_written(tmp_path, key, bad, expected):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, key, rounds=1)
    intact = path.read_bytes()
    with ledger.open_for_training(path, key) as book:
        with pytest.raises(LedgerError, match=expected):
            book.append({**entry(2, [(0.9, 0.02, 10)] * 2), **bad})
        with pytest.raises(LedgerError, match="differs from 'org-1'"):
            book.append(entry(2, [(0.9, 0.02, 10)] * 2, node="org-2"))
    assert path.read_bytes() == intact
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    with pytest.raises(LedgerError, match="closed"):
        book.append(entry(2, [(0.9, 0.02, 10)] * 2))


def test_lines_of_format_1_stay_valid_and_keep_their_spent_budget(tmp_path, key):
    """Migration: a ledger written before format versions (version 1: no "version" field) opens, its
    epsilon counts in the next plan, the node appends lines of the newest version after it, and the audit
    passes; a version-1 line after a newer one, or an unknown version, is refused."""
    path = tmp_path / "ledger.jsonl"
    history = [(0.9, 0.02, 10)] * 3
    old = [entry(r, history[:r]) for r in (1, 2, 3)]
    assert not any("version" in e or "first_contact" in e for e in old)
    rewrite(path, signed_lines(old, key))
    with ledger.open_for_training(path, key) as book:
        assert [ledger.version(e) for e in book.entries] == [1, 1, 1]
        plan = plan_round(book.entries, "run-2", target_epsilon=8.0, delta=1e-5, num_conversations=400,
                          batch_size=8, local_steps=10, rounds_left=1, accountant="prv")
        assert plan.epsilon_before == pytest.approx(compute_epsilon(history, 1e-5, "prv"))  # spent budget kept
        new = book.append(entry(4, history + [(0.9, 0.02, 10)], run="run-2", first_contact=True))
    assert new["version"] == ledger.VERSION == 3 and new["first_contact"] is True
    assert new["dp_mode"] == "local" and new["local_epsilon"] == new["epsilon"]
    audit = audit_ledger(path, tmp_path / "ledger-key.pem")
    assert audit.ok, audit.problems
    assert audit.epsilon_recomputed == pytest.approx(compute_epsilon(history + [(0.9, 0.02, 10)], 1e-5, "prv"))
    lines = ledger.read_lines(path)
    downgraded = [json.loads(line) for line in lines] + [entry(5, None)]
    rewrite(path, signed_lines(downgraded, key))
    with pytest.raises(LedgerError, match="format version 1 after version 3"):
        with ledger.open_for_training(path, key):
            pass
    assert "line 5: format version 1 after version 3" in " ".join(audit_ledger(path, tmp_path / "ledger-key.pem")
                                                                   .problems)
    rewrite(path, signed_lines([{**entry(1, None), "version": 4, "first_contact": False}], key))
    with pytest.raises(LedgerError, match="unknown ledger format version 4"):
        with ledger.open_for_training(path, key):
            pass
