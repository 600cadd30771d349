"""The app bundle (Flower FAB) a coordinator submits, and a node operator's approval of it.

A SuperNode runs the ClientApp *from the bundle the SuperLink hands it*, not from the code its
operator installed: whoever submits a run (the coordinator, or anyone who reaches the SuperLink's
Control API) chooses the code that holds the node's privacy promises (require-dp, require-secagg,
the budget guard, the ledger). So a node runs only a bundle its operator approved, by SHA-256:

* the coordinator builds the bundle exactly as ``flwr run .`` packs it (Flower's own
  ``build_fab_from_disk``; Flower names a bundle by the SHA-256 of its bytes) and hands out the
  ``.fab`` file and its hash: ``fedchat app build --out fedchat.fab``;
* the node operator inspects it (every file, compared with the fedchat installed on the node)
  and records its hash in node.toml, ``[approval] app-sha256 = ["..."]`` (or, where node.toml is
  read-only to the tools, as in deploy/compose.yaml, in the file ``[approval] file = PATH`` names):
  ``fedchat node approve node.toml fedchat.fab`` (or the bare hash, when it is the bundle of the
  fedchat installed on the node);
* ``fedchat node start`` refuses any other bundle before installing or importing it
  (fedchat.node.runtime).

Flower's own FAB verification (``flower-supernode --trusted-entities``) is no use to a self-hosted
federation: in 1.41 it also requires a ``valid_license`` verification that only bundles fetched
from Flower Hub carry, so a node that sets it refuses every ``flwr run .``.

This module reads node.toml's [approval] table with the standard library only: the ClientApp
runner imports it before it loads any app code.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

SHA256 = re.compile(r"^[0-9a-f]{64}$")
APPROVAL_SECTION = "approval"
APPROVAL_KEY = "app-sha256"
APPROVAL_FILE_KEY = "file"  # optional: a file of approved hashes (one a line), for a read-only node.toml
ROSTER_FILE_KEY = "roster-file"  # optional: where `fedchat roster approve` records the approved roster, for a
# read-only node.toml (fedchat.federation.service_config reads it; the bundle check ignores it)
MANIFEST = ".info/CONTENT"


class AppBundleError(Exception):
    """An app bundle that cannot be built, read or approved; the message says what to do."""


def _fedchat_error(message: str) -> Exception:
    """The CLI's error type (imported late: the ClientApp runner must not import `shared`)."""
    from shared.errors import ConfigError

    return ConfigError(message)


