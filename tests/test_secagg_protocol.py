"""fedchat's secure sum against a coordinator that cheats, between real node mods in one process.

Each adversary is a subclass of the real coordinator workflow (server.secagg_workflow.SecureAggregation) that
changes what it sends, as a modified ServerApp would; colluding members hand it their identity keys
and everything their nodes hold. Each test asserts the honest nodes' refusal and that no honest node
revealed a share that would let the coordinator rebuild a secret of the victim's. The same attacks
run through Flower's simulation engine, first against Flower's stock SecAgg+, in
tests/test_secagg_attacks.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord

from server.secagg_workflow import SecureAggregation, quantisation_error_bound
from shared import masking
from shared import secagg_wire as wire
from shared.config import RunConfig
from shared.crypto import load_identity_key, sign
from shared.secagg_rules import derive_parameters, survivors_needed, threshold_for
from tests.support.secagg_federation import Federation


def _ids(fed: Federation) -> list[int]:
    return sorted(fed.nodes)


def _error(strategy, fed: Federation) -> float:
    """Largest difference from the plaintext weighted mean, less the float32 rounding of the stored mean."""
    expected = fed.expected_mean(fed.survivors)
    ulp = float(np.spacing(np.float32(max(float(np.abs(e).max()) for e in expected))))
    return max(float(np.abs(a - b).max()) for a, b in zip(strategy.mean, expected)) - ulp


def honest_reveals(fed: Federation, honest: set[int]) -> dict[tuple[int, str], int]:
    """How many shares of each (owner, kind) honest nodes revealed at unmask."""
    counts: dict[tuple[int, str], int] = {}
    for reply in fed.grid.received:
        if reply.has_error() or reply.metadata.src_node_id not in honest:
            continue
        record = reply.content.config_records.get(wire.RECORD, {})
        for owner, kind in zip(record.get(wire.OWNERS, []), record.get(wire.KINDS, [])):
            counts[(owner, kind)] = counts.get((owner, kind), 0) + 1
    return counts


def refusals(fed: Federation, node_id: int) -> str:
    return " | ".join(fed.nodes[node_id].refusals)


# ------------------------------------------------------------------ correctness


def test_the_unmasked_sum_is_the_weighted_mean_within_the_quantisation_bound(tmp_path):
    fed = Federation(tmp_path, 5)
    strategy, workflow = fed.run()
    fed.survivors = _ids(fed)
    params = derive_parameters(fed.cfg, 5, fed.roster.colluder_bound)
    bound = quantisation_error_bound(params, [n.weight for n in fed.nodes.values()])
    assert _error(strategy, fed) <= bound
    assert workflow.last_parameters["total_weight"] == sum(n.weight for n in fed.nodes.values())
    assert all(not n.refusals and n.trained == 1 for n in fed.nodes.values())


def test_dropouts_after_key_sharing_are_unmasked_up_to_the_tolerance(tmp_path):
    fed = Federation(tmp_path, 5, colluders=0)  # threshold 3, survivors 3: two may drop out
    gone = set(_ids(fed)[-2:])

    class Drop(SecureAggregation):
        def _collect(self, grid, context, state):
            grid.offline = gone
            return super()._collect(grid, context, state)

    strategy, workflow = fed.run(Drop)
    fed.survivors = [n for n in _ids(fed) if n not in gone]
    bound = quantisation_error_bound(derive_parameters(fed.cfg, 5, 0), [fed.nodes[n].weight for n in fed.survivors])
    assert workflow.last_parameters["dropped"] == 2 and _error(strategy, fed) <= bound


def test_a_sum_of_values_at_the_clipping_range_does_not_wrap(tmp_path):
    fed = Federation(tmp_path, 3, colluders=0, cfg=RunConfig(secagg_max_weight=50, secagg=True))
    bound = fed.cfg.update_bound
    for i, node in enumerate(fed.nodes.values()):  # every value at +bound or -bound, weights at the cap
        node.update = [np.full(u.shape, bound if i % 2 else -bound) for u in node.update]
        node.weight = 50
    strategy, _ = fed.run()
    fed.survivors = _ids(fed)
    assert _error(strategy, fed) <= quantisation_error_bound(derive_parameters(fed.cfg, 3, 0), [50] * 3)


def test_masks_use_every_bit_of_the_secret_and_cover_the_modulus():
    # Two secrets whose 32-bit XOR folds agree (Flower's seed) give unrelated masks here.
    a = masking.random_secret()
    words = np.frombuffer(a, dtype="<u4").copy()
    words[0] ^= 0x5A5A5A5A
    words[1] ^= 0x5A5A5A5A  # the XOR of all eight words is unchanged
    b = words.tobytes()
    assert np.bitwise_xor.reduce(np.frombuffer(a, "<u4")) == np.bitwise_xor.reduce(np.frombuffer(b, "<u4"))
    ma, mb = masking.mask_stream(a, b"l", 1 << 16), masking.mask_stream(b, b"l", 1 << 16)
    assert np.mean(ma == mb) < 0.001
    # Uniform over Z_2^32: the top value's neighbourhood is reached, and each of 16 top-bit bins holds its share.
    big = masking.mask_stream(a, b"m", 1 << 20)
    assert int(big.max()) > 2**32 - 2**14
    counts = np.bincount(big >> 28, minlength=16)
    chi2 = float(((counts - big.size / 16) ** 2 / (big.size / 16)).sum())
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 above 50
    # The label separates streams: another round or pair of the same secret is another mask.
    assert np.mean(masking.mask_stream(a, b"l", 4096) == masking.mask_stream(a, b"k", 4096)) < 0.01


def test_a_shamir_secret_needs_threshold_shares():
    secret = masking.random_secret()
    shares = masking.split_secret(secret, list(range(1, 8)), 4)
    assert masking.combine_shares(dict(list(shares.items())[3:])) == secret
    with pytest.raises(ValueError):
        masking.combine_shares(dict(list(shares.items())[:3]))  # three points fit a wrong polynomial


# ------------------------------------------------------------------ parameters by rule


@pytest.mark.parametrize(("n", "c", "threshold", "tolerance"), [(3, 0, 2, 0), (5, 0, 3, 2), (20, 0, 11, 9),
                                                                (3, 1, 3, 0), (5, 1, 4, 1), (20, 1, 11, 9),
                                                                (5, 2, 4, 1), (20, 9, 15, 5)])
def test_threshold_quorum_and_dropout_tolerance(n, c, threshold, tolerance):
    assert threshold_for(n, c) == threshold and n - survivors_needed(n, c) == tolerance
    # two lists signed by disjoint honest sets, colluders signing both, cannot both reach the quorum
    assert 2 * (threshold - c) > n - c
    assert threshold > c


@pytest.mark.parametrize(("field", "value"), [("modulus_bits", 1), ("levels", 2), ("clip", 1e-9), ("clip", 100.0),
                                              ("threshold", 2), ("max_weight", 1), ("colluders", 0),
                                              ("min_survivors", 3), ("nodes", 6)])
def test_a_node_refuses_any_parameter_it_does_not_derive_itself(tmp_path, field, value):
    fed = Federation(tmp_path, 5, colluders=2)

    class Tamper(SecureAggregation):
        def _exchange(self, grid, state, stage, records, fitins=None):
            if stage == wire.ADVERTISE:
                for values in records.values():
                    values[wire.PARAMETERS] = wire.canonical({**json.loads(values[wire.PARAMETERS]), field: value})
            return super()._exchange(grid, state, stage, records, fitins)

    strategy, workflow = fed.run(Tamper)
    assert workflow.last_parameters["halted_at"] == wire.ADVERTISE
    for node in fed.nodes.values():
        assert f"the coordinator's '{field}' is {value!r}" in refusals(fed, node.node_id)
        assert node.trained == 0


# ------------------------------------------------------------------ the roster


def _fields(ad: dict) -> dict:
    return {k: v for k, v in ad.items() if k not in ("protocol", "kind", "roster", "run", "round")}


def _nothing_sealed(fed: Federation) -> bool:
    return all(not m.content.config_records.get(wire.RECORD, {}).get(wire.SEALED)
               for m in fed.grid.received if not m.has_error())


@pytest.mark.parametrize("claims", ["org-sybil", "org-2"])
def test_sybils_in_the_sample_are_refused_before_any_share_is_sealed(tmp_path, claims):
    """The coordinator adds a node of its own to the sample, with a key it holds, claiming a name off the
    roster or an honest member's name."""
    from shared.crypto import create_identity_key

    fed = Federation(tmp_path, 5, colluders=1)
    sybil = create_identity_key(tmp_path / "sybil.pem")

    class Sybils(SecureAggregation):
        def _exchange(self, grid, state, stage, records, fitins=None):
            if stage == wire.ADVERTISE:
                for values in records.values():
                    values[wire.SAMPLE] = [*values[wire.SAMPLE], 999]
            return super()._exchange(grid, state, stage, records, fitins)

        def _share_keys(self, grid, context, state):
            ad = state.ads[state.active[0]][2]
            fake = wire.statement("advertisement", ad["roster"], ad["run"], ad["round"],
                                  **{**_fields(ad), "node": 999, "member": claims})
            state.ads[999] = (fake, bytes.fromhex(sign(sybil, fake)), ad)
            state.active.append(999)
            return super()._share_keys(grid, context, state)

    import server.secagg_workflow as module

    saved = module.derive_parameters  # the coordinator derives the parameters for the sample it shows
    module.derive_parameters = lambda cfg, n, c: saved(cfg, n + 1, c)
    try:
        _, workflow = fed.run(Sybils)
    finally:
        module.derive_parameters = saved
    assert workflow.last_parameters["halted_at"] == wire.SHARE_KEYS
    expected = "is not on the roster this node's operator approved" if claims == "org-sybil" else \
        "does not carry that member's signature"
    for node in fed.nodes.values():
        assert expected in refusals(fed, node.node_id)
        assert node.trained == 0
    assert _nothing_sealed(fed)


