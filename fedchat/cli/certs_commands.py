"""`fedchat certs`: the CA, the SuperLink's TLS certificate and the nodes' key pairs."""

from __future__ import annotations

import argparse

from fedchat.federation.certs import DEFAULT_HOSTS, cert_hosts, load_cert, write_certs
from shared.config import org_name
from shared.errors import ConfigError


def cmd_certs(args) -> int:
    names = list(args.node or [])
    if args.nodes is not None:
        if args.nodes < 0:
            raise ConfigError("--nodes must be 0 or more.")
        names += [org_name(i) for i in range(1, args.nodes + 1) if org_name(i) not in names]
    if args.no_superlink and not names:
        raise ConfigError("nothing to do: with --no-superlink give --node NAME (or --nodes N) for node key pairs.")
    certs = write_certs(args.out, hosts=args.hosts, nodes=names, superlink=not args.no_superlink, force=args.force,
                        cert_days=args.days)
    for path in certs.written:
        print(f"wrote {path}")
    for path in certs.kept:
        print(f"kept  {path}")
    if not args.no_superlink:
        print(f"\nSuperLink: flower-superlink --ssl-certfile {certs.server_cert} --ssl-keyfile {certs.server_key} "
              f"--ssl-ca-certfile {certs.ca_cert} --enable-supernode-auth ...")
        hosts = ", ".join(sorted(cert_hosts(load_cert(certs.server_cert))))
        print(f"           valid for: {hosts}. Give {certs.ca_cert} (never {certs.ca_key}) to every node and to "
              "whoever runs `flwr`.")
    for name in names:
        print(f"node {name}: flwr supernode register {certs.node_public_key(name)} ...   (on the coordinator)")
        print(f"{' ' * (len(name) + 6)}flower-supernode --auth-supernode-private-key {certs.node_key(name)} ...   "
              "(on the node; the private key never leaves it)")
    return 0


def add_certs_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs", help="create a CA, the SuperLink's TLS certificate and a key pair per node",
        description="Create a certificate folder for a Flower deployment: a CA (ca.pem, ca.key), the SuperLink's "
                    "TLS certificate for the host names and addresses given (superlink.pem, superlink.key), and an "
                    "ECDSA P-384 key pair per node (nodes/NAME in OpenSSH format for flower-supernode, nodes/NAME.pub "
                    "for `flwr supernode register`). Existing files are kept (a node is registered by its public "
                    "key), unless --force.")
    p.add_argument("--out", required=True, help="the certificate folder")
    p.add_argument("--hosts", nargs="+", metavar="HOST",
                   help="host names and IP addresses the SuperLink is reached at (default for a new certificate: "
                        f"{' '.join(DEFAULT_HOSTS)}); a certificate that does not cover them is issued again")
    p.add_argument("--nodes", type=int, help="key pairs for nodes org-1 .. org-N")
    p.add_argument("--node", action="append", metavar="NAME", help="a key pair for node NAME (repeatable)")
    p.add_argument("--no-superlink", action="store_true",
                   help="node key pairs only (on a node's own host): no CA, no SuperLink certificate")
    p.add_argument("--days", type=int, default=825, help="validity of the SuperLink certificate in days")
    p.add_argument("--force", action="store_true", help="replace existing files (registered nodes must register again)")
    p.set_defaults(func=cmd_certs)
