"""Attacks by a coordinator running modified code, written as the adversary, against Flower's stock SecAgg+
(`secaggplus_mod`, 1.41) in Flower's simulation engine: each recovers a victim's update that secure
aggregation should have hidden. The harness (tests/support/secagg_attacks.py) keeps each attack's description
apart from the protocol it runs against, so that the same attack can be run against another protocol."""

import random

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from tests.support.secagg_attacks import (
    STEP,
    ConvenientDropouts,
    KeySubstitution,
    MaskRange,
    SelectiveForwarding,
    SybilInjection,
    dequantised,
    fold_collision,
    one_ray_session,
    quantised,
    stock_mask,
    true_update,
)


@pytest.fixture(scope="module")
def ray_session():
    with one_ray_session():
        yield


def _silent(transcript) -> bool:
    """No node reported an error at any stage: nothing told an operator that the round was tampered with."""
    return not any(transcript.errors.values())


def _same(recovered: list[np.ndarray], expected: list[np.ndarray]) -> bool:
    return len(recovered) == len(expected) and all(
        r.shape == e.shape and np.array_equal(r, e) for r, e in zip(recovered, expected))


def _assert_recovered(recovered: list[np.ndarray], partition: int) -> None:
    """The victim's exact quantised update, which dequantises to its true update within one step."""
    expected = quantised(true_update(partition))
    assert _same(recovered, expected), "the attack did not recover the victim's quantised update"
    error = max(float(np.abs(r - u).max()) for r, u in zip(dequantised(recovered), true_update(partition)))
    assert error <= STEP


@pytest.mark.slow
def test_mask_range_2_makes_every_upload_the_quantised_update(ray_session, tmp_path):
    recovered, transcript = MaskRange().run_stock(tmp_path / "leaks")
    assert sorted(recovered) == [0, 1, 2] and _silent(transcript)
    for partition, bits in recovered.items():  # every node, from its upload alone, no colluder
        expected = [q % 2 for q in quantised(true_update(partition))]
        assert _same(bits, expected)
        assert 0.3 < np.concatenate([b.ravel() for b in bits]).mean() < 0.7  # real bits, not a constant


@pytest.mark.slow
def test_selective_forwarding_makes_the_victim_mask_with_colluders_only(ray_session, tmp_path):
    attack = SelectiveForwarding()
    recovered, transcript = attack.run_stock(tmp_path / "leaks")
    victim = transcript.nid(attack.victim)
    assert set(transcript.sent[Stage.COLLECT_MASKED_VECTORS][victim][Key.SOURCE_LIST]) == \
        {transcript.nid(c) for c in attack.colluders}
    assert _silent(transcript)
    _assert_recovered(recovered, attack.victim)


@pytest.mark.slow
def test_convenient_dropouts_leave_the_victim_alone_with_colluders(ray_session, tmp_path):
    attack = ConvenientDropouts()
    recovered, transcript = attack.run_stock(tmp_path / "leaks")
    assert transcript.workflow_error is None and transcript.halted_at is None and _silent(transcript)
    assert set(transcript.received[Stage.UNMASK]) == {transcript.nid(p) for p in (attack.victim, *attack.colluders)}
    truth = true_update(attack.victim)
    error = max(float(np.abs(r - u).max()) for r, u in zip(recovered, truth))
    print(f"convenient dropouts: victim recovered to max |error| {error:.3g} (one step {STEP:.3g})")
    assert error <= STEP
    assert _same(quantised(recovered), quantised(truth))


@pytest.mark.slow
def test_sybils_in_the_victims_key_list_take_its_shares(ray_session, tmp_path):
    attack = SybilInjection()
    recovered, transcript = attack.run_stock(tmp_path / "leaks")
    victim = transcript.nid(attack.victim)
    assert set(transcript.scratch["sybils"]) <= set(transcript.received[Stage.SHARE_KEYS][victim][Key.DESTINATION_LIST])
    assert transcript.workflow_error is None and _silent(transcript)  # the round even finished as usual
    _assert_recovered(recovered, attack.victim)


@pytest.mark.slow
def test_a_substituted_peer_key_hands_the_coordinator_the_victims_share(ray_session, tmp_path):
    attack = KeySubstitution()
    recovered, transcript = attack.run_stock(tmp_path / "leaks")
    assert len(attack.colluders) == 1 < attack.threshold  # the colluder alone holds too few shares
    assert _silent(transcript)
    _assert_recovered(recovered, attack.victim)


def test_stock_masks_fold_the_secret_to_32_bits_and_never_draw_the_top_value():
    rng = random.Random(5)
    secret = bytes(rng.getrandbits(8) for _ in range(32))
    other = fold_collision(secret)
    assert other != secret and len(other) == 32
    assert np.array_equal(stock_mask(secret, 2**32, 1000), stock_mask(other, 2**32, 1000))  # 2^32 seeds in all
    assert not np.array_equal(stock_mask(secret, 2**32, 1000), stock_mask(bytes(32), 2**32, 1000))
    draws = stock_mask(secret, 8, 20_000)
    assert set(np.unique(draws).tolist()) == set(range(7))  # 7 is never drawn: masks are not uniform
    assert not stock_mask(secret, 2, 1000).any()  # with a range of 2 every mask is 0
