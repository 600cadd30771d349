"""The privacy ledger and `fedchat audit`: intact ledgers pass, every tampering fails."""

import json

import pytest

from client.privacy import compute_epsilon
from fedchat.cli import main
from shared import ledger
from shared.audit import audit_ledger, check_against_report
from shared.crypto import load_or_create_signing_key, new_signing_key, public_pem, sign
from shared.errors import LedgerError


def _write_ledger(tmp_path, rounds=4, accountant="prv", target=8.0, name="org-1"):
    key = load_or_create_signing_key(tmp_path / f"{name}-key.pem")
    path = tmp_path / f"{name}.jsonl"
    history = []
    for rnd in range(1, rounds + 1):
        history.append((0.9, 0.02, 10))
        ledger.append(path, {
            "node": name, "run": "run-1", "round": rnd, "time": f"2026-11-22T10:0{rnd}:00+00:00",
            "num_examples": 400, "sample_rate": 0.02, "noise_multiplier": 0.9, "max_grad_norm": 1.0,
            "steps": 10, "delta": 1e-5, "accountant": accountant,
            "epsilon": compute_epsilon(history, 1e-5, accountant), "target_epsilon": target,
            "update_sha256": "ab" * 32}, key)
    (tmp_path / f"{name}.pub").write_bytes(public_pem(key))
    return path, tmp_path / f"{name}.pub"


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_intact_ledger_passes_and_recomputed_epsilon_matches_within_1pct(tmp_path, accountant):
    path, pub = _write_ledger(tmp_path, accountant=accountant)
    audit = audit_ledger(path, pub)
    assert audit.ok, audit.problems
    assert audit.rounds == 4 and audit.node == "org-1"
    for h in audit.history:
        assert abs(h["recomputed"] - h["claimed"]) <= 0.01 * h["claimed"]
    lines = path.read_bytes().split(b"\n")[:-1]
    assert json.loads(lines[0])["prev"] == "0" * 64
    assert json.loads(lines[1])["prev"] == ledger.line_hash(lines[0])


def _rewrite(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_edited_field_is_caught(tmp_path):
    path, pub = _write_ledger(tmp_path)
    lines = path.read_bytes().split(b"\n")[:-1]
    entry = json.loads(lines[1])
    entry["epsilon"] = entry["epsilon"] / 2  # understate what was spent
    lines[1] = ledger.canonical(entry)
    _rewrite(path, lines)
    problems = " ".join(audit_ledger(path, pub).problems)
    assert "line 2: signature does not verify" in problems
    assert "line 3: hash chain broken" in problems
    assert "line 2: claims epsilon" in problems


@pytest.mark.parametrize("how", ["cut", "drop-middle", "drop-first"])
def test_truncated_ledgers_are_caught(tmp_path, how):
    path, pub = _write_ledger(tmp_path)
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]
    if how == "cut":
        path.write_bytes(data[:-40])
        expected = "incomplete last line"
    elif how == "drop-middle":
        _rewrite(path, lines[:1] + lines[2:])
        expected = "line 2: hash chain broken"
    else:
        _rewrite(path, lines[1:])
        expected = "line 1: hash chain broken"
    assert expected in " ".join(audit_ledger(path, pub).problems)


def test_entries_removed_at_the_end_are_caught_with_the_coordinators_report(tmp_path):
    path, pub = _write_ledger(tmp_path)
    lines = path.read_bytes().split(b"\n")[:-1]
    report = {"rounds": [{"round": 4, "clients": [{"node": "org-1", "ledger_entries": 4,
                                                    "ledger_head": ledger.line_hash(lines[-1])}]}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    audits = [audit_ledger(path, pub)]
    check_against_report(audits, tmp_path / "report.json")
    assert audits[0].ok
    _rewrite(path, lines[:3])  # a valid chain on its own
    audits = [audit_ledger(path, pub)]
    assert audits[0].ok
    check_against_report(audits, tmp_path / "report.json")
    assert "entries were removed" in audits[0].problems[0]


def test_reordered_lines_are_caught(tmp_path):
    path, pub = _write_ledger(tmp_path)
    lines = path.read_bytes().split(b"\n")[:-1]
    lines[1], lines[2] = lines[2], lines[1]
    _rewrite(path, lines)
    assert "hash chain broken" in " ".join(audit_ledger(path, pub).problems)


def test_resigned_with_another_key_is_caught(tmp_path):
    path, pub = _write_ledger(tmp_path)
    other = new_signing_key()
    lines, prev = [], ledger.GENESIS
    for line in path.read_bytes().split(b"\n")[:-1]:
        entry = json.loads(line)
        entry["prev"] = prev
        entry.pop("signature")
        entry["signature"] = sign(other, ledger.canonical(entry))
        lines.append(ledger.canonical(entry))
        prev = ledger.line_hash(lines[-1])
    _rewrite(path, lines)
    problems = audit_ledger(path, pub).problems
    assert len(problems) == 4 and all("signature does not verify" in p for p in problems)


def test_overspent_ledger_fails(tmp_path):
    path, pub = _write_ledger(tmp_path, target=0.5)
    assert "exceeds the budget 0.5: overspent" in " ".join(audit_ledger(path, pub).problems)


def test_audit_cli_table_json_plot_and_exit_status(tmp_path, capsys):
    good, _ = _write_ledger(tmp_path, name="org-1")
    bad, _ = _write_ledger(tmp_path, name="org-2")
    lines = bad.read_bytes().split(b"\n")[:-1]
    _rewrite(bad, lines[:1] + lines[2:])
    assert main(["audit", str(good), "--plot", str(tmp_path / "eps.png")]) == 0
    out = capsys.readouterr().out
    assert "org-1" in out and "OK" in out and (tmp_path / "eps.png").stat().st_size > 1000
    assert main(["audit", str(good), str(bad), "--json"]) == 1
    captured = capsys.readouterr()
    verdicts = {a["node"]: a["verdict"] for a in json.loads(captured.out)}
    assert verdicts == {"org-1": "OK", "org-2": "FAIL"}
    assert main(["audit", str(good), "--key", str(tmp_path / "org-2.pub")]) == 1
    assert "signature does not verify with org-2.pub" in capsys.readouterr().err


def test_append_is_atomic_and_refuses_a_corrupt_ledger(tmp_path):
    path, _ = _write_ledger(tmp_path, rounds=1)
    key = load_or_create_signing_key(tmp_path / "org-1-key.pem")
    entry = json.loads(path.read_text().splitlines()[0])
    intact = path.read_bytes()
    with pytest.raises(LedgerError, match="lacks"):  # a failed append leaves the ledger as it was
        ledger.append(path, {k: v for k, v in entry.items() if k != "epsilon"}, key)
    assert path.read_bytes() == intact
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind

    cut = intact[:-10]
    path.write_bytes(cut)
    with pytest.raises(LedgerError, match="incomplete"):
        ledger.read_entries(path)
    with pytest.raises(LedgerError, match="incomplete"):  # nothing is chained onto a cut ledger
        ledger.append(path, {**entry, "round": 2}, key)
    assert path.read_bytes() == cut