def test_a_substituted_key_is_refused_before_any_share_is_sealed(tmp_path):
    fed = Federation(tmp_path, 5, colluders=1)
    honest_peer = _ids(fed)[1]

    class Substitute(SecureAggregation):
        def _share_keys(self, grid, context, state):
            blob, signature, ad = state.ads[honest_peer]
            swapped = wire.statement("advertisement", ad["roster"], ad["run"], ad["round"],
                                     **{**_fields(ad), "mask_key": masking.new_key_pair()[1].hex()})
            state.ads[honest_peer] = (swapped, signature, ad)  # the peer's real signature, over its real keys
            return super()._share_keys(grid, context, state)

    _, workflow = fed.run(Substitute)
    assert workflow.last_parameters["halted_at"] == wire.SHARE_KEYS
    for node in fed.nodes.values():
        assert "the advertisement statement of roster member 'org-2' does not carry that member's signature" in \
            refusals(fed, node.node_id)
    assert _nothing_sealed(fed)


def test_a_node_takes_part_only_with_the_roster_its_operator_approved(tmp_path):
    fed = Federation(tmp_path, 3, colluders=0)
    first = fed.nodes[_ids(fed)[0]]
    first.config = first.config.replace(roster_sha256="0" * 64)
    second = fed.nodes[_ids(fed)[1]]
    second.config = second.config.replace(identity_key=str(tmp_path / "missing.pem"))
    _, workflow = fed.run()
    assert workflow.last_parameters["halted_at"] == wire.ADVERTISE
    assert "but this node's operator approved 0000" in refusals(fed, first.node_id)
    assert "fedchat roster key" in refusals(fed, second.node_id)


