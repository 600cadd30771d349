"""The `fedchat` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from fedchat.cli.app_commands import add_app_command
from fedchat.cli.audit_commands import add_audit_command, add_canary_commands, empirical_argv
from fedchat.cli.certs_commands import add_certs_command
from fedchat.cli.coordinator_commands import add_coordinator_command
from fedchat.cli.data_commands import add_data_command
from fedchat.cli.demo_commands import add_demo_command
from fedchat.cli.eval_commands import add_eval_command
from fedchat.cli.merge_commands import add_merge_command
from fedchat.cli.model_commands import add_model_command
from fedchat.cli.node_commands import add_node_command
from fedchat.cli.roster_commands import add_roster_command
from fedchat.cli.tune_commands import add_tune_command
from serving.cli import add_serving_commands
from shared.errors import FedchatError, require_extra
from shared.logs import setup_logging

log = logging.getLogger("fedchat")


# Each command group has its module here, named for it (cli/node_commands.py: `fedchat node ...`), which registers
# its parser and runs it; serving/cli.py registers `serve` and `chat`.
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedchat", description=__doc__.strip() + " Federated LoRA fine-tuning of chat "
                                "models with DP-SGD and secure aggregation on Flower.")
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_model_command(sub)
    add_data_command(sub)
    add_demo_command(sub)
    add_audit_command(sub)
    add_merge_command(sub)
    add_serving_commands(sub)
    add_certs_command(sub)
    add_eval_command(sub)
    add_tune_command(sub)
    add_canary_commands(sub)
    add_node_command(sub)
    add_app_command(sub)
    add_coordinator_command(sub)
    add_roster_command(sub)
    return p


# The extras (pyproject.toml) a command needs beyond a node's install; checked before it starts.
COMMAND_EXTRAS = {"serve": ("serve",), "eval": ("eval",), "tune": ("tune", "eval", "simulation"),
                  "demo": ("eval", "simulation")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(empirical_argv(sys.argv[1:] if argv is None else list(argv)))
    setup_logging(logging.DEBUG if args.verbose else logging.INFO, quiet_flower=not args.verbose)
    try:
        for extra in COMMAND_EXTRAS.get(args.command, ()):
            require_extra(extra, f"`fedchat {args.command}`")
        return args.func(args)
    except FedchatError as exc:
        print(f"fedchat: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedchat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
