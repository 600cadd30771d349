"""`fedchat app build`: the app bundle (FAB) nodes run, built as `flwr run` packs it, with its SHA-256."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedchat.node.app_bundle import AppBundle, build_bundle, compare


def print_bundle_files(bundle: AppBundle, installed: AppBundle | None = None) -> None:
    verdict = {}
    if installed is not None:
        diff = compare(bundle, installed)
        verdict = {**{p: "same as installed" for p in diff.same}, **{p: "DIFFERS from installed" for p in diff.changed},
                   **{p: "NOT in installed fedchat" for p in diff.added}}
    width = max(len(f.path) for f in bundle.files)
    for f in bundle.files:
        print(f"  {f.path:<{width}}  {f.size:>8} B  {f.sha256[:16]}  {verdict.get(f.path, '')}".rstrip())


def cmd_app_build(args) -> int:
    from fedchat.federation.local_federation import find_app

    app = Path(args.app).resolve() if args.app else find_app()
    bundle = build_bundle(app)
    if args.out:
        from shared.files import atomic_write_bytes

        atomic_write_bytes(Path(args.out), bundle.content)
    if args.json:
        print(json.dumps({"sha256": bundle.sha256, "bytes": len(bundle.content), "app": str(app),
                          "out": str(Path(args.out).resolve()) if args.out else None,
                          "files": [{"path": f.path, "sha256": f.sha256, "bytes": f.size} for f in bundle.files]},
                         indent=2))
        return 0
    print(f"app bundle of {app}: {len(bundle.files)} files, {len(bundle.content)} bytes"
          + (f", written to {args.out}" if args.out else "") + " (what `flwr run` submits from this folder)")
    print_bundle_files(bundle)
    print(f"sha256 {bundle.sha256}")
    return 0


def add_app_command(sub: argparse._SubParsersAction) -> None:
    app = sub.add_parser("app", help="the app bundle (FAB) nodes run: build it, print its SHA-256")
    app_sub = app.add_subparsers(dest="action", required=True)
    build = app_sub.add_parser("build", help="build the bundle exactly as `flwr run` packs it; print its files and "
                                             "SHA-256 (node operators approve that hash)")
    build.add_argument("--app", help="the fedchat project folder (default: this fedchat)")
    build.add_argument("--out", help="write the bundle to this file (.fab) for the node operators")
    build.add_argument("--json", action="store_true", help="print the hash and files as JSON")
    build.set_defaults(func=cmd_app_build)
