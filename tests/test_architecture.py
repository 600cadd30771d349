"""docs/architecture.md stays true: its layout tree names every module of the packages it covers, and no other."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"

PACKAGE = re.compile(r"^([a-z_]+)/\s")           # "client/   the node's ClientApp"
# "  client_app.py   the ClientApp ..." (a subpackage: "  cli/node_commands.py")
MODULE = re.compile(r"^  ([\w/]+\.py)(?:\s|$)")


def layout_tree(text: str) -> dict[str, set[str]]:
    """{package: {module path inside it}} from the first code block under '## Layout'."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    tree: dict[str, set[str]] = {}
    package = None
    for line in block.splitlines():
        if m := PACKAGE.match(line):
            package = m.group(1)
            tree[package] = set()
        elif (m := MODULE.match(line)) and package:
            tree[package].add(m.group(1))
    return tree


def modules_on_disk(package: str) -> set[str]:
    base = ROOT / package
    return {p.relative_to(base).as_posix() for p in base.rglob("*.py") if "__pycache__" not in p.parts}


def test_the_layout_covers_the_role_packages_and_the_tooling():
    assert {"client", "server", "shared", "serving", "fedchat"} <= set(layout_tree(DOC.read_text()))


def test_the_layout_names_every_module_and_no_other():
    problems = []
    for package, listed in layout_tree(DOC.read_text()).items():
        on_disk = modules_on_disk(package)
        problems += [f"{package}/{m} is on disk but not in docs/architecture.md" for m in sorted(on_disk - listed)]
        problems += [f"{package}/{m} is in docs/architecture.md but not on disk" for m in sorted(listed - on_disk)]
    assert not problems, "\n".join(problems)


def test_the_round_path_names_modules_that_exist():
    path_section = DOC.read_text().split("## One round's data", 1)[1]
    named = set(re.findall(r"\b((?:client|server|shared|serving|fedchat)/[\w/]+\.py)\b", path_section))
    assert named, "the round's path names no module"
    missing = sorted(m for m in named if not (ROOT / m).is_file())
    assert not missing, f"docs/architecture.md's round path names modules that do not exist: {missing}"


def test_the_parser_reads_nested_modules_and_ignores_prose():
    text = "## Layout\n\n```\nfedchat/   tooling\n  cli/node_commands.py   the node group\n  x.py\nprose here\n```\n"
    assert layout_tree(text) == {"fedchat": {"cli/node_commands.py", "x.py"}}


def test_no_two_modules_share_a_name():
    # A name says what a module holds: two protocol.py (the node's instruction, OpenAI's schema) or two model.py
    # meaning different things make every import and traceback ambiguous. Package markers are exempt.
    where: dict[str, list[str]] = {}
    for package in layout_tree(DOC.read_text()):
        for module in modules_on_disk(package):
            name = module.rsplit("/", 1)[-1]
            if name not in ("__init__.py", "__main__.py"):
                where.setdefault(name, []).append(f"{package}/{module}")
    shared = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not shared, f"modules that share a name (rename one to say what it holds): {shared}"
