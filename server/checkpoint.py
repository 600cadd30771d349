"""Checkpoints: one folder per completed round, resumable after a restart.

    OUT/checkpoints/round-0003/   PEFT adapter (adapter_config.json, adapter_model.safetensors)
                                  + fedchat-adapter.json + state.json (the run state)
                                  + server-optimizer.npz (distributed DP: the coordinator's Adam moments)
    OUT/adapter -> checkpoints/round-0003   (the latest; swapped atomically)

A checkpoint folder is written under a temporary name and renamed when complete, so
a crash never leaves a half checkpoint that looks whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shared.adapter import save_adapter
from shared.config import RunConfig
from shared.errors import CheckpointError
from shared.files import atomic_write_bytes

# Settings a resumed run must share with the checkpoint (they define the adapter).
IDENTITY = ("base_model", "lora_r", "lora_alpha", "lora_target_modules", "aggregation", "seed")


@dataclass
class RunState:
    run_id: str
    config: dict  # the run config (hyphenated keys) the run started with
    round: int = 0  # last completed round; 0 = initial adapter evaluated
    base_eval_loss: float | None = None
    rounds: list[dict] = field(default_factory=list)  # report rows, one per completed round
    started: str = ""
    resumed: list[dict] = field(default_factory=list)  # each restart of the run from a checkpoint


def round_dir(out: Path, rnd: int) -> Path:
    return out / "checkpoints" / f"round-{rnd:04d}"


def publish_link(link: Path, target: Path) -> None:
    """Point `link` at `target` atomically (readers see the old or the new target)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


OPTIMIZER_FILE = "server-optimizer.npz"


def save_checkpoint(out: Path, state: RunState, peft_model, meta: dict, optimizer: dict | None = None) -> Path:
    final = round_dir(out, state.round)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".round-{state.round:04d}-", dir=final.parent))
    try:
        save_adapter(peft_model, tmp, {**meta, "round": state.round})
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
        if optimizer:
            np.savez(tmp / OPTIMIZER_FILE, **optimizer)
        os.chmod(tmp, 0o755)
        if final.exists():  # the same round again (a resumed run redid it)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    publish_link(out / "adapter", final)
    return final


def record_resume(checkpoint: Path, state: RunState) -> None:
    """Write a resumed run's state (with its new `resumed` entry) into the checkpoint it resumes from, at once: a run
    that stops again before its next checkpoint must not lose the record of this restart."""
    atomic_write_bytes(checkpoint / "state.json", json.dumps(asdict(state), indent=1).encode())


def load_optimizer(checkpoint: Path) -> dict:
    """The coordinator's optimizer state saved with `checkpoint` (empty when it holds none)."""
    path = checkpoint / OPTIMIZER_FILE
    if not path.exists():
        return {}
    try:
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}): remove that checkpoint folder to resume from the "
                              "previous round.") from None


def latest_checkpoint(out: Path) -> Path | None:
    folder = out / "checkpoints"
    rounds = sorted(p for p in folder.glob("round-[0-9][0-9][0-9][0-9]") if (p / "state.json").is_file())
    return rounds[-1] if rounds else None


def load_state(checkpoint: Path) -> RunState:
    try:
        return RunState(**json.loads((checkpoint / "state.json").read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint}/state.json is unreadable ({exc}): remove that checkpoint folder to "
                              "resume from the previous round.") from None


def check_resumable(state: RunState, cfg: RunConfig, checkpoint: Path) -> None:
    """A checkpoint continues only a run that builds the same adapter."""
    old = RunConfig.from_flower(state.config, ignore_unknown=True)
    changed = [f"{k.replace('_', '-')}: {getattr(old, k)!r} -> {getattr(cfg, k)!r}"
               for k in IDENTITY if getattr(old, k) != getattr(cfg, k)]
    if changed:
        raise CheckpointError(
            f"{checkpoint} belongs to a run with other adapter settings ({'; '.join(changed)}). "
            "Use a new out-dir for a new run, or the old settings to resume.")