def test_a_round_of_the_victim_and_its_colluders_is_refused(tmp_path):
    # The roster allows 2 colluders; the coordinator samples the victim and 2 colluders only.
    fed = Federation(tmp_path, 5, colluders=2)
    chosen = set(_ids(fed)[:3])
    for n in set(fed.nodes) - chosen:
        fed.nodes.pop(n)
    _, workflow = fed.run(SecureAggregation.__mro__[0])  # the coordinator's own rule refuses it first ...
    assert "halted_at" in workflow.last_parameters

    class AnySize(SecureAggregation):  # ... and a modified one that skips the rule meets the node's
        def _advertise(self, grid, context, state):
            import server.secagg_workflow as module

            saved = module.round_refusal
            module.round_refusal = lambda n, c: None
            try:
                return super()._advertise(grid, context, state)
            finally:
                module.round_refusal = saved

    _, workflow = fed.run(AnySize)
    for node in fed.nodes.values():
        assert "cannot hide one update when 2 roster member(s) may collude" in refusals(fed, node.node_id)
        assert node.trained == 0


def test_a_stricter_node_refuses_rounds_its_own_bound_does_not_allow(tmp_path):
    fed = Federation(tmp_path, 5, colluders=0)  # the roster: no colluders, threshold 3
    strict = fed.nodes[_ids(fed)[0]]
    strict.config = strict.config.replace(secagg_colluders=2)  # this operator assumes 2
    _, workflow = fed.run()
    assert "threshold 3 lets two different survivor lists both reach a quorum when 2 members collude" in \
        refusals(fed, strict.node_id)
    assert strict.trained == 0


# ------------------------------------------------------------------ what the coordinator forwards


