"""`fedchat audit`: intact ledgers pass, every tampering fails, and nothing is taken on the ledger's word."""

import json

import pytest

from fedchat.audit.ledger_audit import audit_ledger, check_against_report
from fedchat.cli import main
from shared import ledger
from shared.crypto import key_fingerprint, load_or_create_signing_key, new_signing_key, public_pem
from tests.support.ledger import entry, rewrite, signed_lines, write_ledger


def _write_ledger(tmp_path, rounds=4, name="org-1", **over):
    """NAME.jsonl in tmp_path/ledgers, its public key as keys/NAME.pub (where an auditor keeps what the
    operator gave), the private key in tmp_path/NAME-key.pem."""
    key = load_or_create_signing_key(tmp_path / f"{name}-key.pem")
    (tmp_path / "ledgers").mkdir(exist_ok=True)
    (tmp_path / "keys").mkdir(exist_ok=True)
    path = tmp_path / "ledgers" / f"{name}.jsonl"
    write_ledger(path, key, rounds=rounds, node=name, **over)
    (tmp_path / "keys" / f"{name}.pub").write_bytes(public_pem(key))
    return path, tmp_path / "keys" / f"{name}.pub"


def _lines(path):
    return path.read_bytes().split(b"\n")[:-1]


def _forged(tmp_path, change: dict, at: int = 2, rounds: int = 3):
    """A ledger whose line `at` has `change`, chained and signed with the node's real key."""
    path, pub = _write_ledger(tmp_path, rounds=rounds)
    entries = [json.loads(line) for line in _lines(path)]
    entries[at - 1].update(change)
    rewrite(path, signed_lines(entries, load_or_create_signing_key(tmp_path / "org-1-key.pem")))
    return path, pub


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_intact_ledger_passes_and_recomputed_epsilon_matches_within_1pct(tmp_path, accountant):
    path, pub = _write_ledger(tmp_path, accountant=accountant)
    audit = audit_ledger(path, pub)
    assert audit.ok, audit.problems
    assert audit.rounds == 4 and audit.node == "org-1"
    assert audit.key_fingerprint == key_fingerprint(load_or_create_signing_key(tmp_path / "org-1-key.pem"))
    for h in audit.history:
        assert abs(h["recomputed"] - h["claimed"]) <= 0.01 * h["claimed"]
    lines = _lines(path)
    assert json.loads(lines[0])["prev"] == "0" * 64
    assert json.loads(lines[1])["prev"] == ledger.line_hash(lines[0])


def test_edited_field_is_caught(tmp_path):
    path, pub = _write_ledger(tmp_path)
    lines = _lines(path)
    edited = json.loads(lines[1])
    edited["epsilon"] = edited["epsilon"] / 2  # understate what was spent
    lines[1] = ledger.canonical(edited)
    rewrite(path, lines)
    problems = " ".join(audit_ledger(path, pub).problems)
    assert "line 2: signature does not verify with org-1.pub" in problems
    assert "line 3: hash chain broken" in problems
    assert "line 2: claims epsilon" in problems


@pytest.mark.parametrize("how", ["cut", "drop-middle", "drop-first", "reorder"])
def test_truncated_or_reordered_ledgers_are_caught(tmp_path, how):
    path, pub = _write_ledger(tmp_path)
    data = path.read_bytes()
    lines = _lines(path)
    if how == "cut":
        path.write_bytes(data[:-40])
        expected = "incomplete last line"
    elif how == "drop-middle":
        rewrite(path, lines[:1] + lines[2:])
        expected = "line 2: hash chain broken"
    elif how == "drop-first":
        rewrite(path, lines[1:])
        expected = "line 1: hash chain broken"
    else:
        rewrite(path, [lines[0], lines[2], lines[1], lines[3]])
        expected = "line 2: hash chain broken"
    assert expected in " ".join(audit_ledger(path, pub).problems)


def test_audit_without_keys_refuses(tmp_path, capsys):
    path, pub = _write_ledger(tmp_path)
    (path.parent / "org-1.pub").write_bytes(pub.read_bytes())  # a key beside the ledger is not taken
    assert main(["audit", str(path)]) == 2
    assert "give each node's public ledger key: --keys DIR" in capsys.readouterr().err
    other, _ = _write_ledger(tmp_path, name="org-2")
    assert main(["audit", str(path), str(other), "--key", str(pub)]) == 2  # a bare key: which ledger is it for?
    assert "give LEDGER=PUB" in capsys.readouterr().err
    assert main(["audit", str(path), "--key", str(pub)]) == 0  # one ledger, one key: unambiguous


