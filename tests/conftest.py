"""Shared fixtures: the tiny random Llama (SmolLM2 tokenizer) prepared once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One torch thread per process, in this process and every one a test starts (nodes, SuperNodes' ClientApps, Ray's
# virtual nodes): two workers on 2 cores each start several torch processes at once, and more threads than cores
# only make OpenMP's waiting threads spin (measured: 17% less CPU time for the same tests). Set before torch loads.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

from shared.logs import quiet_library_warnings  # noqa: E402

quiet_library_warnings()


# `make test` runs two pytest workers (pytest-xdist): a test file stays on one worker (its module
# fixtures are made once; the fault drill's hosts exist once), and the files that start Flower's
# simulation engine share one worker, so that no two Ray clusters run at once on the machine. The
# longest files go first, longest first (their durations under `make test`), so that neither worker is
# left with one of them at the end. (xdist's own `--dist loadgroup` does not group under pytest 9.2:
# its workers' test ids lose the group.)
RAY_FILES = {"test_bundle_contents", "test_scale", "test_secagg", "test_secagg_attacks", "test_simulation", "test_tune"}
FIRST = ("test_faults", "ray", "test_deploy_kit", "test_app_approval", "test_deploy", "test_privacy_audit",
         "test_serving")


def _scope(nodeid: str) -> str:
    stem = Path(nodeid.split("::", 1)[0]).stem
    return "ray" if stem in RAY_FILES else stem


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        scope = _scope(item.nodeid)
        return FIRST.index(scope) if scope in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: pytest without it still runs the tests, one by one
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByFileRayTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return ByFileRayTogether(config, log)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Prepared base models go to FEDCHAT_CACHE if set (CI can keep it), else a session folder."""
    if not os.environ.get("FEDCHAT_CACHE"):
        os.environ["FEDCHAT_CACHE"] = str(tmp_path_factory.mktemp("fedchat-cache"))
    return Path(os.environ["FEDCHAT_CACHE"])


@pytest.fixture(scope="session")
def tiny_dir(model_cache):
    from shared.model import resolve_base_model

    return resolve_base_model("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from shared.model import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module", autouse=True)
def _module_state_home(tmp_path_factory):
    """The node registry and coordinator heads of a module's long-lived processes (a federation started
    by a module fixture), apart from the machine's own in ~/.local/state/fedchat."""
    saved = os.environ.get("FEDCHAT_STATE_HOME")
    os.environ["FEDCHAT_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))
    yield
    if saved is None:
        os.environ.pop("FEDCHAT_STATE_HOME", None)
    else:
        os.environ["FEDCHAT_STATE_HOME"] = saved


@pytest.fixture(autouse=True)
def state_home(tmp_path_factory, monkeypatch):
    """Each test's own node registry and coordinator ledger heads (ledger.state_home())."""
    folder = tmp_path_factory.mktemp("state-home")
    monkeypatch.setenv("FEDCHAT_STATE_HOME", str(folder))
    return folder