def test_selective_forwarding_is_refused_at_consistency_and_nothing_is_revealed(tmp_path):
    fed = Federation(tmp_path, 6, colluders=1)  # threshold 4; the victim masks with 3 others only
    ids = _ids(fed)
    victim, left_out = ids[0], set(ids[1:3])

    class Selective(SecureAggregation):
        def _collect(self, grid, context, state):
            state.forward[victim] = [(src, blob) for src, blob in state.forward[victim] if src not in left_out]
            return super()._collect(grid, context, state)

    _, workflow = fed.run(Selective)
    assert workflow.last_parameters["halted_at"] in (wire.CONSISTENCY, wire.UNMASK)
    assert "forwarded key shares selectively" in refusals(fed, ids[3])
    assert not honest_reveals(fed, set(ids)), "a share left an honest node"


def test_a_victims_short_neighbour_set_is_refused_before_it_trains(tmp_path):
    fed = Federation(tmp_path, 5, colluders=2)  # at least 4 survivors: the victim must mask with 3 others
    ids = _ids(fed)
    victim = ids[0]

    class Short(SecureAggregation):
        def _collect(self, grid, context, state):
            state.forward[victim] = state.forward[victim][:2]  # only the two colluders' shares
            return super()._collect(grid, context, state)

    fed.run(Short)
    assert "it masks only with at least 3 others" in refusals(fed, victim)
    assert fed.nodes[victim].trained == 0


def test_convenient_dropouts_cannot_leave_a_sum_of_the_victim_and_its_colluders(tmp_path):
    fed = Federation(tmp_path, 5, colluders=2)
    ids = _ids(fed)
    victim, colluders, honest = ids[0], ids[1:3], ids[3:]

    class Convenient(SecureAggregation):
        def _consistency(self, grid, context, state):
            state.active = [n for n in state.active if n not in honest]  # "they dropped out"
            return super()._consistency(grid, context, state)

    _, workflow = fed.run(Convenient)
    assert workflow.last_parameters["halted_at"] in (wire.CONSISTENCY, wire.UNMASK)
    assert "only 3 masked updates would be summed; this node needs at least 4" in refusals(fed, victim)
    assert not honest_reveals(fed, {victim, *honest})
    assert colluders  # (the colluders' own consent is not needed to refuse)


def test_different_survivor_lists_for_different_nodes_never_release_both_secrets_of_one_node(tmp_path):
    fed = Federation(tmp_path, 5, colluders=1)  # threshold 4
    ids = _ids(fed)
    victim, colluder = ids[0], ids[4]
    colluder_key = load_identity_key(tmp_path / fed.nodes[colluder].name / "identity-key.pem")
    group_a, group_b = {ids[1], ids[2]}, {ids[3]}

    class Equivocate(SecureAggregation):
        """Shows group A all five as survivors (to collect the victim's self-mask shares) and group B a list
        where the victim dropped out (to collect its mask key shares); the colluder signs both."""

        def _consistency(self, grid, context, state):
            u3 = list(state.active)
            without = [n for n in u3 if n != victim]
            for lists, group in ((u3, group_a), (without, group_b)):
                records = {n: {wire.SURVIVORS: lists, wire.STATEMENTS: [state.views[m][0] for m in lists],
                               wire.SIGNATURES: [state.views[m][1] for m in lists]} for n in group}
                self.equivocated = getattr(self, "equivocated", {})
                for node, record in self._exchange(grid, state, wire.CONSISTENCY, records).items():
                    self.equivocated.setdefault(tuple(lists), {})[node] = record[wire.SIGNATURE]
                state.active = u3
            view = json.loads(state.views[ids[1]][0])["view"]
            for lists in (u3, without):  # the colluder signs anything
                blob = wire.statement("consistency", self.roster.sha256, json.loads(state.views[ids[1]][0])["run"],
                                      state.rnd, view=view, survivors=sorted(lists))
                self.equivocated.setdefault(tuple(lists), {})[colluder] = bytes.fromhex(sign(colluder_key, blob))
            for lists in (u3, without):
                signed = self.equivocated[tuple(lists)]
                records = {n: {wire.SIGNERS: list(signed), wire.SIGNATURES: list(signed.values())}
                           for n in signed if n != colluder}
                self._exchange(grid, state, wire.UNMASK, records)
            return False

    fed.run(Equivocate)
    revealed = honest_reveals(fed, set(ids) - {colluder})
    colluder_has = 1  # the colluder holds one share of each secret
    threshold = threshold_for(5, 1)
    both = [revealed.get((victim, wire.SELF), 0) + colluder_has >= threshold,
            revealed.get((victim, wire.PAIR), 0) + colluder_has >= threshold]
    assert not all(both), "both the victim's self-mask seed and its mask key could be rebuilt"
    assert any("survivor(s) signed the same survivor list as this node" in refusals(fed, n) for n in ids[1:4])


