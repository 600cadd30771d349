"""Local training: micro-batching by length changes nothing but speed; DP steps are exact."""

import numpy as np
import pytest
import torch

from client.train import backward_batch, dp_streams, length_chunks, make_private, poisson_batches, train_round
from shared.adapter import attach_adapter, exchanged_names, get_arrays, set_arrays
from shared.config import RunConfig
from shared.dialogue import encode_conversation
from shared.model import load_model


def _data(tokenizer, n=24):
    convs = [[{"role": "user", "content": "word " * (1 + (i * 7) % 40)},
              {"role": "assistant", "content": f"answer {i}"}] for i in range(n)]
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


def _grads(model, data, idx, max_tokens):
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        loss, tokens = backward_batch(model, data, idx, pad_id=0, device=torch.device("cpu"), max_tokens=max_tokens)
        grads = [p.grad.clone() for p in trainable]
    finally:
        for p in trainable:
            p.grad = None
    return grads, loss / tokens


def _dp_step_gradient(model, data, idx, cfg, max_tokens, noise_multiplier, noise_seed):
    """The gradient one DP step hands to AdamW: Opacus per-sample gradients through fedchat's optimizer."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    gsm, opt = make_private(model, torch.optim.SGD(trainable, lr=0.0), cfg, noise_multiplier,
                            dp_streams(noise_seed)[1])
    try:
        backward_batch(gsm, data, idx, pad_id=0, device=torch.device("cpu"), max_tokens=max_tokens,
                       dp_optimizer=opt)
        opt.pre_step()
        return [p.grad.clone() for p in trainable]
    finally:
        opt.zero_grad(set_to_none=True)
        gsm._close()


def test_micro_batching_gives_the_same_gradients(tiny_dir, tokenizer):
    data = _data(tokenizer)
    model = _model(tiny_dir)
    idx = [3, 7, 0, 12, 19, 5, 22, 9]
    whole, loss_whole = _grads(model, data, idx, 100_000)
    split, loss_split = _grads(model, data, idx, 40)
    assert len(length_chunks(idx, data, 40)) > 2
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    assert abs(loss_whole - loss_split) < 1e-6


def _max_tokens_for_chunks(data, idx, k):
    for max_tokens in range(10, 4000):
        if len(length_chunks(idx, data, max_tokens)) == k:
            return max_tokens
    raise AssertionError(f"no micro-batch size splits the batch into {k} chunks")


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_a_dp_step_does_not_depend_on_the_micro_batching(tiny_dir, tokenizer, chunks):
    """Threat: the released step was (clipped sum + noise) / (B * k) with k, the number of backward
    passes, a function of the lengths of the conversations drawn. It must be (clipped sum + noise) / B."""
    data = _data(tokenizer)
    idx = [3, 7, 0, 12, 19, 5]
    cfg = RunConfig(base_model="tiny", batch_size=4, dp_max_grad_norm=0.05)
    max_tokens = _max_tokens_for_chunks(data, idx, chunks)
    model = _model(tiny_dir)
    got = _dp_step_gradient(model, data, idx, cfg, max_tokens, noise_multiplier=0.5, noise_seed=11)

    # By hand: each conversation's own gradient (no Opacus), clipped jointly over all tensors to C.
    summed = None
    for i in idx:
        alone, _ = _grads(model, data, [i], 100_000)
        norm = torch.sqrt(sum((g ** 2).sum() for g in alone))
        factor = min(1.0, cfg.dp_max_grad_norm / (float(norm) + 1e-6))
        assert factor < 1.0  # the clipping is exercised
        summed = [g * factor for g in alone] if summed is None else [s + g * factor for s, g in zip(summed, alone)]
    rng, std = dp_streams(11)[1], 0.5 * cfg.dp_max_grad_norm
    noise = [torch.from_numpy(rng.standard_normal((4, *s.shape)).sum(0) * (std / 2)).float() for s in summed]
    want = [(s + n) / cfg.batch_size for s, n in zip(summed, noise)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_dp_randomness_keeps_every_bit_of_its_seed():
    """Threat: torch's CPU generator keeps 32 bits of a seed, so whoever sees one update could search all
    seeds for the noise. Seeds that differ only above bit 32 must give other samples and other noise."""
    seed = 0x1234_5678_9ABC
    other = seed + (1 << 40)
    a_sample, a_noise = dp_streams(seed)
    b_sample, b_noise = dp_streams(other)
    assert list(poisson_batches(1000, 0.1, 3, a_sample)) != list(poisson_batches(1000, 0.1, 3, b_sample))
    assert not np.allclose(a_noise.standard_normal(64), b_noise.standard_normal(64))
    assert a_noise.bit_generator.state["bit_generator"] == "PCG64DXSM"  # 128-bit state
    # the same seed gives the same streams (the node draws a fresh 256-bit OS seed every round)
    c_sample, c_noise = dp_streams(seed)
    np.testing.assert_array_equal(dp_streams(seed)[0].random(8), c_sample.random(8))


def _delta(tiny_dir, data, cfg, noise):
    model = _model(tiny_dir)
    names = exchanged_names(model, cfg.aggregation)
    return train_round(model, names, data, cfg, pad_id=0, seed=3, noise_multiplier=noise)


def test_the_recipe_bench_carries_adamw_moments_without_a_product_option(tiny_dir, tokenizer):
    """bench/dp_recipe --carry-moments: a round started from the last round's moments is AdamW's next steps."""
    from bench.dp_recipe import carried_adamw

    data = _data(tokenizer, 40)
    cfg = RunConfig(base_model="tiny", local_steps=2, batch_size=8, learning_rate=1e-3)
    model = _model(tiny_dir)
    names = exchanged_names(model, cfg.aggregation)
    first: list = []
    with carried_adamw(None, first):
        train_round(model, names, data, cfg.replace(learning_rate=2e-3), pad_id=0, seed=3, noise_multiplier=1.0)
    after_first = get_arrays(model, names)
    fresh = train_round(model, names, data, cfg, pad_id=0, seed=4, noise_multiplier=1.0)
    set_arrays(model, names, after_first)
    second: list = []
    with carried_adamw(first[-1].state_dict(), second):
        carried = train_round(model, names, data, cfg, pad_id=0, seed=4, noise_multiplier=1.0)
    state = second[-1].state_dict()
    assert [float(s["step"]) for s in state["state"].values()] == [4.0] * len(names)
    assert state["param_groups"][0]["lr"] == 1e-3  # this round's rate, not the carried one
    assert torch.optim.AdamW is not type(second[-1])  # the patch is undone
    # the same sample and noise from the same point: only the moments differ
    assert max(float(np.abs(x - y).max()) for x, y in zip(fresh.delta, carried.delta)) > 1e-5


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
    # noisy: the same seed (the same Poisson sample) with next to no noise gives another update in every
    # tensor, so the noise is added; another seed gives another update again
    model = _model(tiny_dir)
    names = exchanged_names(model, cfg.aggregation)
    quiet = train_round(model, names, data, cfg, pad_id=0, seed=3, noise_multiplier=1e-6)
    differs = [float(np.abs(x - y).max()) for x, y in zip(a.delta, quiet.delta)]
    assert min(differs) > 1e-4, differs  # every tensor moved by the noise
    model = _model(tiny_dir)
    c = train_round(model, names, data, cfg, pad_id=0, seed=4, noise_multiplier=1.0)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a.delta, c.delta)) > 1e-4


def test_a_conversation_with_a_non_finite_gradient_counts_as_zero(tiny_dir, tokenizer):
    """Threat: one drawn conversation whose gradient overflows to inf/NaN (float16, a crafted global adapter)
    made the clipped sum, and so the released update, NaN: that alone shows it was drawn. Its gradient
    must count as zero (within the clipping bound): the step is the others' clipped sum plus the noise."""
    data = _data(tokenizer)
    model = _model(tiny_dir)
    emb = model.get_input_embeddings().weight
    poison = max(t for e in data for t in e.input_ids) + 1  # a token no other conversation holds
    with torch.no_grad():
        emb[poison] = float("inf")  # its activations overflow: loss and gradient are NaN
    bad = len(data)
    data.append(type(data[0])([*data[0].input_ids[:-2], poison, *data[0].input_ids[-2:]],
                              [*data[0].labels[:-2], -100, *data[0].labels[-2:]], False))
    cfg = RunConfig(base_model="tiny", batch_size=4, dp_max_grad_norm=0.05)
    idx = [3, 7, 0, 12]
    alone, _ = _grads(model, data, [bad], 100_000)
    assert not all(bool(torch.isfinite(g).all()) for g in alone)  # the conversation's gradient is non-finite
    for max_tokens in (100_000, 60):  # one micro-batch, and several
        got = _dp_step_gradient(model, data, [*idx, bad], cfg, max_tokens, noise_multiplier=0.5, noise_seed=11)
        want = _dp_step_gradient(model, data, idx, cfg, 100_000, noise_multiplier=0.5, noise_seed=11)
        for g, w in zip(got, want):
            assert bool(torch.isfinite(g).all())
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
