"""Mutation checks for docs/threat-model.md: every protection removed in turn must fail its row's tests.

    python -m tests.mutants                 # every mutant in tests/mutants.toml (make mutants)
    python -m tests.mutants --row 6         # one row's mutants (the results of the others are kept)
    python -m tests.mutants --list

For each mutant: copy the repository (the files git tracks or would track, never .venv, runs or .git) to
a temporary folder, apply its edits (each `old` text must occur exactly once in its file), run its tests
with pytest -x, and record caught (they failed) or not caught (they passed). First, all the chosen
mutants' tests must pass on an unchanged copy (else failing under a mutant would prove nothing).
Results go to bench/results/mutants.json as {"mutants": [{"row", "name", "tests", "caught"}, ...]} and
to the "Mutation checks" table of the threat model. Slow (a pytest run per mutant): it runs outside
`make test`; tests/test_mutants.py checks its committed results quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "mutants.toml"
RESULTS = ROOT / "bench" / "results" / "mutants.json"
THREAT_MODEL = ROOT / "docs" / "threat-model.md"
START, END = "<!-- mutants:start -->", "<!-- mutants:end -->"


class MutantError(Exception):
    """A mutant that cannot be applied or judged; the message says what to fix."""


def load(path: Path = DATA) -> tuple[list[dict], dict[str, str]]:
    """(mutants, pending rows -> why) from tests/mutants.toml, checked for shape."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    mutants, names = data.get("mutant", []), set()
    for number, m in enumerate(mutants, 1):
        where = f"{path.name} mutant {number} ({m.get('name', '?')!r})"
        for key, kind in (("row", str), ("name", str), ("tests", list), ("edits", list)):
            if not isinstance(m.get(key), kind) or not m[key]:
                raise MutantError(f"{where}: '{key}' must be a non-empty {kind.__name__}")
        if m["name"] in names:
            raise MutantError(f"{where}: the name is used twice; each mutant needs its own")
        names.add(m["name"])
        for edit in m["edits"]:
            if not (isinstance(edit, dict) and isinstance(edit.get("file"), str) and isinstance(edit.get("old"), str)
                    and edit["old"] and isinstance(edit.get("new"), str)):
                raise MutantError(f"{where}: each edit is {{file = PATH, old = TEXT, new = TEXT}} with a non-empty old")
    return mutants, {str(k): str(v) for k, v in data.get("pending", {}).items()}


def apply(folder: Path, mutant: dict) -> None:
    """Apply a mutant's edits to the copy in `folder`."""
    for edit in mutant["edits"]:
        path = folder / edit["file"]
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        count = text.count(edit["old"])
        if count != 1:
            raise MutantError(f"mutant {mutant['name']!r}: its old text occurs {count} times in {edit['file']} "
                              "(must be once): the code changed; update the mutant in tests/mutants.toml to the "
                              "code's new text")
        path.write_text(text.replace(edit["old"], edit["new"]), encoding="utf-8")


def copy_repo(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def run_tests(folder: Path, tests: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    return done.returncode, (done.stdout + done.stderr)[-3000:]


def _env(folder: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(folder), "FEDCHAT_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}


def baseline(tests: list[str], cache: Path, timeout: float) -> None:
    """The mutants' tests pass on the unchanged code (else failing under a mutant would prove nothing)."""
    with tempfile.TemporaryDirectory(prefix="fedchat-mutant-") as tmp:
        folder = copy_repo(Path(tmp) / "repo")
        code, out = run_tests(folder, [*dict.fromkeys(tests)], _env(folder, cache), timeout * 4)
    if code != 0:
        raise MutantError(f"the mutants' tests do not all pass on the unchanged code (exit {code}): fix them "
                          f"first:\n{out}")


def judge(mutant: dict, cache: Path, timeout: float) -> dict:
    """Run one mutant's tests on a copy of the repository with the mutant applied."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedchat-mutant-") as tmp:
        folder = copy_repo(Path(tmp) / "repo")
        env = _env(folder, cache)
        apply(folder, mutant)
        code, out = run_tests(folder, mutant["tests"], env, timeout)
    if code not in (0, 1):
        raise MutantError(f"mutant {mutant['name']!r}: pytest exit {code} under the mutant (not a test "
                          f"failure):\n{out}")
    return {"row": mutant["row"], "name": mutant["name"], "tests": mutant["tests"], "caught": code == 1,
            "seconds": round(time.monotonic() - started, 1)}


def table(results: list[dict]) -> str:
    lines = ["| row | protection removed (mutant) | caught by | caught |", "|---|---|---|---|"]
    for r in results:
        tests = ", ".join(f"`{t.split('::', 1)[-1]}`" for t in r["tests"])
        lines.append(f"| {r['row']} | {r['name']} | {tests} | {'yes' if r['caught'] else '**NO**'} |")
    return "\n".join(lines)


def write_threat_model_table(results: list[dict], path: Path = THREAT_MODEL) -> None:
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise MutantError(f"{path} has no {START} ... {END} block for the results: add one where they belong")
    head, rest = text.split(START, 1)
    path.write_text(head + START + "\n" + table(results) + "\n" + END + rest.split(END, 1)[1], encoding="utf-8")


def record(fresh: dict[str, dict]) -> list[dict]:
    """Merge this run's results into bench/results/mutants.json as it is now (another run of other rows may
    have written it meanwhile), in tests/mutants.toml's order; results of mutants no longer there are dropped."""
    previous = json.loads(RESULTS.read_text())["mutants"] if RESULTS.exists() else []
    by_name = {**{r["name"]: r for r in previous}, **fresh}
    results = [by_name[m["name"]] for m in load()[0] if m["name"] in by_name]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"mutants": results}, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.split("\n\n")[0])
    p.add_argument("--row", action="append", help="only this row's mutants (repeatable); other results are kept")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    args = p.parse_args(argv)
    mutants, _ = load()
    chosen = [m for m in mutants if not args.row or m["row"] in args.row]
    if args.list:
        for m in chosen:
            print(f"row {m['row']:>3}  {m['name']}")
        return 0
    if not chosen:
        print(f"no mutants for row(s) {', '.join(args.row)} in {DATA}", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("FEDCHAT_CACHE") or tempfile.mkdtemp(prefix="fedchat-mutants-cache-"))
    try:
        baseline([t for m in chosen for t in m["tests"]], cache, args.timeout)
    except MutantError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    print(f"baseline: the tests of {len(chosen)} mutants pass on the unchanged code", flush=True)
    failed, fresh = 0, {}
    for m in chosen:
        try:
            result = judge(m, cache, args.timeout)
        except MutantError as exc:
            print(f"ERROR row {m['row']}: {exc}", file=sys.stderr)
            result = {"row": m["row"], "name": m["name"], "tests": m["tests"], "caught": False, "error": str(exc)[:500]}
        fresh[m["name"]] = result
        failed += not result["caught"]
        print(f"row {m['row']:>3}  {'caught' if result['caught'] else 'NOT CAUGHT'}  {m['name']}", flush=True)
    results = record(fresh)
    write_threat_model_table(results)
    print(f"{len(chosen) - failed} of {len(chosen)} mutants caught; results in {RESULTS.relative_to(ROOT)} and "
          f"{THREAT_MODEL.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
