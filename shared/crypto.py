"""Keys and signatures: Ed25519 for privacy ledgers (certificates come with deployment)."""

from __future__ import annotations

import fcntl
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import LedgerError
from shared.files import atomic_write_bytes


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise LedgerError(f"cannot read the ledger signing key {path}: {exc}. "
                          "Give an unencrypted Ed25519 private key in PEM (`fedchat certs` makes one).") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{path} is not an Ed25519 private key: ledgers are signed with Ed25519.")
    return key


def load_or_create_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The node's ledger key; created (0600, with its .pub beside it) on first use."""
    path = Path(path)
    if path.exists():
        return load_signing_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return load_signing_key(path)
        key = new_signing_key()
        atomic_write_bytes(path.with_suffix(".pub"), public_pem(key))
        atomic_write_bytes(path, private_pem(key), mode=0o600)
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"cannot read public key {path}: {exc.strerror}.") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:  # a private key also tells its public key
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise LedgerError(f"{path} is not a PEM public key: give the node's ledger-key.pub.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{path} is not an Ed25519 public key.")
    return key


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """SHA-256 (hex) of the raw 32 bytes of an Ed25519 public key: how a ledger key is named in reports."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    return key.sign(data).hex()


def verify(key: Ed25519PublicKey, data: bytes, signature_hex: str) -> bool:
    try:
        key.verify(bytes.fromhex(signature_hex), data)
        return True
    except (InvalidSignature, ValueError):
        return False
