"""A node needs only the base install: the extras hold what serving, evaluation, tuning and tests use."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedchat import cli
from shared import errors

ROOT = Path(__file__).resolve().parents[1]
EXTRA_PACKAGES = {"fastapi", "uvicorn", "optuna", "rouge_score", "sacrebleu", "nltk", "openai", "pytest", "ray"}

# What a node imports to check its config, approve a bundle, start, and run the ClientApp.
NODE_MODULES = [
    "client.client_app", "client.data", "client.policy", "client.privacy", "client.secagg_mod", "client.train",
    "client.ledger_registry", "shared.config", "shared.evaluation", "shared.merge", "fedchat.audit.ledger_audit",
    "fedchat.cli", "fedchat.node.runtime", "fedchat.node.app_bundle", "fedchat.cli.node_commands",
    "fedchat.cli.roster_commands",
    "fedchat.federation.service_config",
]


def test_importing_the_node_side_pulls_in_no_extra_package():
    code = ("import importlib, json, sys\n"
            f"for name in {NODE_MODULES!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & EXTRA_PACKAGES, f"a node's import loads {sorted(loaded & EXTRA_PACKAGES)}"


def test_the_base_install_leaves_the_extras_out_and_test_holds_them_all():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in reqs}  # noqa: E731
    base = names(project["dependencies"])
    extras = project["optional-dependencies"]
    for package in ("fastapi", "uvicorn", "optuna", "rouge-score", "sacrebleu", "pytest", "ray"):
        assert package not in base, package
    assert not [r for r in project["dependencies"] if "[" in r], "a node's install pulls an extra of a dependency"
    assert extras["simulation"] == [next(r for r in project["dependencies"] if r.startswith("flwr=="))
                                    .replace("flwr==", "flwr[simulation]==")]  # the same Flower, with Ray
    assert {"fastapi", "uvicorn"} <= names(extras["serve"])
    assert {"rouge-score", "sacrebleu"} <= names(extras["eval"])
    assert "optuna" in names(extras["tune"]) and "fedchat[eval,simulation]" in extras["tune"]
    assert any(r.startswith("fedchat[") and {"serve", "eval", "tune", "simulation"} <= set(r[8:-1].split(","))
               for r in extras["test"])
    assert set(errors.EXTRA_MODULES) <= set(extras)


@pytest.mark.parametrize(("argv", "extra"), [
    (["serve", "--model", "m"], "serve"),
    (["eval", "m", "--data", "d.jsonl"], "eval"),
    (["tune", "--trials", "1"], "tune"),
    (["demo", "--out", "x"], "eval"),
    (["demo", "--out", "x"], "simulation"),
    (["tune", "--trials", "1"], "simulation"),
])
def test_a_command_missing_its_extra_says_which_to_install(monkeypatch, capsys, argv, extra):
    import importlib.util

    real = importlib.util.find_spec
    absent = set(errors.EXTRA_MODULES[extra])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"install fedchat[{extra}]" in err and sorted(absent)[0] in err


def test_scoring_without_the_eval_extra_is_a_fedchat_error(monkeypatch):
    import importlib.util

    from shared.evaluation import text_scores

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else real(name, *a))
    with pytest.raises(errors.MissingExtraError, match=r"install fedchat\[eval\]"):
        text_scores(["a"], ["a"])


def test_a_simulation_without_the_simulation_extra_is_a_fedchat_error(monkeypatch):
    import importlib.util

    from fedchat.federation.simulation import run_apps
    from shared.config import RunConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(errors.MissingExtraError, match=r"install fedchat\[simulation\]"):
        run_apps(RunConfig(), None, None, 2)
