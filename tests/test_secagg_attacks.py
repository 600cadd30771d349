"""Attacks by a coordinator running modified code, written as the adversary, in Flower's simulation engine.

Against Flower's stock SecAgg+ (`secaggplus_mod`, 1.41) each recovers a victim's update that secure aggregation
should have hidden. The same attacks (same round size, victim and colluders; the tampering written for fedchat's
messages) then run against fedchat's own secure sum (`client.secagg_mod` on every node, its coordinator workflow
modified so that it never halts a round by itself): each is refused by the honest nodes with a clear
PrivacyError, no honest node reveals enough shares to rebuild a secret that would unmask the victim's upload, and
the attacker's best recovery, with everything its colluders leaked (identity keys, protocol state), is not the
victim's update. Each fedchat test's docstring names the node check it depends on: with that check off
(`if False:` in client/secagg_mod.py) the test fails. The harness (tests/support/secagg_attacks.py) keeps each
attack's description apart from the protocol it runs against."""

import random

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from fedchat.federation.simulation import one_ray_session
from shared import masking
from shared import secagg_wire as wire
from tests.support.secagg_attacks import (
    STEP,
    ConvenientDropouts,
    KeySubstitution,
    ListEquivocation,
    MaskRange,
    SelectiveForwarding,
    SybilInjection,
    dequantised,
    fedchat_matches,
    fedchat_threshold,
    fold_collision,
    member_name,
    quantised,
    rebuilt_secrets,
    refusal,
    stock_mask,
    true_update,
    victim_shares,
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


def test_fedchat_masks_from_fold_colliding_secrets_are_unrelated_and_reach_the_top_value():
    """The stock mask search against fedchat's masks: the same pair of secrets (equal 32-bit XOR folds, equal
    stock masks) gives unrelated fedchat masks, so there is no 32-bit seed to search, and masks over Z_2^32 reach
    the top of the range. Depends on: shared/masking.py `mask_stream` (HKDF-SHA256 of the whole secret, then
    ChaCha20's keystream)."""
    rng = random.Random(5)
    secret = bytes(rng.getrandbits(8) for _ in range(32))
    other = fold_collision(secret)
    assert np.array_equal(stock_mask(secret, 2**32, 1000), stock_mask(other, 2**32, 1000))
    label = masking.pair_label(b"fedchat-secagg/1:roster:run:1", 1, 2)
    mine, theirs = masking.mask_stream(secret, label, 4096), masking.mask_stream(other, label, 4096)
    assert np.mean(mine == theirs) < 0.01
    top = masking.mask_stream(secret, label, 1 << 16)
    assert int(top.max()) > 2**32 - 2**18 and len(np.unique(top >> 29)) == 8  # every eighth of Z_2^32


# ------------------------------------------------------------------ the same attacks against fedchat's secure sum


def _shares_of_the_victim(attack, t) -> dict[str, tuple[int, int]]:
    """Per secret of the victim's (SELF: self-mask seed, PAIR: mask key): (shares revealed by honest nodes at
    unmask, shares the attacker holds otherwise: its colluders' and those sealed for keys it holds)."""
    shares = victim_shares(attack, t)
    return {kind: (len(by["honest"]), len(by["colluders"]) + len(by["opened"])) for kind, by in shares.items()}


def _assert_nothing_unmasks_the_victim(attack, t, recovered, notes, released=frozenset()) -> None:
    """Honest nodes revealed fewer shares of each secret of the victim than the threshold less what the attacker
    holds otherwise (except the kinds in `released`, which the protocol may release and which alone unmask
    nothing), no secret beyond `released` rebuilds, and the attacker's best recovery is not the update."""
    v = t.nid(attack.victim)
    if v in t.received.get(wire.ADVERTISE, {}):
        threshold = fedchat_threshold(t, v)
        for kind, (honest, held) in _shares_of_the_victim(attack, t).items():
            if kind not in released:
                assert honest < threshold - held, f"{honest} honest {kind} shares + {held} held reach {threshold}"
    assert set(rebuilt_secrets(attack, t)) <= set(released)
    assert not (wire.SELF in released and wire.PAIR in released)
    assert not fedchat_matches(recovered, attack.victim), "the attacker recovered the victim's update"
    if recovered is not None:
        assert notes["unknown_masks"], "every mask of the victim's upload was known to the attacker"


@pytest.mark.slow
def test_fedchat_nodes_refuse_a_cut_mask_range_before_making_a_key(ray_session, tmp_path):
    """MaskRange against fedchat (round of 3): nodes 0 and 2 are sent modulus_bits=1, node 1 levels=2. Every node
    derives the parameters itself and refuses any other value at the advertise stage, before it makes a key or
    trains. Depends on: the parameter check in NodeProtocol.advertise
    (`if problem := parameter_mismatch(sent, expected)`). With it off the nodes still mask with the parameters
    they derive (the values sent are never used) and the round completes: this test then fails on the missing
    refusal, and the attacker's recovery still fails."""
    attack = MaskRange()
    recovered, notes, t = attack.run_fedchat(tmp_path / "leaks")
    assert {attack.tampered(p) for p in range(attack.nodes)} == {("modulus_bits", 1), ("levels", 2)}
    for partition in range(attack.nodes):
        name, value = attack.tampered(partition)
        assert f"the coordinator's '{name}' is {value!r}; this node derives" in refusal(t, wire.ADVERTISE, partition)
    assert not t.received[wire.ADVERTISE] and t.halted_at == wire.ADVERTISE
    assert wire.SHARE_KEYS not in t.sent and wire.COLLECT not in t.sent  # no key shared, nothing trained
    assert recovered is None and not notes["uploaded"]


@pytest.mark.slow
@pytest.mark.parametrize("also_forwarded", [frozenset(), frozenset({1})], ids=["colluders-only", "one-honest-too"])
def test_fedchat_selective_forwarding_is_refused(ray_session, tmp_path, also_forwarded):
    """SelectiveForwarding against fedchat (round of 5, colluders 3 and 4: threshold 4, at least 4 survivors).
    Forwarded only the colluders' key shares, the victim refuses before it trains: it masks with at least 3 others
    (depends on: the neighbour-set check in NodeProtocol.collect, `if len(view) < d["needed"]`); the others
    finish the round without it, revealing its mask key (the dropout rule), which masks no upload. Forwarded one
    honest node's shares too (a neighbour set just large enough), it uploads, and the consistency round stops
    everyone before unmasking (depends on: the survivor-list check `if outside := set(survivors) - set(d["view"])`
    for the victim and the equal-views check `if view["view"] != d["view"]` for the honest nodes, in
    NodeProtocol.consistency). With the neighbour-set check off the victim masks with the colluders alone and
    uploads, and the consistency round stops everyone; with the survivor-list check off the victim meets the
    equal-views check instead; with the equal-views check off the honest nodes unmask a sum and the victim's
    seed, and one pairwise mask (with the honest node it was forwarded) stays on its upload: each variant then
    fails here on the refusal it expects, and no recovery matched."""
    attack = SelectiveForwarding(fedchat_also_forwarded=also_forwarded)
    recovered, notes, t = attack.run_fedchat(tmp_path / "leaks")
    victim, honest = t.nid(attack.victim), [p for p in range(attack.nodes) if p not in attack.colluders]
    forwarded = set(t.sent[wire.COLLECT][victim][wire.SOURCES])
    assert forwarded == {t.nid(p) for p in attack.colluders | also_forwarded}
    if not also_forwarded:
        assert "key shares reached this node from 2 other node(s); it masks only with at least 3 others" in \
            refusal(t, wire.COLLECT, attack.victim)
        assert recovered is None and not notes["uploaded"]
        _assert_nothing_unmasks_the_victim(attack, t, recovered, notes, released=frozenset({wire.PAIR}))
    else:
        left_out = t.nid(2)
        assert f"the survivor list names node(s) [{left_out}] this node did not mask with" in \
            refusal(t, wire.CONSISTENCY, attack.victim)
        for partition in set(honest) - {attack.victim}:
            assert "the coordinator forwarded key shares selectively" in refusal(t, wire.CONSISTENCY, partition)
        assert notes["uploaded"]
        assert not t.received.get(wire.UNMASK) and t.aggregate is None
        _assert_nothing_unmasks_the_victim(attack, t, recovered, notes)


@pytest.mark.slow
def test_fedchat_convenient_dropouts_are_refused_at_consistency(ray_session, tmp_path):
    """ConvenientDropouts against fedchat (round of 5, colluders 3 and 4: threshold 4, at least 4 survivors):
    nodes 1 and 2 "drop out" after key sharing, and the victim, which has uploaded its masked update, refuses to
    sign a survivor list of itself and the two colluders. Depends on: the survivor count in
    NodeProtocol.consistency (`if len(survivors) < d["needed"]`). With it off the nodes sign and the unmask
    quorum stops them (3 survivors cannot give t = 4 signatures), as does the threshold itself (the victim and
    the colluders hold 3 shares of 4): the test then fails on the refusal it expects."""
    attack = ConvenientDropouts()
    recovered, notes, t = attack.run_fedchat(tmp_path / "leaks")
    assert set(t.sent[wire.COLLECT]) == {t.nid(p) for p in (attack.victim, *attack.colluders)}
    assert "only 3 masked updates would be summed; this node needs at least 4 (two honest updates when 2 members " \
        "may collude)" in refusal(t, wire.CONSISTENCY, attack.victim)
    assert t.aggregate is None and not t.received.get(wire.UNMASK)
    assert notes["uploaded"] and {t.nid(p) for p in attack.dropped} <= set(notes["unknown_masks"])
    _assert_nothing_unmasks_the_victim(attack, t, recovered, notes)


@pytest.mark.slow
def test_fedchat_sybil_advertisements_are_refused_before_any_share_is_sealed(ray_session, tmp_path):
    """SybilInjection against fedchat: the sample names two sybils (parameters derived for 5 nodes), and each
    node's advertisement list carries their advertisements, signed with keys the coordinator holds: one claims
    'org-sybil' (not on the roster), one the honest member 'org-2'. Every node refuses before sealing a share.
    Depends on: the roster lookup (`if listed is None`: with it off the node fails on a missing member, not with
    this refusal) and the signature check (`if not verify(...)`: with it off the nodes that meet the name thief
    first accept it and refuse the off-roster sybil next) in NodeProtocol._verify_statement."""
    attack = SybilInjection()
    recovered, notes, t = attack.run_fedchat(tmp_path / "leaks")
    assert "'org-sybil' made a advertisement statement but is not on the roster this node's operator approved" in \
        refusal(t, wire.SHARE_KEYS, attack.victim)
    for partition in range(1, attack.nodes):
        assert f"the advertisement statement of roster member '{member_name(1)}' does not carry that member's " \
            "signature" in refusal(t, wire.SHARE_KEYS, partition)
    assert not t.received[wire.SHARE_KEYS]  # no node sealed a share, for a sybil or anyone
    assert recovered is None and wire.COLLECT not in t.sent
    assert _shares_of_the_victim(attack, t) == {wire.SELF: (0, 0), wire.PAIR: (0, 0)}
    _assert_nothing_unmasks_the_victim(attack, t, recovered, notes)


@pytest.mark.slow
def test_fedchat_a_substituted_peer_key_is_refused_before_any_share_is_sealed(ray_session, tmp_path):
    """KeySubstitution against fedchat (round of 3, colluder 2: threshold 3): the peer's advertisement in the
    victim's list carries the coordinator's keys under the peer's real signature; the victim refuses before it
    seals a share for them, and the others, left with too few neighbours, refuse to mask. Depends on: the
    signature check in NodeProtocol._verify_statement (`if not verify(listed.public_key, blob, ...)`). With it
    off the victim seals shares for the substitute keys and uploads, masked with pairwise masks the attacker all
    knows (the substitute's and the colluder's): only its self mask stays on, because the survivor count stops
    the round (the victim and the colluder) and the attacker holds 2 seed shares of 3."""
    attack = KeySubstitution()
    recovered, notes, t = attack.run_fedchat(tmp_path / "leaks")
    assert f"the advertisement statement of roster member '{member_name(attack.peer)}' does not carry that " \
        "member's signature" in refusal(t, wire.SHARE_KEYS, attack.victim)
    assert t.nid(attack.victim) not in t.received[wire.SHARE_KEYS]  # nothing sealed for the substitute keys
    assert recovered is None and not notes["uploaded"]
    assert _shares_of_the_victim(attack, t) == {wire.SELF: (0, 0), wire.PAIR: (0, 0)}
    _assert_nothing_unmasks_the_victim(attack, t, recovered, notes)


@pytest.mark.slow
def test_fedchat_different_survivor_lists_never_release_both_secrets_of_the_victim(ray_session, tmp_path):
    """ListEquivocation (fedchat only; round of 5, colluder 4: threshold 4): node 3 is shown a survivor list
    without the victim, the others the full one; the colluder's signature is forged over both. The full list
    collects 4 signatures and its signers reveal the victim's self-mask seed shares (the victim survived); node 3
    holds 2 over its list and reveals nothing, so the victim's mask key (and its pairwise masks with honest nodes)
    stays hidden. Depends on: the quorum check in NodeProtocol.unmask (`if len(valid) < threshold`). With it off
    node 3 reveals its share of the victim's mask key too, and this test fails on that; the key still does not
    rebuild, as the threshold rule alone keeps both secrets from one attacker (each honest holder reveals one
    kind: n + c = 6 shares in all, 2t = 8 needed)."""
    attack = ListEquivocation()
    recovered, notes, t = attack.run_fedchat(tmp_path / "leaks")
    victim = t.nid(attack.victim)
    assert {len(signers) for signers in t.scratch["signed"].values()} == {4, 2}
    assert "2 survivor(s) signed the same survivor list as this node; it reveals shares only after 4 have" in \
        refusal(t, wire.UNMASK, 3)
    assert _shares_of_the_victim(attack, t)[wire.PAIR][0] == 0
    assert set(rebuilt_secrets(attack, t)) == {wire.SELF}  # the seed alone: the pairwise masks stay on
    assert notes["uploaded"] and {t.nid(p) for p in (1, 2, 3)} <= set(notes["unknown_masks"])
    assert victim in t.received[wire.UNMASK]
    _assert_nothing_unmasks_the_victim(attack, t, recovered, notes, released=frozenset({wire.SELF}))