@dataclass(frozen=True)
class BundleFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class AppBundle:
    content: bytes
    files: tuple[BundleFile, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def file_hashes(self) -> dict[str, str]:
        return {f.path: f.sha256 for f in self.files}


def read_bundle(content: bytes, source: str = "the bundle") -> AppBundle:
    """Parse a FAB: a zip whose .info/CONTENT lists every other file with its SHA-256.

    Refuses a bundle whose files do not match its manifest, or that holds files the manifest does
    not list (what Flower's installer checks, plus nothing hidden beside it).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
        names = archive.namelist()
        manifest = archive.read(MANIFEST).decode("utf-8")
    except KeyError:
        raise AppBundleError(f"{source} has no {MANIFEST} manifest: it is not a Flower app bundle (.fab).") from None
    except (zipfile.BadZipFile, UnicodeDecodeError, ValueError) as exc:
        raise AppBundleError(f"{source} is not a Flower app bundle (.fab, a zip file): {exc}.") from None
    files = []
    for line in manifest.strip().splitlines():
        try:
            path, digest, bits = line.rsplit(",", 2)
            data = archive.read(path)
        except (ValueError, KeyError):
            raise AppBundleError(f"{source}: its manifest line {line[:120]!r} names no file of the bundle.") from None
        if hashlib.sha256(data).hexdigest() != digest or len(data) * 8 != int(bits):
            raise AppBundleError(f"{source}: {path} does not match the bundle's manifest (tampered or corrupt).")
        files.append(BundleFile(path, digest, len(data)))
    listed = {f.path for f in files} | {MANIFEST}
    extra = sorted(n for n in names if n not in listed and not n.endswith("/"))
    if extra:
        raise AppBundleError(f"{source} holds files its manifest does not list: {', '.join(extra[:10])}.")
    if not any(f.path == "pyproject.toml" for f in files):
        raise AppBundleError(f"{source} has no pyproject.toml: it is not a Flower app bundle.")
    return AppBundle(content, tuple(files))


def build_bundle(app: str | Path) -> AppBundle:
    """The bundle `flwr run APP` would submit: Flower's own build, byte for byte."""
    from flwr.cli.build import build_fab_from_disk

    app = Path(app).expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise _fedchat_error(f"{app} holds no pyproject.toml: give the fedchat project folder (--app DIR).")
    try:
        content = build_fab_from_disk(app)
    except Exception as exc:  # Flower raises ValueError, click exceptions, AppPathDepthError...
        raise _fedchat_error(f"Flower cannot build an app bundle from {app}: {exc}") from None
    return read_bundle(content, str(app))


def load_bundle_file(path: str | Path) -> AppBundle:
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise _fedchat_error(f"cannot read the app bundle {path}: {exc.strerror}.") from None
    try:
        return read_bundle(content, str(path))
    except AppBundleError as exc:
        raise _fedchat_error(str(exc)) from None


def unpack_bundle(bundle: AppBundle, folder: str | Path) -> Path:
    """Extract a bundle's files (not its manifest) into an empty folder: `flwr run FOLDER` then
    submits this very bundle, byte for byte (Flower's build of its own output is the same bundle)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(bundle.content)) as archive:
        for f in bundle.files:
            target = (folder / f.path).resolve()
            if not target.is_relative_to(folder.resolve()):
                raise AppBundleError(f"the bundle's file {f.path!r} would land outside {folder}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(f.path))
    return folder


# ------------------------------------------------------------------ approvals in node.toml


def approved_hashes(node_file: str | Path) -> list[str]:
    """The [approval] app-sha256 list of a node's config file (standard library only).

    Raises AppBundleError when the file cannot be read or the list is malformed: a node then
    runs nothing (it never falls back to running an unchecked bundle).
    """
    try:
        data = tomllib.loads(Path(node_file).read_text(encoding="utf-8"))
    except OSError as exc:
        raise AppBundleError(f"cannot read {node_file}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AppBundleError(f"{node_file} is not valid TOML: {exc}") from None
    return check_approval_section(data.get(APPROVAL_SECTION, {}), node_file)


def approval_file(section: dict, node_file: str | Path) -> Path | None:
    value = section.get(APPROVAL_FILE_KEY)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise AppBundleError(f"{node_file}: [{APPROVAL_SECTION}] '{APPROVAL_FILE_KEY}' must be a path.")
    path = Path(value)
    return path if path.is_absolute() else (Path(node_file).resolve().parent / path)


def check_approval_section(section: object, node_file: str | Path) -> list[str]:
    """The approved hashes: node.toml's list, and the lines of the file it names (if any)."""
    if not isinstance(section, dict):
        raise AppBundleError(f"{node_file}: '{APPROVAL_SECTION}' must be a section ([{APPROVAL_SECTION}]).")
    unknown = sorted(set(section) - {APPROVAL_KEY, APPROVAL_FILE_KEY, ROSTER_FILE_KEY})
    if unknown:
        raise AppBundleError(f"{node_file}: [{APPROVAL_SECTION}] unknown key(s) {', '.join(unknown)} "
                             f"(keys: '{APPROVAL_KEY}', '{APPROVAL_FILE_KEY}', '{ROSTER_FILE_KEY}').")
    hashes = section.get(APPROVAL_KEY, [])
    if not isinstance(hashes, list) or not all(isinstance(h, str) and SHA256.match(h) for h in hashes):
        raise AppBundleError(f"{node_file}: [{APPROVAL_SECTION}] '{APPROVAL_KEY}' must be a list of SHA-256 hashes "
                             "(64 lower-case hex digits each); record them with `fedchat node approve`.")
    hashes = list(hashes)
    path = approval_file(section, node_file)
    if path is not None and path.exists():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AppBundleError(f"cannot read the approvals file {path}: {exc}") from None
        for number, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if not SHA256.match(line):
                raise AppBundleError(f"{path} line {number}: not a SHA-256 (64 lower-case hex digits); record "
                                     "approvals with `fedchat node approve`.")
            hashes.append(line)
    return list(dict.fromkeys(hashes))


def write_approvals(node_file: str | Path, hashes: list[str]) -> Path:
    """Record the approved hashes, replacing every earlier approval: in the file [approval] names if
    it does (an `app-sha256` list in node.toml beside it is removed, else the old hashes it lists
    would stay approved), else in node.toml's [approval] table (the rest of node.toml, comments
    included, is kept). Returns where the hashes were written."""
    from shared.files import atomic_write_text

    path = Path(node_file)
    section = tomllib.loads(path.read_text(encoding="utf-8")).get(APPROVAL_SECTION, {})
    target = approval_file(section, path) if isinstance(section, dict) else None
    roster = [f"{ROSTER_FILE_KEY} = {json.dumps(section[ROSTER_FILE_KEY])}"] \
        if isinstance(section, dict) and section.get(ROSTER_FILE_KEY) else []  # kept: the roster's approval
    if target is not None:
        if section.get(APPROVAL_KEY):
            _rewrite_approval_section(path, [f"{APPROVAL_FILE_KEY} = {json.dumps(section[APPROVAL_FILE_KEY])}",
                                             *roster])
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, "# App bundles (SHA-256 of the .fab) this node may run: `fedchat node approve`.\n"
                          + "".join(f"{h}\n" for h in hashes))
        return target
    return _rewrite_approval_section(path, [
        "# App bundles (SHA-256 of the .fab) this node may run: `fedchat node approve FILE BUNDLE`.",
        f"{APPROVAL_KEY} = ["] + [f'    "{h}",' for h in hashes] + ["]", *roster])


