"""What crosses the wire in fedchat's secure sum: stages, record keys and the signed statements.

Every protocol message is a Flower TRAIN message whose content holds a ConfigRecord under
``RECORD``; the collect stage also carries the round's fit instruction (the global adapter and
the fit config), and its reply the node's fit result without its update.

A node signs, with the Ed25519 identity key listed for it in the roster, three statements; each
is canonical JSON naming its kind, the roster's hash, the run and the round, so a signature
cannot be replayed in another round, run, federation or kind of statement:

* **advertisement** (setup): its Flower node id, roster member name, both X25519 public keys, a
  commitment to its self-mask seed, the parameter set it derived;
* **view** (with its masked update): the sorted list of nodes whose key shares it received and
  whose pairwise masks it added, itself included (U2);
* **consistency** (before unmasking): the sorted U2 and the sorted list of nodes whose masked
  updates the coordinator says it summed (U3).

The masked update travels as one flat little-endian uint32 vector: the node's weight, then every
exchanged tensor in order, each reduced modulo 2^32 (the sum of such vectors wraps modulo 2^32,
the protocol's own arithmetic).
"""

from __future__ import annotations

import json

import numpy as np

RECORD = "fedchat.secagg"
PROTOCOL = "fedchat-secagg/1"

# Stages, in order.
ADVERTISE, SHARE_KEYS, COLLECT, CONSISTENCY, UNMASK = "advertise", "share-keys", "collect", "consistency", "unmask"
STAGES = (ADVERTISE, SHARE_KEYS, COLLECT, CONSISTENCY, UNMASK)

# Keys of the ConfigRecord.
STAGE = "stage"
PARAMETERS = "parameters"  # bytes: canonical JSON of the SumParameters (advertise)
RUN_CONFIG = "run-config"  # bytes: canonical JSON of the fit config (advertise)
SAMPLE = "sample"  # list[int]: the sampled node ids (advertise)
STATEMENTS = "statements"  # list[bytes]: signed statements forwarded (share-keys, consistency)
SIGNATURES = "signatures"  # list[bytes]: their signatures, in the same order
STATEMENT = "statement"  # bytes: the node's own signed statement (replies)
SIGNATURE = "signature"  # bytes
DESTINATIONS = "destinations"  # list[int]: who each sealed share is for (share-keys reply)
SOURCES = "sources"  # list[int]: who each sealed share is from (collect)
SEALED = "sealed"  # list[bytes]: sealed key shares
MASKED = "masked"  # bytes: the masked update (collect reply)
SURVIVORS = "survivors"  # list[int]: U3 (consistency)
SIGNERS = "signers"  # list[int]: node ids of the consistency signatures (unmask)
OWNERS = "owners"  # list[int]: whose secret each revealed share is (unmask reply)
KINDS = "kinds"  # list[str]: "self" (the self-mask seed of a survivor) or "pair" (the mask key of a dropped node)
SHARES = "shares"  # list[bytes]

SELF, PAIR = "self", "pair"


def canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def statement(kind: str, roster: str, run: str, rnd: int, **fields) -> bytes:
    return canonical({"protocol": PROTOCOL, "kind": kind, "roster": roster, "run": run, "round": rnd, **fields})


def parse_statement(blob: bytes, kind: str) -> dict:
    """The fields of a signed statement of this kind; ValueError when it is not one."""
    payload = json.loads(blob)
    if not isinstance(payload, dict) or payload.get("protocol") != PROTOCOL or payload.get("kind") != kind:
        raise ValueError(f"not a {PROTOCOL} {kind} statement")
    if canonical(payload) != bytes(blob):
        raise ValueError(f"the {kind} statement is not in canonical form")
    return payload


def context(roster: str, run: str, rnd: int) -> bytes:
    """The round's label in every derived key and mask."""
    return f"{PROTOCOL}:{roster}:{run}:{rnd}".encode()


def vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<u4").tobytes()


def vector_from(blob: bytes, length: int) -> np.ndarray:
    """The uint32 vector of a masked update; ValueError when it is not `length` values."""
    if not isinstance(blob, bytes) or len(blob) != 4 * length:
        raise ValueError(f"a masked update must be {length} uint32 values ({4 * length} bytes)")
    return np.frombuffer(blob, dtype="<u4")
