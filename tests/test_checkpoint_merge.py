"""Checkpoints (PEFT-loadable, resumable, guarded) and merge equality."""


import numpy as np
import pytest
import torch
from peft import PeftModel

from server.checkpoint import RunState, check_resumable, latest_checkpoint, load_state, save_checkpoint
from shared.adapter import attach_adapter, exchanged_names, get_arrays, save_adapter, set_arrays
from shared.config import RunConfig
from shared.errors import CheckpointError, ModelError
from shared.merge import merge_adapter
from shared.model import load_model


def _trained_adapter(tiny_dir, cfg):
    model = attach_adapter(load_model(tiny_dir, torch.device("cpu"), torch.float32), cfg)
    names = exchanged_names(model, "fedavg")
    rng = np.random.default_rng(0)
    set_arrays(model, names, [a + rng.normal(scale=0.05, size=a.shape).astype(np.float32)
                              for a in get_arrays(model, names)])
    return model, names


def test_checkpoint_is_peft_loadable_and_resumable(tmp_path, tiny_dir):
    cfg = RunConfig(base_model="tiny", aggregation="fedavg", out_dir=str(tmp_path))
    model, names = _trained_adapter(tiny_dir, cfg)
    state = RunState(run_id="abc", config=cfg.to_flower(), round=2, base_eval_loss=3.0,
                     rounds=[{"round": 1}, {"round": 2}])
    path = save_checkpoint(tmp_path, state, model, {"base_model": "tiny", "base_model_path": str(tiny_dir)})
    assert latest_checkpoint(tmp_path) == path
    assert (tmp_path / "adapter").resolve() == path.resolve()
    assert load_state(path).rounds == state.rounds
    reloaded = PeftModel.from_pretrained(load_model(tiny_dir, torch.device("cpu"), torch.float32), path)
    for a, b in zip(get_arrays(model, names), get_arrays(reloaded, names)):
        np.testing.assert_array_equal(a, b)
    check_resumable(load_state(path), cfg.replace(num_rounds=10, learning_rate=0.1), path)  # allowed changes
    with pytest.raises(CheckpointError, match="aggregation: 'fedavg' -> 'ffa'"):
        check_resumable(load_state(path), cfg.replace(aggregation="ffa"), path)


def test_every_resume_is_recorded_even_when_the_resumed_run_stops_before_its_next_checkpoint(tmp_path, tiny_dir):
    """A run resumed from round 1 and killed before round 2's checkpoint, then resumed again: the report lists both."""
    from server.server_app import Coordinator

    cfg = RunConfig(base_model="tiny", aggregation="fedavg", out_dir=str(tmp_path), num_rounds=3, resume=True)
    model, _ = _trained_adapter(tiny_dir, cfg)
    state = RunState(run_id="abc", config=cfg.to_flower(), round=1, base_eval_loss=3.0, rounds=[{"round": 1}])
    path = save_checkpoint(tmp_path, state, model, {"base_model": "tiny", "base_model_path": str(tiny_dir)})
    first = Coordinator(cfg).state  # resumed; then it dies before round 2 is checkpointed
    second = Coordinator(cfg).state  # resumed again from the same checkpoint
    assert [r["from_round"] for r in first.resumed] == [1]
    assert [r["from_round"] for r in second.resumed] == [1, 1]
    assert load_state(path).rounds == [{"round": 1}] and load_state(path).round == 1  # nothing else changed


def test_unfinished_checkpoint_folders_are_ignored(tmp_path):
    (tmp_path / "checkpoints" / ".round-0003-abc").mkdir(parents=True)
    (tmp_path / "checkpoints" / "round-0004").mkdir()  # no state.json: never completed
    assert latest_checkpoint(tmp_path) is None


def test_corrupt_state_says_what_to_do(tmp_path):
    folder = tmp_path / "checkpoints" / "round-0001"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="remove that checkpoint folder"):
        load_state(folder)


def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_dir):
    cfg = RunConfig(base_model="tiny")
    model, _ = _trained_adapter(tiny_dir, cfg)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, {"base_model": "tiny"})
    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert (merged_dir / "chat_template.jinja").is_file() or "chat_template" in (
        merged_dir / "tokenizer_config.json").read_text()
    merged = load_model(merged_dir, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = load_model(tiny_dir, torch.device("cpu"), torch.float32)(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter does change the model
    assert (got - expected).abs().max() < 1e-4


def test_merge_refuses_to_overwrite(tmp_path, tiny_dir):
    cfg = RunConfig(base_model="tiny")
    model, _ = _trained_adapter(tiny_dir, cfg)
    save_adapter(model, tmp_path / "adapter", {"base_model": "tiny"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty"):
        merge_adapter(tmp_path / "adapter", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(ModelError, match="not an adapter folder"):
        merge_adapter(tmp_path, tmp_path / "x")
