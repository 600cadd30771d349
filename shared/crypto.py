"""Keys and signatures: Ed25519 for privacy ledgers and for roster identities (certificates come with deployment)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import LedgerError, RosterError
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


# ------------------------------------------------------------------ roster identity keys


def raw_public_hex(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Hex of the raw 32 bytes of an Ed25519 public key: how the roster lists a member's identity key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_identity_key(path: str | Path) -> Ed25519PrivateKey:
    """A node's roster identity key. Never created here: the roster must list it before it is any use,
    so a missing key is the operator's step to take, not something to paper over."""
    path = Path(path)
    make = f"make one with `fedchat roster key --out {path}` and send its public key to the roster keeper"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RosterError(f"no identity key at {path}: {make}.") from None
    except OSError as exc:
        raise RosterError(f"cannot read the identity key {path}: {exc.strerror}. Let the node's user read it "
                          "(mode 0600, owned by that user).") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise RosterError(f"{path} is not an unencrypted PEM private key ({exc}): {make}.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RosterError(f"{path} is not an Ed25519 private key: roster identities are Ed25519; {make}.")
    return key


def create_identity_key(path: str | Path) -> Ed25519PrivateKey:
    """A new identity key at `path` (0600), its public key in PEM beside it (identity-key.pub). Never replaces
    a key: the roster lists the old one, and a lost identity key is a rotation (`fedchat roster rotate`)."""
    path = Path(path)
    if path.suffix == ".pub":
        raise RosterError(f"{path}: give the private key's path (e.g. identity-key.pem); its .pub goes beside it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_signing_key()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem(key))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # unlike a rename, fails if the path exists: no key is ever overwritten
    except FileExistsError:
        raise RosterError(f"{path} exists: refusing to overwrite an identity key (the roster may list it). Use "
                          "it, or write a new key to another path and ask the roster keeper to rotate your "
                          "key (`fedchat roster rotate`).") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_bytes(path.with_suffix(".pub"), public_pem(key))
    return key
