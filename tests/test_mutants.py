"""The committed mutation results cover the threat model: every row of its table has a mutant that its
tests caught (rows marked pending in tests/mutants.toml excepted), and every mutant still applies to
the code as it is (its old text occurs exactly once), so the results describe this code."""

from __future__ import annotations

import json
import re

from tests.mutants import RESULTS, ROOT, THREAT_MODEL, load


def threat_model_rows() -> list[str]:
    """The first cell of each row of the threat model's "Threats, protections and their tests" table."""
    section = THREAT_MODEL.read_text(encoding="utf-8").split("## Threats, protections and their tests", 1)[1]
    section = section.split("\n## ", 1)[0]
    rows = [m.group(1) for m in re.finditer(r"^\|\s*([0-9]+[a-z]?)\s*\|", section, re.MULTILINE)]
    assert rows, "no rows found in the threat model's table"
    return rows


def test_every_threat_model_row_has_a_caught_mutant():
    mutants, pending = load()
    results = json.loads(RESULTS.read_text())["mutants"]
    caught_rows = {r["row"] for r in results if r["caught"] is True}
    missing = [row for row in threat_model_rows() if row not in caught_rows and row not in pending]
    assert not missing, (f"threat-model rows without a caught mutant: {missing}. Add a mutant per protection to "
                         "tests/mutants.toml and run `make mutants` (or mark the row pending, saying why)")
    assert all(r["caught"] is True for r in results), [r["name"] for r in results if not r["caught"]]
    by_name = {r["name"]: r for r in results}
    for m in mutants:
        assert m["name"] in by_name, f"mutant {m['name']!r} has no result: `python -m tests.mutants --row {m['row']}`"
        assert (by_name[m["name"]]["row"], by_name[m["name"]]["tests"]) == (m["row"], m["tests"]), m["name"]


def test_every_mutant_still_applies_to_the_code():
    mutants, pending = load()
    rows = set(threat_model_rows())
    for m in mutants:
        assert m["row"] in rows, f"mutant {m['name']!r} names row {m['row']}, which the threat model does not have"
        assert m["row"] not in pending, f"row {m['row']} is marked pending but has mutant {m['name']!r}"
        for edit in m["edits"]:
            count = (ROOT / edit["file"]).read_text(encoding="utf-8").count(edit["old"])
            assert count == 1, (f"mutant {m['name']!r}: its old text occurs {count} times in {edit['file']}: update "
                                "tests/mutants.toml to the code's new text and run `make mutants` again")
        for test in m["tests"]:
            path, _, name = test.partition("::")
            assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", (ROOT / path).read_text(), re.MULTILINE), \
                f"mutant {m['name']!r} names {test}, which does not exist"
