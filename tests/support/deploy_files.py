"""Readers of the deploy kit's files: compose.yaml, the Dockerfile's stages, systemd units, and the
`fedchat` commands in a compose job's shell script."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
SYSTEMD = DEPLOY / "systemd"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, dict]:
    """Each stage's base and the argv it runs (ENTRYPOINT + CMD, inherited from its base stage)."""
    lines, joined = [], ""
    for raw in path.read_text().splitlines():
        if not joined and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        joined += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(joined.strip())
            joined = ""
    stages: dict[str, dict] = {}
    current = None
    for line in lines:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = rest.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage-{len(stages)}"
            inherited = stages.get(base, {"entrypoint": [], "cmd": [], "user": "root"})
            current = stages[name] = {"base": base, "entrypoint": list(inherited["entrypoint"]),
                                      "cmd": list(inherited["cmd"]), "user": inherited["user"]}
        elif word in ("CMD", "ENTRYPOINT"):
            assert rest.startswith("["), f"{path}: use the exec form (a JSON list) for {word}: {line}"
            current[word.lower()] = json.loads(rest)
            if word == "ENTRYPOINT":
                current["cmd"] = []
        elif word == "USER":
            current["user"] = rest.strip()
    for stage in stages.values():
        stage["argv"] = stage["entrypoint"] + stage["cmd"]
    return stages


def systemd_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # keys are case-sensitive
    unit.read_string((SYSTEMD / name).read_text(), source=name)
    return unit


def volumes(service: dict) -> dict[str, tuple[str, bool]]:
    """Mount target -> (source, read-only) for a service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def fedchat_commands(script: str, env: dict[str, str]) -> list[list[str]]:
    """Every `fedchat ...` command line in a compose job's `sh -ec` script, its environment substituted."""
    found = []
    script = re.sub(r"\$\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), script)
    for line in script.splitlines():
        for part in re.split(r"&&|\|\||;|\bthen\b", line):
            words = shlex.split(part.strip().lstrip("{").strip()) if part.strip() else []
            if words and words[0] == "fedchat":
                found.append(words)
    return found