def test_a_ledger_re_signed_with_another_key_fails_with_the_real_key(tmp_path, capsys):
    path, pub = _write_ledger(tmp_path)
    other = new_signing_key()  # whoever edits the ledger re-signs it and swaps the key beside it
    rewrite(path, signed_lines([{**json.loads(line), "epsilon": 0.01} for line in _lines(path)], other))
    (path.parent / "org-1.pub").write_bytes(public_pem(other))
    problems = audit_ledger(path, pub).problems
    assert sum("signature does not verify with org-1.pub" in p for p in problems) == 4
    assert main(["audit", str(path), "--keys", str(pub.parent)]) == 1
    assert main(["audit", str(path), "--key", f"{path}={pub}"]) == 1
    assert "line 1: signature does not verify" in capsys.readouterr().err


def test_negative_steps_fail_the_audit(tmp_path):
    path, pub = _forged(tmp_path, {"steps": -900})
    problems = " ".join(audit_ledger(path, pub).problems)
    assert "line 2: steps -900 is not >= 1" in problems


def test_delta_not_below_one_over_n_fails(tmp_path):
    path, pub = _forged(tmp_path, {"delta": 0.01, "num_examples": 100}, at=1, rounds=1)
    assert "line 1: delta 0.01 is not below 1/num_examples = 1/100" in " ".join(audit_ledger(path, pub).problems)


@pytest.mark.parametrize("change,expected", [
    ({"sample_rate": 0.0}, "sample_rate 0.0 is not in (0, 1]"),
    ({"sample_rate": 1.5}, "sample_rate 1.5 is not in (0, 1]"),
    ({"noise_multiplier": -0.9}, "noise_multiplier -0.9 is negative"),
    ({"max_grad_norm": 0.0}, "max_grad_norm 0.0 is not > 0"),
    ({"delta": 0.0}, "delta 0.0 is not in (0, 1)"),
    ({"num_examples": 0}, "num_examples 0 is not >= 1"),
    ({"round": 0}, "round 0 is not >= 1"),
    ({"epsilon": -1.0}, "epsilon -1.0 is not a finite number >= 0"),
    ({"target_epsilon": 0.0}, "target_epsilon 0.0 is not > 0"),
    ({"update_sha256": "not-a-hash"}, "update_sha256 is not 64 hex characters"),
    ({"accountant": "gdp"}, "unknown accountant 'gdp'"),
    ({"steps": 10.0}, "field 'steps' has the wrong type (float)"),
])
def test_values_out_of_range_fail_the_audit(tmp_path, change, expected):
    path, pub = _forged(tmp_path, change)
    audit = audit_ledger(path, pub)
    assert f"line 2: {expected}" in " ".join(audit.problems)


@pytest.mark.parametrize("change", [{"delta": 1e-4}, {"target_epsilon": 16.0}])
def test_a_changed_delta_or_target_is_flagged(tmp_path, change):
    path, pub = _write_ledger(tmp_path, rounds=2)
    key = load_or_create_signing_key(tmp_path / "org-1-key.pem")
    with ledger.open_for_training(path, key) as book:  # the node's operator raised the budget in node.toml
        book.append(entry(3, [(0.9, 0.02, 10)] * 3, **change))
    audit = audit_ledger(path, pub)
    (name, value), = change.items()
    assert f"line 3: {name} changed from {8.0 if name == 'target_epsilon' else 1e-5:g} (line 2) to {value:g}: the " \
           "node changed its budget" in " ".join(audit.problems)
    assert not audit.ok


