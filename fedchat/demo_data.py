"""Demo dialogue data: chatterbot-corpus English topics split across simulated organisations.

Each organisation gets whole topics (a natural non-IID split: one holds 'health' and
'science', another 'money' and 'sports'); a seeded share of every topic is held out
as the coordinator's evaluation file, which no organisation trains on.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import yaml

from shared.config import org_name
from shared.dialogue import write_dialogues
from shared.errors import DataError


def _corpus_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo corpus is not installed: run `pip install --no-deps chatterbot-corpus==1.3.3` "
                        "(`make install` does it).")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "english"


def load_topics() -> dict[str, list[list[dict[str, str]]]]:
    """Topic name -> conversations (user/assistant alternating, ending on the assistant)."""
    topics = {}
    for path in sorted(_corpus_dir().glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        conversations = []
        for turns in data.get("conversations") or []:
            turns = [str(t).strip() for t in turns if str(t).strip()]
            if len(turns) % 2:
                turns = turns[:-1]  # a trailing question has no answer to learn
            if turns:
                conversations.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                      for i, t in enumerate(turns)])
        if conversations:
            topics[path.stem] = conversations
    return topics


def demo_node_config(out: Path, name: str, *, target_epsilon: float, dp: bool, secagg: bool) -> dict:
    """Node `name`'s --node-config in a run laid out under OUT: its data in OUT/data (as
    write_demo_data(OUT / "data", ...) writes it), its state and ledger in OUT/nodes/NAME, and the
    demo's ledger registry in OUT/ledger-registry (public demo data: a new demo folder is a new demo,
    not a host's nodes, whose registry outlives their state dirs)."""
    return {"data-path": str(out / "data" / f"{name}.jsonl"), "state-dir": str(out / "nodes" / name),
            "ledger-registry": str(out / "ledger-registry"), "node-name": name,
            "target-epsilon": float(target_epsilon), "require-dp": dp, "require-secagg": secagg}


def write_demo_data(out: str | Path, clients: int, *, eval_fraction: float = 0.1, seed: int = 0) -> dict:
    """Write OUT/org-1.jsonl .. OUT/org-N.jsonl, OUT/eval.jsonl, OUT/manifest.json, and for secure aggregation in
    `flwr run .` simulations an identity key per organisation (OUT/keys) and their roster (OUT/roster.json)."""
    out = Path(out)
    topics = load_topics()
    if not 1 <= clients <= len(topics):
        raise DataError(f"--clients must be between 1 and {len(topics)} (the corpus has {len(topics)} English topics).")
    rng = random.Random(seed)
    held_out, train_topics = [], {}
    for name, conversations in topics.items():
        conversations = conversations[:]
        rng.shuffle(conversations)
        k = max(1, round(len(conversations) * eval_fraction))
        held_out += conversations[:k]
        train_topics[name] = conversations[k:]
    # Whole topics per organisation, largest first to the smallest organisation so far.
    shares: list[list[str]] = [[] for _ in range(clients)]
    sizes = [0] * clients
    for name in sorted(train_topics, key=lambda t: (-len(train_topics[t]), t)):
        i = sizes.index(min(sizes))
        shares[i].append(name)
        sizes[i] += len(train_topics[name])
    manifest = {"clients": [], "eval": {"file": "eval.jsonl", "conversations": len(held_out)}, "seed": seed}
    for i, names in enumerate(shares):
        conversations = [c for t in sorted(names) for c in train_topics[t]]
        rng.shuffle(conversations)
        name = org_name(i + 1)
        write_dialogues(out / f"{name}.jsonl", conversations)
        manifest["clients"].append({"node": name, "file": f"{name}.jsonl",
                                    "topics": sorted(names), "conversations": len(conversations)})
    rng.shuffle(held_out)
    write_dialogues(out / "eval.jsonl", held_out)
    # Identity keys and one roster for the simulated nodes of `flwr run .` (sim-data-dir = OUT).
    from fedchat.federation.simulation import provision_roster

    provision_roster(out, {i: {"node-name": c["node"], "state-dir": str(out), "identity-key": str(out / "keys" /
                                                                                                 f"{c['node']}.pem")}
                           for i, c in enumerate(manifest["clients"])})
    manifest["roster"] = "roster.json"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