def _rewrite_approval_section(path: Path, body: list[str]) -> Path:
    """node.toml with its [approval] table replaced by `body` (moved to the end; the rest kept)."""
    from shared.files import atomic_write_text

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _fedchat_error(f"cannot read {path}: {exc.strerror}.") from None
    kept, skipping = [], False
    for line in text.splitlines():
        header = re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
        if header:
            skipping = header.group(1) == APPROVAL_SECTION
        if not skipping:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    try:
        atomic_write_text(path, "\n".join(kept + ["", f"[{APPROVAL_SECTION}]", *body]) + "\n")
    except OSError as exc:
        raise _fedchat_error(f"cannot write {path} ({exc.strerror}): its [{APPROVAL_SECTION}] '{APPROVAL_KEY}' list "
                             "must go, or the hashes it lists stay approved beside the new approval. Remove that "
                             f"list by hand (keep '{APPROVAL_FILE_KEY} = ...') and approve again.") from None
    return path


@dataclass(frozen=True)
class Comparison:
    """A bundle's files against the bundle of the fedchat installed here."""

    same: list[str]
    changed: list[str]
    added: list[str]  # in the bundle only
    missing: list[str]  # installed here only

    @property
    def identical(self) -> bool:
        return not (self.changed or self.added or self.missing)


def compare(bundle: AppBundle, installed: AppBundle) -> Comparison:
    mine, theirs = installed.file_hashes(), bundle.file_hashes()
    return Comparison(same=sorted(p for p in theirs if mine.get(p) == theirs[p]),
                      changed=sorted(p for p in theirs if p in mine and mine[p] != theirs[p]),
                      added=sorted(p for p in theirs if p not in mine),
                      missing=sorted(p for p in mine if p not in theirs))
