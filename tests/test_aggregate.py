"""Aggregation maths: weighted FedAvg, FFA-LoRA exactness, update validation."""

import numpy as np
import pytest
import torch

from server.aggregate import apply_update, update_problem, weighted_average
from shared.adapter import attach_adapter, exchanged_names, get_arrays, set_arrays
from shared.config import RunConfig
from shared.model import load_model


def test_weighted_average_weights_by_examples():
    a = [np.array([1.0, 2.0], dtype=np.float32), np.ones((2, 2), dtype=np.float32)]
    b = [np.array([3.0, 6.0], dtype=np.float32), np.zeros((2, 2), dtype=np.float32)]
    avg = weighted_average([a, b], [1, 3])
    np.testing.assert_allclose(avg[0], [2.5, 5.0])
    np.testing.assert_allclose(avg[1], np.full((2, 2), 0.25))
    assert avg[0].dtype == np.float32


def test_weighted_average_refuses_nonsense():
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([[np.zeros(1)]], [0])


def test_averaging_updates_equals_averaging_weights():
    rng = np.random.default_rng(0)
    g = [rng.normal(size=(4, 3)).astype(np.float32)]
    trained = [[g[0] + rng.normal(size=(4, 3)).astype(np.float32)] for _ in range(3)]
    weights = [10, 20, 70]
    via_updates = apply_update(g, weighted_average([[t[0] - g[0]] for t in trained], weights))
    via_weights = weighted_average(trained, weights)
    np.testing.assert_allclose(via_updates[0], via_weights[0], atol=1e-6)


def test_ffa_average_of_products_is_product_of_average():
    """FFA-LoRA: A is shared and frozen, so mean_i(B_i A) == mean_i(B_i) A exactly."""
    rng = np.random.default_rng(1)
    A = rng.normal(size=(8, 64))
    Bs = [rng.normal(size=(32, 8)) for _ in range(4)]
    w = [5, 1, 3, 7]
    lhs = sum(wi * (B @ A) for wi, B in zip(w, Bs)) / sum(w)
    rhs = weighted_average([[B] for B in Bs], w)[0].astype(np.float64) @ A
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-6)
    # ... whereas averaging A and B separately (plain FedAvg on LoRA) is not the average product.
    As = [rng.normal(size=(8, 64)) for _ in range(4)]
    avg_product = sum(wi * (B @ Ai) for wi, B, Ai in zip(w, Bs, As)) / sum(w)
    product_of_avgs = (sum(wi * B for wi, B in zip(w, Bs)) / sum(w)) @ (sum(wi * Ai for wi, Ai in zip(w, As)) / sum(w))
    assert np.abs(avg_product - product_of_avgs).max() > 0.1


def test_ffa_exchanges_only_b_and_every_party_derives_the_same_a(tiny_dir):
    cfg = RunConfig(base_model="tiny", aggregation="ffa", seed=7)
    m1 = attach_adapter(load_model(tiny_dir, torch.device("cpu"), torch.float32), cfg)
    m2 = attach_adapter(load_model(tiny_dir, torch.device("cpu"), torch.float32), cfg)
    names = exchanged_names(m1, "ffa")
    assert names and all(".lora_B." in n for n in names)
    all_names = exchanged_names(m1, "fedavg")
    assert len(all_names) == 2 * len(names)
    for a1, a2 in zip(get_arrays(m1, all_names), get_arrays(m2, all_names)):
        np.testing.assert_array_equal(a1, a2)
    a_trainable = [p.requires_grad for n, p in m1.named_parameters() if ".lora_A." in n]
    assert a_trainable and not any(a_trainable)
    other = attach_adapter(load_model(tiny_dir, torch.device("cpu"), torch.float32), cfg.replace(seed=8))
    a_names = [n for n in all_names if ".lora_A." in n]
    assert not np.array_equal(get_arrays(m1, a_names)[0], get_arrays(other, a_names)[0])


def test_update_validation_rejects_corrupt_and_oversized_updates():
    shapes = [(2, 3)]
    good = [np.full((2, 3), 0.01, dtype=np.float32)]
    assert update_problem(good, shapes, bound=0.1) is None
    assert "tensors instead of" in update_problem(good * 2, shapes, 0.1)
    assert "shape" in update_problem([np.zeros((3, 2), dtype=np.float32)], shapes, 0.1)
    assert "NaN" in update_problem([np.full((2, 3), np.nan, dtype=np.float32)], shapes, 0.1)
    assert "beyond" in update_problem([np.full((2, 3), 5.0, dtype=np.float32)], shapes, 0.1)


def test_set_arrays_refuses_wrong_shapes(tiny_dir):
    cfg = RunConfig(base_model="tiny")
    m = attach_adapter(load_model(tiny_dir, torch.device("cpu"), torch.float32), cfg)
    names = exchanged_names(m, "fedavg")
    arrays = get_arrays(m, names)
    arrays[0] = np.zeros((arrays[0].shape[0] + 1, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
    with pytest.raises(ValueError, match="shape"):
        set_arrays(m, names, arrays)
