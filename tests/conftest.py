"""Shared fixtures: the tiny random Llama (SmolLM2 tokenizer) prepared once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.logs import quiet_library_warnings

quiet_library_warnings()


# `make test` runs two pytest workers (pytest-xdist, --dist loadgroup): a test file stays on one worker
# (its module fixtures are made once), and the files that start Flower's simulation engine share one
# group, so that no two Ray clusters run at once on the machine.
RAY_FILES = {"test_scale", "test_secagg", "test_simulation", "test_tune"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            stem = Path(str(item.fspath)).stem
            item.add_marker(pytest.mark.xdist_group("ray" if stem in RAY_FILES else stem))


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