def test_a_changed_accountant_is_flagged_as_a_warning(tmp_path, capsys):
    path, pub = _write_ledger(tmp_path, rounds=2)
    key = load_or_create_signing_key(tmp_path / "org-1-key.pem")
    with ledger.open_for_training(path, key) as book:  # the coordinator's next run asked for RDP
        book.append(entry(3, [(0.9, 0.02, 10)] * 3, accountant="rdp"))
    audit = audit_ledger(path, pub)
    assert audit.ok, audit.problems  # each line is recomputed over the whole history with its own accountant
    assert audit.warnings == ["line 3: accountant changed from prv (line 2) to rdp"]
    assert main(["audit", str(path), "--keys", str(pub.parent)]) == 0
    assert "warning: line 3: accountant changed" in capsys.readouterr().err


def test_overspent_ledger_fails(tmp_path):
    path, pub = _write_ledger(tmp_path, target_epsilon=0.5)
    assert "exceeds the budget 0.5: overspent" in " ".join(audit_ledger(path, pub).problems)


def _report(tmp_path, rows):
    """report.json with one round holding `rows`: (name, node id, ledger path, key path, entries or None)."""
    clients = []
    for name, node_id, path, key_pem, count in rows:
        lines = _lines(path)
        count = len(lines) if count is None else count
        clients.append({"node": name, "node_id": node_id, "status": "ok", "ledger_entries": count,
                        "ledger_head": ledger.line_hash(lines[count - 1]),
                        "ledger_key": key_fingerprint(load_or_create_signing_key(key_pem))})
    (tmp_path / "report.json").write_text(json.dumps({"rounds": [{"round": 4, "clients": clients}]}))
    return tmp_path / "report.json"


def test_entries_removed_at_the_end_are_caught_with_the_coordinators_report(tmp_path):
    path, pub = _write_ledger(tmp_path)
    report = _report(tmp_path, [("org-1", 11, path, tmp_path / "org-1-key.pem", None)])
    audits = [audit_ledger(path, pub)]
    assert check_against_report(audits, report).ok and audits[0].ok and audits[0].node_ids == [11]
    rewrite(path, _lines(path)[:3])  # a valid chain on its own
    audits = [audit_ledger(path, pub)]
    assert audits[0].ok
    check_against_report(audits, report)
    assert "entries were removed" in audits[0].problems[0]


def test_report_rows_are_matched_by_key_not_name(tmp_path):
    one, pub1 = _write_ledger(tmp_path, name="org-1")
    two, pub2 = _write_ledger(tmp_path, name="org-2")
    # each node calls itself by the other's name: the keys still tell which ledger is whose
    report = _report(tmp_path, [("org-2", 11, one, tmp_path / "org-1-key.pem", None),
                                ("org-1", 22, two, tmp_path / "org-2-key.pem", None)])
    audits = [audit_ledger(one, pub1), audit_ledger(two, pub2)]
    assert check_against_report(audits, report).ok
    assert [a.ok for a in audits] == [True, True] and [a.node_ids for a in audits] == [[11], [22]]
    rewrite(two, _lines(two)[:2])
    audits = [audit_ledger(one, pub1), audit_ledger(two, pub2)]
    check_against_report(audits, report)
    assert audits[0].ok and "the coordinator recorded 4 entries" in audits[1].problems[0]


def test_an_unmatched_node_fails(tmp_path, capsys):
    one, pub1 = _write_ledger(tmp_path, name="org-1")
    two, pub2 = _write_ledger(tmp_path, name="org-2")
    three, _ = _write_ledger(tmp_path, name="org-3")
    (tmp_path / "keys" / "org-3.pub").unlink()
    report = _report(tmp_path, [("org-1", 11, one, tmp_path / "org-1-key.pem", None),
                                ("org-3", 33, three, tmp_path / "org-3-key.pem", None)])
    audits = [audit_ledger(one, pub1), audit_ledger(two, pub2)]
    of_report = check_against_report(audits, report)
    assert "node id 33 (calls itself 'org-3'): unmatched" in " ".join(of_report.problems)  # its ledger is missing
    assert audits[0].ok
    assert audits[1].problems[0].startswith("unmatched: no node of the report sent this ledger's key")
    assert main(["audit", str(one), str(two), "--keys", str(tmp_path / "keys"), "--report", str(report)]) == 1
    err = capsys.readouterr().err
    assert "unmatched: its ledger key" in err and "org-2.jsonl: unmatched" in err


