"""Nodes run only the app code their operators approved (issue 9, finding 1).

The threat: a SuperNode runs the ClientApp from the bundle (FAB) the SuperLink hands it, so whoever
submits a run (a curious coordinator, or anyone reaching the Control API) could replace the code that
keeps the node's promises (require-dp, require-secagg, the budget guard, the ledger).

Fast tests: `fedchat app build` is the bundle `flwr run` submits; `fedchat node approve` lists and
records it, and refuses bad input with a message that says what to do. Slow tests: a real federation
(TLS SuperLink with node authentication, 3 nodes started with `fedchat node start node.toml` as the
runbooks do, on 127.0.0.1 with free ports): a bundle whose client/client_app.py was changed is refused by
every node before any of its code runs (it would write a marker file at import), the round fails
saying so; the approved bundle runs; and the control: a node whose operator approves the changed
bundle does run it (the marker appears), so the refusal is the approval check and nothing else.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from fedchat.cli import main as fedchat_main
from fedchat.federation.service_config import ConfigFileError, node_command, read_node_file
from fedchat.node.app_bundle import build_bundle, load_bundle_file, unpack_bundle
from shared.crypto import create_identity_key, raw_public_hex

ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def snapshot(dest: Path) -> Path:
    """The app's files as `flwr run` packs them, copied (other work on the checkout cannot change them)."""
    return unpack_bundle(build_bundle(ROOT), dest)


def tamper(app: Path, dest: Path, marker: Path) -> Path:
    """A copy of the app whose client/client_app.py writes `marker` when it is imported: modified node code."""
    shutil.copytree(app, dest)
    with open(dest / "client" / "client_app.py", "a", encoding="utf-8") as f:
        f.write(f"\n\nimport os as _os, pathlib as _pathlib  # not the code the node operator approved\n"
                f"_pathlib.Path({str(marker)!r}).write_text(_os.environ.get('FLWR_HOME', '?'))\n")
    return dest


def node_file(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "d.jsonl").write_text(json.dumps(CONVERSATION) + "\n")
    path = folder / "node.toml"
    path.write_text('# the operator\'s comment\n[node]\nnode-name = "org-1"\ndata-path = "d.jsonl"\n'
                    'state-dir = "state"\n'
                    '\n[connection]  # kept\nsuperlink = "127.0.0.1:9093"\ninsecure = true\n' + extra)
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Path:
    return snapshot(tmp_path_factory.mktemp("app") / "fedchat")


# ------------------------------------------------------------------ build and approve (fast)

