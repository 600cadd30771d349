"""Certificates and keys for a real deployment: TLS for the SuperLink, identity keys for nodes.

Three kinds of material, each in the format Flower 1.41 reads:

* a **CA** (``ca.pem``, ``ca.key``): self-signed, ECDSA P-384. Nodes and the ``flwr`` CLI
  trust it (``--root-certificates``, ``root-certificates`` in Flower's config.toml); its key
  stays with whoever issues certificates (the coordinator's operator).
* the **SuperLink's TLS certificate** (``superlink.pem``, ``superlink.key``), signed by the
  CA, with every host name and IP address the SuperLink is reached at as a subjectAltName.
  ``flower-superlink --ssl-certfile superlink.pem --ssl-keyfile superlink.key
  --ssl-ca-certfile ca.pem`` serves its Fleet, Control and Runtime APIs with it.
* a **node key pair** per SuperNode (``nodes/NAME``, ``nodes/NAME.pub``): ECDSA on a NIST
  curve (P-384 here), the private key in OpenSSH format (``flower-supernode
  --auth-supernode-private-key``), the public key as an OpenSSH line (``flwr supernode
  register NAME.pub``). With ``--enable-supernode-auth`` the SuperLink accepts only nodes whose
  public key was registered, and every Fleet request is signed with the private key.

(A node's privacy-ledger key is a separate Ed25519 key, see ``shared/crypto.py``.)
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError
from shared.files import atomic_write_bytes

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.pem", "superlink.key"
NODES_DIR = "nodes"
_CURVE = ec.SECP384R1


class CertError(ConfigError):
    """Certificates or keys are missing, malformed or do not match each other."""


# ------------------------------------------------------------------ generation

def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedchat"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_ca(common_name: str = "fedchat CA", days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed certificate authority that may sign server certificates only."""
    key = ec.generate_private_key(_CURVE())
    name = _name(common_name)
    start = _now() - _dt.timedelta(minutes=5)  # tolerate small clock skew between hosts
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host) or ":" in host or "/" in host:
        raise CertError(f"'{host}' is neither an IP address nor a host name: give names like "
                        "'coordinator.example.org' or addresses like '10.0.0.5' (no port, no scheme).")
    return x509.DNSName(host)


def new_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str] | tuple[str, ...],
                    days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate, valid for every host name and IP address in `hosts`."""
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise CertError("the SuperLink certificate needs at least one host name or IP address (--hosts).")
    key = ec.generate_private_key(_CURVE())
    start = _now() - _dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def new_node_key() -> ec.EllipticCurvePrivateKey:
    """A SuperNode's identity key (ECDSA P-384, a NIST curve as Flower requires)."""
    return ec.generate_private_key(_CURVE())


def node_private_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def node_public_openssh(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey, comment: str = "") -> bytes:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (f" {comment}".encode() if comment else b"") + b"\n"


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# ------------------------------------------------------------------ loading and checks

def load_cert(path: str | Path) -> x509.Certificate:
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise CertError(f"cannot read certificate {path}: {exc.strerror}. Create it with `fedchat certs`.") from None
    except ValueError:
        raise CertError(f"{path} is not a PEM certificate. Create one with `fedchat certs`.") from None


def load_pem_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise CertError(f"cannot read key {path}: {exc.strerror}. Create it with `fedchat certs`.") from None
    except (ValueError, TypeError):
        raise CertError(f"{path} is not an unencrypted PEM private key. Create one with `fedchat certs`.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path} is not an EC private key; `fedchat certs` makes ECDSA P-384 keys.")
    return key