def test_a_node_id_that_switches_ledger_key_fails(tmp_path):
    one, pub1 = _write_ledger(tmp_path, name="org-1")
    two, pub2 = _write_ledger(tmp_path, name="org-2")
    report = _report(tmp_path, [("org-1", 11, one, tmp_path / "org-1-key.pem", None),
                                ("org-1", 11, two, tmp_path / "org-2-key.pem", None)])
    of_report = check_against_report([audit_ledger(one, pub1), audit_ledger(two, pub2)], report)
    assert "node id 11 sent 2 different ledger keys" in " ".join(of_report.problems)


def test_audit_cli_table_json_plot_and_exit_status(tmp_path, capsys):
    good, _ = _write_ledger(tmp_path, name="org-1")
    bad, _ = _write_ledger(tmp_path, name="org-2")
    rewrite(bad, _lines(bad)[:1] + _lines(bad)[2:])
    keys = str(tmp_path / "keys")
    assert main(["audit", str(good), "--keys", keys, "--plot", str(tmp_path / "eps.png")]) == 0
    out = capsys.readouterr().out
    assert "org-1" in out and "OK" in out and (tmp_path / "eps.png").stat().st_size > 1000
    assert "no --report given: entries removed at the END of a ledger cannot be detected" in out
    assert main(["audit", str(good), str(bad), "--keys", keys, "--json"]) == 1
    captured = capsys.readouterr()
    verdicts = {a["node"]: a["verdict"] for a in json.loads(captured.out)}
    assert verdicts == {"org-1": "OK", "org-2": "FAIL"}
    assert "org-2.jsonl: line 2: hash chain broken" in captured.err
    assert main(["audit", str(good), "--key", f"org-1={tmp_path / 'keys' / 'org-2.pub'}"]) == 1
    assert "signature does not verify with org-2.pub" in capsys.readouterr().err
    report = _report(tmp_path, [("org-1", 11, good, tmp_path / "org-1-key.pem", None)])
    assert main(["audit", str(good), "--keys", keys, "--report", str(report), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["node"], r["verdict"]) for r in rows] == [("org-1", "OK"), ("(report)", "OK")]
    assert rows[0]["node_ids"] == [11] and len(rows[0]["key_fingerprint"]) == 64


def test_two_divergent_ledgers_signed_by_one_key_fail_as_a_fork(tmp_path, capsys):
    """Threat: a node restores a backup (or copies its state dir) and trains on both copies: two ledgers,
    each a valid chain within budget, together spending the budget twice. The audit fails both."""
    path, pub = _write_ledger(tmp_path, rounds=4, name="org-1")
    key = load_or_create_signing_key(tmp_path / "org-1-key.pem")
    fork = tmp_path / "ledgers" / "org-1-restored.jsonl"
    rewrite(fork, _lines(path)[:2])  # the backup: the first two rounds
    history = [(0.9, 0.02, 10)] * 2
    with ledger.open_for_training(fork, key) as book:
        for rnd in (3, 4):
            history.append((0.9, 0.02, 10))
            book.append(entry(rnd, history, node="org-1", update_sha256="cd" * 32, run="run-2"))
    audits = [audit_ledger(path, pub), audit_ledger(fork, pub)]
    assert all(a.ok for a in audits)  # each alone is a valid ledger within its budget
    keys = [f"--key={path}={pub}", f"--key={fork}={pub}"]
    assert main(["audit", str(path), str(fork), *keys]) == 1
    err = capsys.readouterr().err
    assert f"org-1.jsonl: forked: {fork} is signed by the same key" in err
    assert "shares its first 2 lines, then line 3 differs" in err and "org-1-restored.jsonl: forked" in err
    report = _report(tmp_path, [("org-1", 11, path, tmp_path / "org-1-key.pem", None)])
    assert main(["audit", str(path), str(fork), *keys, "--report", str(report), "--json"]) == 1
    assert [a["verdict"] for a in json.loads(capsys.readouterr().out)][:2] == ["FAIL", "FAIL"]
    # an older copy of the same history is not a fork: it spent nothing the longer ledger lacks
    older = tmp_path / "ledgers" / "org-1-old.jsonl"
    rewrite(older, _lines(path)[:2])
    assert main(["audit", str(path), str(older), f"--key={path}={pub}", f"--key={older}={pub}"]) == 0
    assert f"warning: an older copy of {path}" in capsys.readouterr().err
