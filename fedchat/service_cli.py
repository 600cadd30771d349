"""`fedchat node ...` and `fedchat coordinator ...`: check a config file, start the service."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from fedchat.deployment import process_env
from fedchat.service_config import (check_coordinator_file, check_node_file, coordinator_command, node_command,
                                    read_coordinator_file, read_node_file, write_node_config)


def _exec(cmd: list[str], flwr_home: str, print_only: bool) -> int:
    """Replace this process with the service (same PID: supervisors and systemd keep tracking it)."""
    if print_only:
        print(shlex.join(cmd))
        return 0
    print(f"starting: {shlex.join(cmd)}", file=sys.stderr, flush=True)  # what runs, in the service's log
    env = process_env()  # this venv first on PATH (Flower starts its helpers from there), no phoning home
    env.setdefault("FLWR_HOME", flwr_home)
    os.execvpe(cmd[0], cmd, env)
    return 1  # not reached


def cmd_node_check(args) -> int:
    nf = read_node_file(args.file)
    for line in check_node_file(nf):
        print(f"  {line}")
    print(f"{args.file}: OK. Start the node with: fedchat node start {args.file}")
    return 0


def _report(lines: list[str]) -> None:
    for line in lines:
        print(f"  {line}", file=sys.stderr, flush=True)


def cmd_node_start(args) -> int:
    nf = read_node_file(args.file)
    _report(check_node_file(nf))
    write_node_config(nf)
    return _exec(node_command(nf), str(nf.node_config_file.parent / "flwr-home"), args.print)


def cmd_coordinator_check(args) -> int:
    cf = read_coordinator_file(args.file)
    for line in check_coordinator_file(cf):
        print(f"  {line}")
    print(f"{args.file}: OK. Start the SuperLink with: fedchat coordinator start {args.file}")
    return 0


def cmd_coordinator_start(args) -> int:
    cf = read_coordinator_file(args.file)
    _report(check_coordinator_file(cf))
    home = (cf.database.parent if cf.database else cf.path.parent) / "flwr-home"
    return _exec(coordinator_command(cf), str(home), args.print)


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="a node operator's SuperNode: check its config file, start it")
    node_sub = node.add_subparsers(dest="action", required=True)
    check = node_sub.add_parser("check-config", help="validate a node's TOML file and what it points at")
    check.add_argument("file")
    check.set_defaults(func=cmd_node_check)
    start = node_sub.add_parser("start", help="check, then run flower-supernode with the file's settings")
    start.add_argument("file")
    start.add_argument("--print", action="store_true", help="print the command instead of running it")
    start.set_defaults(func=cmd_node_start)

    coord = sub.add_parser("coordinator", help="the coordinator's SuperLink: check its config file, start it")
    coord_sub = coord.add_subparsers(dest="action", required=True)
    check = coord_sub.add_parser("check-config", help="validate the coordinator's TOML file and certificates")
    check.add_argument("file")
    check.set_defaults(func=cmd_coordinator_check)
    start = coord_sub.add_parser("start", help="check, then run flower-superlink with TLS and node authentication")
    start.add_argument("file")
    start.add_argument("--print", action="store_true", help="print the command instead of running it")
    start.set_defaults(func=cmd_coordinator_start)
