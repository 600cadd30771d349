"""On PYTHONPATH (tests/test_bundle_contents.py's round only): every process of the run, Ray's virtual nodes
included, appends the name of each fedchat module it imports to FEDCHAT_TEST_IMPORT_LOG/<pid>.txt as the
import happens (a virtual node is killed at the end, never exits cleanly, so nothing waits for exit)."""

import os
import sys

_folder = os.environ.get("FEDCHAT_TEST_IMPORT_LOG")
_ours = ("client", "server", "shared", "serving", "fedchat")
_out = []


def _log_import(event: str, args: tuple) -> None:
    if event == "import" and args[0].split(".")[0] in _ours:
        if not _out:
            _out.append(open(os.path.join(_folder, f"{os.getpid()}.txt"), "a", buffering=1))  # noqa: SIM115
        _out[0].write(args[0] + "\n")


if _folder:
    sys.addaudithook(_log_import)
