"""`fedchat coordinator check-config` and `fedchat coordinator start`: the SuperLink from its config file."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from fedchat.federation.deployment import process_env
from fedchat.federation.service_config import check_coordinator_file, coordinator_command, read_coordinator_file


def cmd_coordinator_check(args) -> int:
    cf = read_coordinator_file(args.file)
    for line in check_coordinator_file(cf):
        print(f"  {line}")
    print(f"{args.file}: OK. Start the SuperLink with: fedchat coordinator start {args.file}")
    return 0


def cmd_coordinator_start(args) -> int:
    """Check the file, then become the SuperLink: Flower's flower-superlink, run in this process (same
    PID, like an exec) with a longer SQLite lock wait (fedchat.federation.deployment.run_superlink)."""
    from fedchat.federation.deployment import run_superlink

    cf = read_coordinator_file(args.file)
    for line in check_coordinator_file(cf):
        print(f"  {line}", file=sys.stderr, flush=True)
    home = (cf.database.parent if cf.database else cf.path.parent) / "flwr-home"
    cmd = coordinator_command(cf)
    if args.print:
        print(shlex.join(cmd))
        return 0
    print(f"starting: {shlex.join(cmd)}", file=sys.stderr, flush=True)  # what runs, in the service's log
    env = process_env()
    env.setdefault("FLWR_HOME", str(home))
    os.environ.update(env)
    run_superlink(cmd)
    return 0


def add_coordinator_command(sub: argparse._SubParsersAction) -> None:
    coord = sub.add_parser("coordinator", help="the coordinator's SuperLink: check its config file, start it")
    coord_sub = coord.add_subparsers(dest="action", required=True)
    check = coord_sub.add_parser("check-config", help="validate the coordinator's TOML file and certificates")
    check.add_argument("file")
    check.set_defaults(func=cmd_coordinator_check)
    start = coord_sub.add_parser("start", help="check, then run flower-superlink with TLS and node authentication")
    start.add_argument("file")
    start.add_argument("--print", action="store_true", help="print the command instead of running it")
    start.set_defaults(func=cmd_coordinator_start)