def test_app_build_is_the_bundle_flwr_run_submits(app, tmp_path, capsys):
    from flwr.cli.build import build_fab_from_disk

    submitted = hashlib.sha256(build_fab_from_disk(app)).hexdigest()  # what `flwr run APP` computes and sends
    assert fedchat_main(["app", "build", "--app", str(app), "--out", str(tmp_path / "b.fab")]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"sha256 {submitted}"
    assert hashlib.sha256((tmp_path / "b.fab").read_bytes()).hexdigest() == submitted
    assert "client/client_app.py" in out and "shared/ledger.py" in out and ".venv" not in out
    bundle = load_bundle_file(tmp_path / "b.fab")
    assert {"pyproject.toml", "client/client_app.py", "client/privacy.py", "server/server_app.py"} \
        <= set(bundle.file_hashes())
    # serving is no part of what nodes run: neither the serving package nor the old server/serve*.py
    assert not [f for f in bundle.file_hashes() if f.startswith(("serving/", "server/serve.py", "server/serve_"))]
    assert fedchat_main(["app", "build", "--app", str(app), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == submitted


def test_node_approve_lists_the_bundle_and_records_its_hash(app, tmp_path, capsys):
    path = node_file(tmp_path / "node")
    with pytest.raises(ConfigFileError, match="no app bundle is approved"):  # a node with no approval is refused
        from fedchat.federation.service_config import check_node_file

        check_node_file(read_node_file(path))
    assert fedchat_main(["app", "build", "--app", str(app), "--out", str(tmp_path / "b.fab")]) == 0
    sha = capsys.readouterr().out.strip().splitlines()[-1].split()[-1]

    assert fedchat_main(["node", "approve", str(path), str(tmp_path / "b.fab"), "--app", str(app)]) == 0
    out = capsys.readouterr().out
    assert f"app bundle sha256 {sha}" in out and "client/client_app.py" in out and "same as installed" in out
    assert read_node_file(path).approved == (sha,)
    text = path.read_text()
    assert "# the operator's comment" in text and "[connection]  # kept" in text  # the rest of the file is kept
    assert fedchat_main(["node", "approve", str(path), sha, "--app", str(app)]) == 0  # the bare hash of this app
    assert read_node_file(path).approved == (sha,)  # recorded once
    # with the roster approved too (secure aggregation: its identity key listed), the config checks out
    key_paths = {"org-1": tmp_path / "node" / "state" / "identity-key.pem",  # the node's default place
                 **{f"org-{i}": tmp_path / "peers" / f"org-{i}.pem" for i in (2, 3)}}
    keys = {name: raw_public_hex(create_identity_key(key)) for name, key in key_paths.items()}
    roster = tmp_path / "node" / "roster-v1.json"
    assert fedchat_main(["roster", "init", "--federation", "test", *(f"--member={n}={k}" for n, k in keys.items()),
                         "--out", str(roster)]) == 0
    assert fedchat_main(["roster", "approve", str(path), str(roster)]) == 0
    assert read_node_file(path).approved == (sha,)  # the bundle's approval is kept beside the roster's
    capsys.readouterr()
    assert fedchat_main(["node", "check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"approved app bundle: sha256 {sha}" in out and "roster member org-1" in out
    assert "--isolation process" in " ".join(node_command(read_node_file(path)))  # the SuperNode runs no ClientApp


def test_node_approve_refuses_what_it_cannot_inspect_with_a_clear_error(app, tmp_path, capsys):
    path = node_file(tmp_path / "node")
    (tmp_path / "junk.fab").write_text("not a zip")
    no_manifest = io.BytesIO()
    with zipfile.ZipFile(no_manifest, "w") as z:
        z.writestr("pyproject.toml", "[project]\n")
    (tmp_path / "plain.zip").write_bytes(no_manifest.getvalue())
    good = build_bundle(app)
    forged = io.BytesIO()  # a file changed after the manifest was written
    with zipfile.ZipFile(io.BytesIO(good.content)) as src, zipfile.ZipFile(forged, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data + b"\nx = 1\n" if name == "client/client_app.py" else data)
    (tmp_path / "forged.fab").write_bytes(forged.getvalue())
    for argument, message in [
        (str(tmp_path / "junk.fab"), "is not a Flower app bundle (.fab, a zip file)"),
        (str(tmp_path / "plain.zip"), "has no .info/CONTENT manifest"),
        (str(tmp_path / "forged.fab"), "client/client_app.py does not match the bundle's manifest"),
        ("abc123", "is neither an app bundle file (.fab) nor a SHA-256"),
        (str(tmp_path / "missing.fab"), "is neither an app bundle file"),
        ("0" * 64, "is not the app bundle of the fedchat installed here"),
    ]:
        assert fedchat_main(["node", "approve", str(path), argument, "--app", str(app)]) == 2, argument
        assert message in capsys.readouterr().err, argument
    assert read_node_file(path).approved == ()  # nothing was recorded

    changed = tamper(app, tmp_path / "changed", tmp_path / "marker")
    assert fedchat_main(["app", "build", "--app", str(changed), "--out", str(tmp_path / "changed.fab")]) == 0
    capsys.readouterr()
    assert fedchat_main(["node", "approve", str(path), str(tmp_path / "changed.fab"), "--app", str(app)]) == 2
    captured = capsys.readouterr()
    assert "client/client_app.py" in captured.out and "DIFFERS from installed" in captured.out
    assert "differ from the fedchat installed here" in captured.err and "--accept-differences" in captured.err
    assert read_node_file(path).approved == ()
    assert fedchat_main(["node", "approve", str(path), str(tmp_path / "changed.fab"), "--app", str(app),
                         "--accept-differences"]) == 0
    changed_sha = load_bundle_file(tmp_path / "changed.fab").sha256
    assert read_node_file(path).approved == (changed_sha,)
    # Threat: a coordinator falls back to an older approved bundle (one with a since-fixed flaw). A new
    # approval replaces the old ones unless the operator keeps them on purpose.
    assert fedchat_main(["app", "build", "--app", str(app), "--out", str(tmp_path / "b.fab")]) == 0
    sha = load_bundle_file(tmp_path / "b.fab").sha256
    assert fedchat_main(["node", "approve", str(path), str(tmp_path / "b.fab"), "--app", str(app)]) == 0
    assert read_node_file(path).approved == (sha,)
    assert fedchat_main(["node", "approve", str(path), str(tmp_path / "changed.fab"), "--app", str(app),
                         "--accept-differences", "--keep-others"]) == 0
    assert read_node_file(path).approved == (sha, changed_sha)


def test_a_new_approval_replaces_the_hashes_in_node_toml_and_in_the_approvals_file(app, tmp_path, capsys):
    """Threat: a node.toml with both `app-sha256 = [...]` and `file = ...`; an approval that rewrote only the
    file left the list's old hashes approved, so a coordinator could fall back to an older bundle."""
    old, older = "a" * 64, "b" * 64
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "approved.txt").write_text(f"{older}\n")
    path = node_file(tmp_path / "node", f'\n[approval]\napp-sha256 = ["{old}"]\nfile = "approved.txt"\n')
    assert set(read_node_file(path).approved) == {old, older}
    assert fedchat_main(["app", "build", "--app", str(app), "--out", str(tmp_path / "b.fab")]) == 0
    sha = load_bundle_file(tmp_path / "b.fab").sha256
    assert fedchat_main(["node", "approve", str(path), str(tmp_path / "b.fab"), "--app", str(app)]) == 0
    assert "earlier approvals removed" in capsys.readouterr().out
    assert read_node_file(path).approved == (sha,)
    assert old not in path.read_text() and 'file = "approved.txt"' in path.read_text()
    assert "[connection]  # kept" in path.read_text()
    assert fedchat_main(["node", "approve", str(path), str(tmp_path / "b.fab"), "--app", str(app)]) == 0
    assert read_node_file(path).approved == (sha,)


def test_a_malformed_approval_is_refused(tmp_path):
    for extra, message in [('\n[approval]\napp-sha256 = "abc"\n', "must be a list of SHA-256 hashes"),
                           ('\n[approval]\napp-sha256 = ["ABC"]\n', "must be a list of SHA-256 hashes"),
                           ('\n[approval]\napps = []\n', "unknown key(s) apps")]:
        with pytest.raises(ConfigFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_node_file(node_file(tmp_path / str(abs(hash(extra))), extra))


# ------------------------------------------------------------------ a real federation (slow)

@pytest.fixture(scope="module")
def federation(tmp_path_factory, app):
    """SuperLink (TLS, node authentication) and 3 nodes started by `fedchat node start node.toml`, each
    node.toml approving the bundle of `app` (`fedchat node approve`), as the local federation does."""
    from fedchat.federation.local_federation import LocalFederation, Runner
    from fedchat.federation.processes import survivors
    from shared.model import resolve_base_model

    resolve_base_model("tiny")
    out = tmp_path_factory.mktemp("federation") / "fed"
    out.mkdir()
    fed = LocalFederation(nodes=3, rounds=1, base_model="tiny", out=out, app=app, local_steps=2, batch_size=4,
                          startup_timeout=180, run_config={"eval-max-conversations": 16, "merge": False})
    runner = Runner(fed)
    try:
        runner.start()
        yield runner
    finally:
        runner.stop()
        assert survivors(out / "processes.json") == []


def _submit(runner, app: Path, out_dir: str) -> str:
    from fedchat.federation.deployment import write_toml

    values = {**runner.fed.coordinator_config(), "out-dir": str(runner.out / out_dir)}
    return runner.cli.run(app, write_toml(runner.out / f"{out_dir}.toml", values))


def _wait_finished(runner, run_id: str, timeout: float, until=lambda: False) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = runner.cli.run_status(run_id)["status"]
        if status.startswith("finished") or until():
            return status
        problem = runner._check_services()
        assert problem is None, problem
        assert time.monotonic() < deadline, f"run {run_id} still '{status}' after {timeout} s"
        time.sleep(2)


def _node_logs(runner) -> dict[str, str]:
    return {f"org-{i}": (runner.logs / f"org-{i}.log").read_text(errors="replace") for i in (1, 2, 3)}


@pytest.mark.slow
def test_the_local_federation_starts_its_services_with_the_kits_commands(federation, tmp_path):
    """The real Runner: the argv it started the SuperLink and the nodes with is `service_command`'s, the one the
    deploy kit's containers and units run (tests/test_deploy_kit.py), and `node start --print` shows its flags."""
    import os
    import shlex
    import subprocess

    from fedchat.federation.local_federation import service_command

    out = federation.fed.out.resolve()
    started = {s.name: s.argv for s in federation.sup.services}
    assert started["superlink"] == service_command("coordinator", out / "superlink" / "coordinator.toml")
    for n in ("org-1", "org-2", "org-3"):
        config = out / "nodes" / n / "node.toml"
        assert started[n] == service_command("node", config)
        assert federation.app_sha256 in read_node_file(config).approved  # `fedchat node approve` before start
        printed = subprocess.run([started[n][0], "node", "start", str(config), "--print"], capture_output=True,
                                 text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
        assert printed.returncode == 0, printed.stderr
        flags = [a for a in shlex.split(printed.stdout) if a.startswith("--")]
        assert flags == [a for a in node_command(read_node_file(config)) if a.startswith("--")]
    commands = (federation.fed.out / "commands.sh").read_text()
    assert shlex.join(started["superlink"]) in commands and shlex.join(started["org-2"]) in commands
    assert commands.count(" app build ") == 1 and commands.count(" node approve ") == 3


@pytest.mark.slow
def test_a_node_refuses_an_app_bundle_its_operator_did_not_approve(federation, tmp_path):
    marker = tmp_path / "unapproved-code-ran"
    changed = tamper(federation.app_src, tmp_path / "fedchat", marker)
    changed_sha = build_bundle(changed).sha256
    assert changed_sha != federation.app_sha256

    run_id = _submit(federation, changed, "run-unapproved")  # what a coordinator running modified code does
    status = _wait_finished(federation, run_id, timeout=400)
    server_log = federation.cli.logs(run_id)

    assert not marker.exists(), "code of the unapproved bundle ran on a node"
    for name, log in _node_logs(federation).items():
        assert f"REFUSED app bundle sha256 {changed_sha}: it is not approved in" in log, name
        assert "Nothing of it was installed or run" in log, name
        apps = federation.out / "nodes" / name / "flwr-home" / "apps"
        assert not any(changed_sha[:8] in p.name for p in (apps.iterdir() if apps.exists() else [])), name
    # The coordinator learns why: the nodes' error replies name the refused bundle (no node path in them).
    report = json.loads((federation.out / "run-unapproved" / "report.json").read_text())
    assert report["completed_rounds"] == 0 or report["rounds"][0]["status"] == "failed", (status, report)
    assert f"node refused app bundle sha256 {changed_sha}: its operator did not approve it" in server_log, \
        server_log[-3000:]
    assert str(federation.out / "nodes") not in server_log


@pytest.mark.slow
def test_a_node_whose_operator_approves_the_changed_bundle_runs_it(federation, tmp_path):
    """The control: the same changed bundle does run where its operator approved it (so the refusal
    above is the approval check, and the marker would have shown the bundle's code running)."""
    marker = tmp_path / "approved-changed-code-ran"
    changed = tamper(federation.app_src, tmp_path / "fedchat", marker)
    bundle = tmp_path / "changed.fab"
    assert fedchat_main(["app", "build", "--app", str(changed), "--out", str(bundle)]) == 0
    org1 = federation.out / "nodes" / "org-1" / "node.toml"
    assert fedchat_main(["node", "approve", str(org1), str(bundle), "--app", str(federation.app_src),
                         "--accept-differences"]) == 0  # on the running node: applies at the next run

    run_id = _submit(federation, changed, "run-changed")
    try:
        _wait_finished(federation, run_id, timeout=400, until=marker.exists)
    finally:
        if not federation.cli.run_status(run_id)["status"].startswith("finished"):
            federation.cli.stop(run_id)
    assert marker.exists()
    assert marker.read_text() == str(federation.out / "nodes" / "org-1" / "flwr-home")  # org-1 ran it, only org-1


def test_the_node_checks_the_bundles_bytes_not_what_the_run_claims(app, tmp_path):
    """The guard in the ClientApp runner (fast: no federation): the hash of the bytes decides."""
    from flwr.supercore.fab import Fab

    from fedchat.node.runtime import BundleGuard, UnapprovedApp

    content = build_bundle(app).content
    sha = hashlib.sha256(content).hexdigest()
    path = node_file(tmp_path / "node", f'\n[approval]\napp-sha256 = ["{sha}"]\n')
    guard = BundleGuard(path)
    guard.fab = Fab(sha, content, {})
    assert guard.check(content) == sha
    with pytest.raises(UnapprovedApp, match="its operator did not approve it"):
        guard.check(content + b"\0")  # other bytes that claim the approved hash
    guard.fab = Fab("0" * 64, content, {})
    with pytest.raises(UnapprovedApp, match="the run calls it"):  # approved bytes, another claimed hash
        guard.check(content)
    guard.fab = Fab(sha, content, {})
    path.write_text("[approval\n")  # an unreadable config: nothing runs
    with pytest.raises(UnapprovedApp, match="its approvals cannot be read") as refused:
        guard.check(content)
    assert str(tmp_path) not in str(refused.value)  # what goes back to the coordinator names no local path