def load_node_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A SuperNode private key as flower-supernode reads it (OpenSSH, EC on a NIST curve)."""
    path = Path(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise CertError(f"cannot read node key {path}: {exc.strerror}. Create it with "
                        "`fedchat certs --node NAME --no-superlink`.") from None
    except (ValueError, TypeError):
        raise CertError(f"{path} is not an unencrypted OpenSSH private key (flower-supernode needs one). "
                        "Create it with `fedchat certs --node NAME --no-superlink`.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path} is not an ECDSA key: Flower authenticates SuperNodes with NIST-curve ECDSA keys.")
    return key


def cert_hosts(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


def check_server_cert(cert_path: str | Path, key_path: str | Path, ca_path: str | Path,
                      hosts: list[str] | tuple[str, ...] = ()) -> None:
    """The server certificate is signed by the CA, matches its key, is valid now and covers `hosts`."""
    cert, ca, key = load_cert(cert_path), load_cert(ca_path), load_pem_key(key_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise CertError(f"{cert_path} was not issued by {ca_path} ({exc.__class__.__name__}). "
                        "Issue both with the same `fedchat certs --out DIR`.") from None
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CertError(f"{key_path} is not the key of {cert_path}: regenerate them with `fedchat certs --force`.")
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertError(f"{cert_path} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                        f"{cert.not_valid_after_utc:%Y-%m-%d}): regenerate it with `fedchat certs --force`.")
    covered = cert_hosts(cert)
    missing = [h for h in hosts if h not in covered]
    if missing:
        raise CertError(f"{cert_path} does not cover {', '.join(missing)} (it covers "
                        f"{', '.join(sorted(covered)) or 'nothing'}): regenerate it with "
                        f"`fedchat certs --hosts {' '.join(sorted(covered | set(missing)))} --force`.")


# ------------------------------------------------------------------ a certificate folder

@dataclass
class CertSet:
    """The files `fedchat certs` writes in one folder, and what it did to each."""

    root: Path
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def node_key(self, name: str) -> Path:
        return self.root / NODES_DIR / name

    def node_public_key(self, name: str) -> Path:
        return self.root / NODES_DIR / f"{name}.pub"


def check_node_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise CertError(f"node name {name!r} must be letters, digits, '-', '_' or '.' (it names files), "
                        "e.g. 'org-1'.")
    return name


def write_certs(out: str | Path, *, hosts: list[str] | tuple[str, ...] | None = None, nodes: list[str] = (),
                superlink: bool = True, force: bool = False, ca_days: int = 3650, cert_days: int = 825) -> CertSet:
    """Create (or complete) a certificate folder.

    With `superlink`, the CA and the SuperLink certificate for `hosts` (default 127.0.0.1 and
    localhost for a new one); and a key pair per name in `nodes`. Existing files are kept (keys
    are identities: a node registered by its public key must keep it), unless `force`; an
    existing SuperLink certificate that does not cover the `hosts` given is issued again by the
    same CA (nodes trust the CA, so nothing else changes).
    """
    if cert_days < 1 or ca_days < cert_days:
        raise CertError(f"certificate validity must be at least 1 day and within the CA's {ca_days} days "
                        f"(got {cert_days}).")
    certs = CertSet(Path(out))
    names = [check_node_name(n) for n in nodes]
    if len(set(names)) != len(names):
        raise CertError(f"node names must be unique (got {', '.join(names)}).")
    if superlink:
        if force or not certs.ca_cert.exists():
            if certs.ca_key.exists() != certs.ca_cert.exists() and not force:
                raise CertError(f"{certs.root} holds only half of a CA ({CA_CERT}, {CA_KEY}): remove it or use "
                                "--force.")
            ca_key, ca_cert = new_ca()
            atomic_write_bytes(certs.ca_key, _key_pem(ca_key), mode=0o600)
            atomic_write_bytes(certs.ca_cert, _cert_pem(ca_cert))
            certs.written += [certs.ca_cert, certs.ca_key]
            renew_server = True
        else:
            ca_cert, ca_key = load_cert(certs.ca_cert), load_pem_key(certs.ca_key)
            certs.kept += [certs.ca_cert, certs.ca_key]
            renew_server = not certs.server_cert.exists() or (
                hosts is not None and not set(hosts) <= cert_hosts(load_cert(certs.server_cert)))
        if renew_server:
            key, cert = new_server_cert(ca_key, ca_cert, list(hosts or DEFAULT_HOSTS), days=cert_days)
            atomic_write_bytes(certs.server_key, _key_pem(key), mode=0o600)
            atomic_write_bytes(certs.server_cert, _cert_pem(cert))
            certs.written += [certs.server_cert, certs.server_key]
        else:
            check_server_cert(certs.server_cert, certs.server_key, certs.ca_cert, list(hosts or ()))
            certs.kept += [certs.server_cert, certs.server_key]
    for name in names:
        private, public = certs.node_key(name), certs.node_public_key(name)
        if private.exists() and not force:
            key = load_node_key(private)
            if not public.exists():  # the public half can always be derived again
                atomic_write_bytes(public, node_public_openssh(key, name))
            certs.kept += [private, public]
            continue
        key = new_node_key()
        atomic_write_bytes(private, node_private_openssh(key), mode=0o600)
        atomic_write_bytes(public, node_public_openssh(key, name))
        certs.written += [private, public]
    return certs