def test_a_replayed_statement_from_another_round_is_refused(tmp_path):
    fed = Federation(tmp_path, 3, colluders=0)
    first: dict = {}

    class Record(SecureAggregation):
        def _share_keys(self, grid, context, state):
            first.update(state.ads)
            return super()._share_keys(grid, context, state)

    fed.run(Record, rnd=1)
    victim = _ids(fed)[0]

    class Replay(SecureAggregation):
        def _share_keys(self, grid, context, state):
            other = _ids(fed)[1]
            state.ads[other] = first[other]  # last round's advertisement, validly signed
            return super()._share_keys(grid, context, state)

    fed.run(Replay, rnd=2)
    assert "made for another roster, run or round (a replay)" in refusals(fed, victim)


def test_a_tampered_key_share_is_refused(tmp_path):
    fed = Federation(tmp_path, 3, colluders=0)
    victim = _ids(fed)[0]

    class Tamper(SecureAggregation):
        def _collect(self, grid, context, state):
            src, blob = state.forward[victim][0]
            state.forward[victim][0] = (src, blob[:-1] + bytes([blob[-1] ^ 1]))
            return super()._collect(grid, context, state)

    fed.run(Tamper)
    assert "does not open under that node's channel key" in refusals(fed, victim)
    assert fed.nodes[victim].trained == 0


def test_a_stage_out_of_order_is_refused(tmp_path):
    fed = Federation(tmp_path, 3, colluders=0)
    victim = _ids(fed)[0]

    class Skip(SecureAggregation):
        def _share_keys(self, grid, context, state):
            self._exchange(grid, state, wire.UNMASK, {victim: {wire.SIGNERS: [], wire.SIGNATURES: []}})
            return False

    fed.run(Skip)
    assert "stage 'unmask' arrived when this node expected 'share-keys'" in refusals(fed, victim)


def test_what_reaches_the_coordinator_is_masked_and_unrelated_to_the_update(tmp_path):
    fed = Federation(tmp_path, 3, colluders=0)
    for node in fed.nodes.values():  # a larger update, for the statistics
        node.update = [np.random.default_rng(node.node_id).uniform(-0.3, 0.3, (64, 64)), np.zeros(10)]
    import tests.support.secagg_federation as support

    support_shapes = support.SHAPES
    support.SHAPES = [(64, 64), (10,)]
    try:
        fed.run()
    finally:
        support.SHAPES = support_shapes
    masked = [np.frombuffer(r.content.config_records[wire.RECORD][wire.MASKED], "<u4").astype(np.float64)
              for r in fed.grid.received if wire.MASKED in r.content.config_records.get(wire.RECORD, ConfigRecord())]
    assert len(masked) == 3
    for vec, node in zip(masked, fed.nodes.values()):
        assert all(len(arr.data) == 0 for r in fed.grid.received for a in r.content.array_records.values()
                   for arr in a.values())  # no array of any update in plaintext
        assert abs(vec.mean() / 2**32 - 0.5) < 0.02
        flat = node.update[0].ravel()
        assert abs(np.corrcoef(vec[1:flat.size + 1], flat)[0, 1]) < 5 / np.sqrt(flat.size)
    for reply in fed.grid.received:  # no node's count in plaintext either
        metrics = reply.content.metric_records.get("fitres.num_examples")
        assert metrics is None or metrics["num_examples"] == 0


def test_a_training_instruction_other_than_the_advertised_one_is_refused(tmp_path):
    fed = Federation(tmp_path, 3, colluders=0)
    victim = _ids(fed)[0]

    class Switch(SecureAggregation):
        def _collect(self, grid, context, state):
            state.fitins[victim].config_records["fitins.config"]["dp"] = False  # after the parameters were fixed
            return super()._collect(grid, context, state)

    fed.run(Switch)
    assert "the training instruction's config differs" in refusals(fed, victim)
    assert fed.nodes[victim].trained == 0


def test_no_product_module_runs_flowers_secagg():
    """Flower's stock SecAgg+ stays in tests and bench: the apps and shared/ never import it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stock = ("secaggplus", "SecAggPlus", "pseudo_rand_gen", "secure_aggregation.crypto")
    for package in ("client", "server", "shared", "serving", "fedchat"):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [getattr(node, "module", "") or ""] + [a.name for a in node.names]
                    assert not any(s in name for s in stock for name in names), f"{path} imports {names}"
