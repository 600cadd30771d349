"""`fedchat node ...`: a node operator's SuperNode: check its config file, start it, approve an app bundle."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fedchat.cli.app_commands import print_bundle_files
from fedchat.federation.deployment import process_env
from fedchat.federation.service_config import check_node_file, node_command, read_node_file, write_node_config
from fedchat.node.app_bundle import SHA256, AppBundle, build_bundle, compare, load_bundle_file, write_approvals
from shared.errors import ConfigError


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
    """Check the file, then run the SuperNode and, beside it, the ClientApps of approved bundles only.

    Not an exec: this process stays (same PID for supervisors and systemd) and runs
    fedchat.node.runtime's task loop; the SuperNode is its child and stops with it.
    """
    from fedchat.node.runtime import run_node

    nf = read_node_file(args.file)
    _report(check_node_file(nf))
    cmd = node_command(nf)
    write_node_config(nf)
    if args.print:
        print(shlex.join(cmd))
        return 0
    env = process_env()
    env.setdefault("FLWR_HOME", str(nf.node_config_file.parent / "flwr-home"))
    print(f"starting: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    print(f"  ClientApps run only from app bundles approved in {nf.path} ({len(nf.approved)} approved)",
          file=sys.stderr, flush=True)
    return run_node(cmd, f"127.0.0.1:{nf.runtime_port}", nf.path, env)


def _bundle_from_argument(value: str, app: str | None) -> tuple[AppBundle, AppBundle]:
    """(the bundle to approve, the bundle of the fedchat installed here) from a .fab file or a SHA-256."""
    from fedchat.federation.local_federation import find_app

    installed = build_bundle(app or find_app())
    if Path(value).is_file():
        return load_bundle_file(value), installed
    if SHA256.match(value.lower()):
        if value.lower() != installed.sha256:
            raise ConfigError(f"{value} is not the app bundle of the fedchat installed here (that one is "
                              f"{installed.sha256}), so its files cannot be shown: get the bundle file (.fab) from "
                              "the coordinator and approve that, or install the coordinator's fedchat version.")
        return installed, installed
    raise ConfigError(f"{value!r} is neither an app bundle file (.fab) nor a SHA-256 (64 hex digits): give the "
                      "file the coordinator built with `fedchat app build --out FILE`, or the hash it printed.")


def cmd_node_approve(args) -> int:
    nf = read_node_file(args.file)
    bundle, installed = _bundle_from_argument(args.bundle, args.app)
    diff = compare(bundle, installed)
    print(f"app bundle sha256 {bundle.sha256}: {len(bundle.files)} files, {len(bundle.content)} bytes")
    print_bundle_files(bundle, installed)
    if diff.missing:
        print(f"  (not in the bundle, in installed fedchat: {', '.join(diff.missing)})")
    if not diff.identical and not args.accept_differences:
        raise ConfigError(f"not approved: {len(diff.changed) + len(diff.added) + len(diff.missing)} file(s) of this "
                          "bundle differ from the fedchat installed here, and the bundle's code is what your node "
                          "would run. Inspect them (`unzip -p BUNDLE.fab PATH | diff - PATH`), then approve with "
                          "--accept-differences, or install the coordinator's fedchat version and compare again.")
    hashes = list(nf.approved) if args.keep_others else []  # an old bundle stays runnable only on request
    if bundle.sha256 not in hashes:
        hashes.append(bundle.sha256)
    written = write_approvals(nf.path, hashes)
    print(f"{written}: approved app bundle sha256 {bundle.sha256} ({len(hashes)} approved"
          + (", earlier approvals removed" if not args.keep_others and nf.approved else "") + "). "
          "A running node applies it at the next run.")
    return 0


def add_node_command(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="a node operator's SuperNode: check its config file, start it")
    node_sub = node.add_subparsers(dest="action", required=True)
    check = node_sub.add_parser("check-config", help="validate a node's TOML file and what it points at")
    check.add_argument("file")
    check.set_defaults(func=cmd_node_check)
    start = node_sub.add_parser("start", help="check, then run flower-supernode with the file's settings")
    start.add_argument("file")
    start.add_argument("--print", action="store_true", help="print the command instead of running it")
    start.set_defaults(func=cmd_node_start)
    approve = node_sub.add_parser("approve", help="inspect an app bundle and approve it: record its SHA-256 in the "
                                                  "file's [approval] (a node runs approved bundles only)")
    approve.add_argument("file", help="the node's config file (node.toml)")
    approve.add_argument("bundle", help="the bundle file (.fab) the coordinator built, or its SHA-256 when it is the "
                                        "bundle of the fedchat installed here")
    approve.add_argument("--app", help="the fedchat installed here, to compare with (default: this fedchat)")
    approve.add_argument("--accept-differences", action="store_true",
                         help="approve a bundle whose files differ from the fedchat installed here")
    approve.add_argument("--keep-others", action="store_true",
                         help="keep the bundles approved before (by default the new one replaces them, so a "
                              "coordinator cannot fall back to an older, perhaps fixed-since, bundle)")
    approve.set_defaults(func=cmd_node_approve)
