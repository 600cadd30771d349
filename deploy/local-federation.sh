#!/usr/bin/env bash
# A real federation on this machine, on Flower's deployment engine:
#   deploy/local-federation.sh --nodes N --rounds R --base-model M --out DIR [options]
# starts flower-superlink (TLS + SuperNode authentication), gives each of N nodes an identity key
# and a roster of them that every node approves, registers and starts N flower-supernode
# processes, submits fedchat with `flwr run`, waits for the end, writes
# DIR/report.json and every process's log under DIR/logs, and stops every process it
# started, on success, failure, Ctrl-C or SIGTERM. `--help` lists every option.
#
# The work is done by fedchat/federation/local_federation.py (this script picks the Python of the
# project's virtual environment, or $PYTHON, and hands over to it; signals go to it directly).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "local-federation.sh: no Python at $python: run \`make install\` in $root, or set PYTHON to the" \
         "interpreter of the environment fedchat and Flower are installed in." >&2
    exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # fedchat importable even if not installed
exec "$python" -m fedchat.federation.local_federation "$@"
