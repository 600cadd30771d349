"""The arithmetic of fedchat's secure sum: key agreement, mask streams, secret sharing, quantisation.

Everything here is a pure function of its arguments; the protocol (who sends what, who checks
what) is in client/secagg_mod.py and server/secagg_workflow.py, the rules for its parameters in
shared/secagg_rules.py.

* **Masks** are uniform over Z_2^32 and expanded from every bit of a 256-bit secret: HKDF-SHA256
  with a label naming the run, round and pair turns the secret into a ChaCha20 key, whose
  keystream, read as little-endian uint32, is the mask. (Flower's SecAgg+ folds its secret into a
  32-bit seed for NumPy's Mersenne Twister and draws ``randint(0, range - 1)``: 2^32 candidate
  masks, and never the top value.)
* **Key agreement** is X25519; a node has two key pairs per round: one for the encrypted channel
  that carries key shares to each peer, one whose shared secrets seed the pairwise masks.
* **Secret sharing** is Shamir's over the prime field 2^521 - 1 (a 256-bit secret fits with room):
  any ``threshold`` shares give the secret, fewer give nothing.
* **Share transport**: ChaCha20-Poly1305 under a key derived from the channel key agreement and a
  label naming sender and receiver (each direction its own key), with the round as associated data.
"""

from __future__ import annotations

import hashlib
import os
import secrets

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MODULUS_BITS = 32
PRIME = 2**521 - 1  # a Mersenne prime: Shamir's field, larger than any 256-bit secret
SECRET_BYTES = 32
SHARE_BYTES = 66  # an element of the field, big-endian


# ------------------------------------------------------------------ keys


def new_key_pair() -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte X25519 keys."""
    key = X25519PrivateKey.generate()
    return (key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption()),
            key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def agree(private: bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret of a private key and a peer's public key (raw bytes); ValueError when
    the peer's key is malformed or of low order."""
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedchat-secagg/1:" + label).derive(secret)


# ------------------------------------------------------------------ masks


def mask_stream(secret: bytes, label: bytes, count: int) -> np.ndarray:
    """`count` uniform uint32 values from the 256-bit `secret` (HKDF-SHA256, then ChaCha20's keystream).

    The key is unique to (secret, label), so a zero nonce is safe: no key encrypts twice."""
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"a mask secret has {SECRET_BYTES} bytes or more, got {len(secret)}")
    key = _derive(secret, b"mask:" + label)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    mask = np.empty(count, dtype="<u4")
    # The keystream is the encryption of zeros, written straight into the array: no zeroed input and output
    # copies of 4 * count bytes (np.zeros maps zero pages lazily), six times faster at 40M values.
    stream.update_into(np.zeros(4 * count, dtype=np.uint8), memoryview(mask).cast("B"))
    return mask


def pair_label(context: bytes, a: int, b: int) -> bytes:
    """The label of the pairwise mask between nodes a and b in a round (the same for both)."""
    low, high = sorted((a, b))
    return context + f":pair:{low}:{high}".encode()


def self_label(context: bytes, node: int) -> bytes:
    return context + f":self:{node}".encode()


def pair_sign(own: int, peer: int) -> int:
    """+1 when `own` adds the pairwise mask, -1 when it subtracts it: the two cancel in the sum."""
    return 1 if own < peer else -1


def commit(secret: bytes, label: bytes) -> str:
    """A hash commitment to a (high-entropy) secret, to check its reconstruction."""
    return hashlib.sha256(b"fedchat-secagg/1:commit:" + label + b":" + secret).hexdigest()


# ------------------------------------------------------------------ Shamir


def split_secret(secret: bytes, xs: list[int], threshold: int) -> dict[int, bytes]:
    """Shamir shares of `secret` at the points `xs` (distinct, 1 <= x < PRIME): any `threshold` of them
    rebuild it. The polynomial's coefficients come from the OS's CSPRNG."""
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or min(xs) < 1:
        raise ValueError(f"cannot share among {len(xs)} distinct points with threshold {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]

    def value(x: int) -> int:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        return y

    return {x: value(x).to_bytes(SHARE_BYTES, "big") for x in xs}


def combine_shares(shares: dict[int, bytes], length: int = SECRET_BYTES) -> bytes:
    """The secret at x = 0 of the polynomial through the given shares (Lagrange interpolation)."""
    points = [(x, int.from_bytes(y, "big")) for x, y in shares.items()]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 256**length:
        raise ValueError("the shares do not rebuild a secret of this size (a share is wrong)")
    return secret.to_bytes(length, "big")


# ------------------------------------------------------------------ share transport


def seal(channel_secret: bytes, label: bytes, plaintext: bytes) -> bytes:
    key = _derive(channel_secret, b"share:" + label)
    return ChaCha20Poly1305(key).encrypt(bytes(12), plaintext, label)


def open_sealed(channel_secret: bytes, label: bytes, ciphertext: bytes) -> bytes | None:
    """The plaintext, or None when the ciphertext was not sealed under this channel and label."""
    key = _derive(channel_secret, b"share:" + label)
    try:
        return ChaCha20Poly1305(key).decrypt(bytes(12), ciphertext, label)
    except (InvalidTag, ValueError):
        return None


def random_secret() -> bytes:
    return os.urandom(SECRET_BYTES)


# ------------------------------------------------------------------ quantisation


def quantise(values: np.ndarray, clip: float, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Values in [-clip, clip] (clipped first) to integers in [0, levels - 1] as uint32, rounded at random
    so that the expectation is exact: E[dequantise] = the clipped value."""
    scaled = (np.clip(np.asarray(values, dtype=np.float64), -clip, clip) + clip) * ((levels - 1) / (2 * clip))
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)
    return np.minimum(low + up, levels - 1).astype(np.uint32)


def dequantise_sum(total: np.ndarray, count: int, clip: float, levels: int) -> np.ndarray:
    """The sum of `count` values from the sum of their quantised integers (no wrap: see the rules)."""
    return total.astype(np.float64) * (2 * clip / (levels - 1)) - count * clip
