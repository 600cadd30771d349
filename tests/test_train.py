"""Local training: micro-batching by length changes nothing but speed; DP steps are correct."""

import numpy as np
import torch

from client.train import backward_batch, length_chunks, train_round
from shared.adapter import attach_adapter, exchanged_names
from shared.config import RunConfig
from shared.dialogue import encode_conversation
from shared.model import load_model


def _data(tokenizer, n=24):
    convs = [[{"role": "user", "content": "word " * (1 + (i * 7) % 40)}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(n)]
    return [encode_conversation(tokenizer, m, 128) for m in convs]


def test_length_chunks_groups_similar_lengths(tokenizer):
    data = _data(tokenizer)
    idx = list(range(len(data)))
    chunks = length_chunks(idx, data, max_tokens=10_000)
    assert sorted(i for c in chunks for i in c) == idx
    for c in chunks:
        lengths = [len(data[i].input_ids) for i in c]
        assert min(lengths) * 2 >= max(lengths)
    for c in length_chunks(idx, data, max_tokens=120):
        assert len(c) * max(len(data[i].input_ids) for i in c) <= 120 or len(c) == 1
    assert length_chunks([], data, 100) == []


def _model(tiny_dir):
    torch.manual_seed(0)
    cfg = RunConfig(base_model="tiny")
    return attach_adapter(load_model(tiny_dir, torch.device("cpu"), torch.float32), cfg)


def _grads(model, data, idx, max_tokens, dp):
    from opacus import GradSampleModule

    trainable = [p for p in model.parameters() if p.requires_grad]
    forward = GradSampleModule(model, batch_first=True, loss_reduction="mean") if dp else model
    try:
        loss, tokens = backward_batch(forward, data, idx, pad_id=0, device=torch.device("cpu"),
                                      max_tokens=max_tokens, dp=dp)
        if dp:
            grads = [torch.cat(p.grad_sample) if isinstance(p.grad_sample, list) else p.grad_sample
                     for p in trainable]
        else:
            grads = [p.grad.clone() for p in trainable]
    finally:
        if dp:
            forward._close()
        for p in trainable:
            p.grad = None
    return grads, loss / tokens


def test_micro_batching_gives_the_same_gradients(tiny_dir, tokenizer):
    data = _data(tokenizer)
    model = _model(tiny_dir)
    idx = [3, 7, 0, 12, 19, 5, 22, 9]
    whole, loss_whole = _grads(model, data, idx, 100_000, dp=False)
    split, loss_split = _grads(model, data, idx, 40, dp=False)
    assert len(length_chunks(idx, data, 40)) > 2
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    assert abs(loss_whole - loss_split) < 1e-6
    # DP: one per-conversation gradient per conversation, whichever micro-batch it was in.
    per_sample, _ = _grads(model, data, idx, 40, dp=True)
    order = [i for c in length_chunks(idx, data, 40) for i in c]
    for k, i in enumerate(order[:3]):
        alone, _ = _grads(model, data, [i], 100_000, dp=False)
        for g_sample, g_alone in zip(per_sample, alone):
            torch.testing.assert_close(g_sample[k], g_alone, atol=1e-6, rtol=1e-4)
    # ... and their mean is the plain batch gradient.
    for g_sample, g_mean in zip(per_sample, whole):
        torch.testing.assert_close(g_sample.mean(0), g_mean, atol=1e-7, rtol=1e-4)


def _delta(tiny_dir, data, cfg, noise):
    model = _model(tiny_dir)
    names = exchanged_names(model, cfg.aggregation)
    return train_round(model, names, data, cfg, pad_id=0, seed=3, noise_multiplier=noise)


def test_dp_update_is_bounded_and_noisy(tiny_dir, tokenizer):
    data = _data(tokenizer, 40)
    cfg = RunConfig(base_model="tiny", local_steps=2, batch_size=8, learning_rate=1e-3)
    a = _delta(tiny_dir, data, cfg, 1.0)
    b = _delta(tiny_dir, data, cfg, 1.0)
    for d in a.delta:  # AdamW moves a value by at most ~3.2 lr per step: within the SecAgg+ bound
        assert np.abs(d).max() <= cfg.update_bound
    assert a.conversations_drawn > 0 and a.steps == 2
    # same seed: same Poisson sample and noise; the node draws a fresh OS-random seed each round in practice
    for x, y in zip(a.delta, b.delta):
        np.testing.assert_allclose(x, y, atol=1e-6)
