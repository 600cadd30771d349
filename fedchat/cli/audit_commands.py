"""`fedchat audit`, `fedchat canary make` and `fedchat audit empirical`: what an auditor runs (fedchat/audit/).

`fedchat audit LEDGER...` verifies ledgers; `fedchat audit empirical ...` is the one-run lower bound on
epsilon from canaries, registered as the hidden subcommand `audit-empirical` (`empirical_argv` rewrites
the two words into it before parsing).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from shared.errors import ConfigError, DataError, FedchatError, LedgerError

EMPIRICAL = "audit-empirical"


def empirical_argv(argv: list[str]) -> list[str]:
    """['-v', 'audit', 'empirical', ...] -> ['-v', 'audit-empirical', ...]; any other argv unchanged."""
    i = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if i is not None and argv[i:i + 2] == ["audit", "empirical"]:
        return argv[:i] + [EMPIRICAL] + argv[i + 2:]
    return argv


# ----------------------------------------------------------------- fedchat audit


def _audit_keys(args) -> dict:
    """The public key for each ledger: --key LEDGER=PUB first, else --keys DIR/NODE.pub; never a default."""
    if not args.key and not args.keys:
        raise FedchatError("give each node's public ledger key: --keys DIR (DIR/NODE.pub for NODE.jsonl) or "
                           "--key LEDGER=PUB per ledger, each obtained from the node's operator by another channel "
                           "than the ledger. A key found beside a ledger proves nothing: whoever could edit the "
                           "ledger could replace the key.")
    ledgers = [Path(p) for p in args.ledgers]
    keys: dict = {}
    for pair in args.key or []:
        name, sep, pub = pair.partition("=")
        if not sep and len(ledgers) == 1 == len(args.key):  # one ledger, one key: nothing to pair
            name, sep, pub = str(ledgers[0]), "=", pair
        if not sep or not name or not pub:
            raise FedchatError(f"--key {pair!r}: give LEDGER=PUB, e.g. --key ledgers/org-1.jsonl=keys/org-1.pub "
                               "(a bare key only when auditing one ledger)")
        hits = [p for p in ledgers if p.resolve() == Path(name).resolve() or p.stem == name]
        if not hits:
            raise FedchatError(f"--key {pair!r} names {name}, which is none of the ledgers given")
        for p in hits:
            keys[p] = Path(pub)
    for p in ledgers:
        if p not in keys:
            if not args.keys:
                raise FedchatError(f"no key for {p}: add --key {p}=PUB or --keys DIR holding {p.stem}.pub")
            keys[p] = Path(args.keys) / f"{p.stem}.pub"
        if keys[p].resolve().parent == p.resolve().parent:
            print(f"warning: the key for {p} lies in the ledger's own folder: it proves the ledger only if the node's "
                  "operator gave it to you by another channel", file=sys.stderr)
    return keys


def cmd_audit(args) -> int:
    from fedchat.audit.ledger_audit import audit_ledger, check_against_report, check_forks, plot_epsilon

    keys = _audit_keys(args)
    audits = [audit_ledger(path, key) for path, key in keys.items()]
    check_forks(audits)  # two ledgers of one key that diverge: one budget spent twice
    checked = audits + ([check_against_report(audits, args.report)] if args.report else [])
    if args.plot:
        plot_epsilon(audits, args.plot)
    no_report = ("note: no --report given: entries removed at the END of a ledger cannot be detected without the "
                 "coordinator's report.json (the hash chain shows only changes before the last line), and the "
                 "ledgers are not bound to the nodes that trained.")
    if args.json:
        print(json.dumps([a.to_dict() for a in checked], indent=2))
    else:
        fmt = "{:<14} {:>8} {:<12} {:>6} {:>16} {:>19} {:>8}  {}"
        print(fmt.format("node", "node id", "ledger key", "rounds", "epsilon claimed", "epsilon recomputed",
                         "budget", "verdict"))
        num = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        for a in checked:
            print(fmt.format(a.node, ",".join(map(str, a.node_ids)) or "-", (a.key_fingerprint or "-")[:12], a.rounds,
                             num(a.epsilon_claimed), num(a.epsilon_recomputed),
                             "-" if a.target_epsilon is None else f"{a.target_epsilon:g}", "OK" if a.ok else "FAIL"))
        if args.plot:
            print(f"plot: {args.plot}")
    if not args.report:
        print(no_report, file=sys.stderr if args.json else sys.stdout)
    for a in checked:
        for problem in a.problems:
            print(f"{a.ledger}: {problem}", file=sys.stderr)
        for warning in a.warnings:
            print(f"{a.ledger}: warning: {warning}", file=sys.stderr)
    return 0 if all(a.ok for a in checked) else 1


def add_audit_command(sub) -> None:
    audit = sub.add_parser("audit", help="verify privacy ledgers: chain, signatures, recomputed epsilon, budget")
    audit.add_argument("ledgers", nargs="+", metavar="LEDGER", help="a node's ledger.jsonl")
    audit.add_argument("--key", action="append", metavar="LEDGER=PUB",
                       help="a ledger's node public key (Ed25519 PEM), from its operator; repeat per ledger "
                       "(a bare PUB when auditing one ledger)")
    audit.add_argument("--keys", metavar="DIR", help="folder of NODE.pub keys for NODE.jsonl ledgers, from the "
                       "operators (one of --key/--keys is required: no key is taken from beside a ledger)")
    audit.add_argument("--report", help="the coordinator's report.json: bind ledgers to the nodes that trained (by "
                       "ledger-key fingerprint) and check no entry was removed at the end")
    audit.add_argument("--json", action="store_true", help="print the audit as JSON")
    audit.add_argument("--plot", help="write a PNG of epsilon per round per node")
    audit.set_defaults(func=cmd_audit)


# ----------------------------------------------------------------- fedchat canary make


def cmd_canary_make(args) -> int:
    from fedchat.audit.canary import make_canaries, mixed_in, secret_vocabulary, write_secret
    from shared.dialogue import read_dialogues, write_dialogues
    from shared.model import load_tokenizer, resolve_base_model

    secret, out = Path(args.secret), Path(args.out)
    for path, what in ((secret, "--secret"), (out, "--out")):
        if path.exists() and not args.force:
            raise ConfigError(f"{path} exists: {what} would overwrite it (a secret file lost or replaced after "
                              "training makes the audit impossible). Choose another path, or --force.")
    if secret.resolve() == out.resolve():
        raise ConfigError("--secret and --out are the same file: the secret stays with the auditor, --out goes "
                          "to the node.")
    template = None
    if args.template:
        try:
            template = json.loads(Path(args.template).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the template {args.template}: {exc}. Give a JSON file "
                            '{"messages": [...]} with {secret} in an assistant message.') from None
    node = read_dialogues(args.data).conversations if args.data else []
    vocabulary = secret_vocabulary(load_tokenizer(resolve_base_model(args.base_model)))
    canaries = make_canaries(args.m, vocabulary, seed=args.seed, template=template, secret_words=args.secret_words,
                             k_plus=args.k_plus, k_minus=args.k_minus)
    write_dialogues(out, mixed_in(node, canaries, seed=args.seed))
    write_secret(secret, canaries)
    inc = int(canaries.included.sum())
    print(f"{out}: {inc} of {args.m} canaries (each by a secret fair coin)"
          + (f" mixed into the {len(node)} conversations of {args.data}" if args.data else "")
          + ": the node trains on this file")
    print(f"{secret}: every canary and its coin, guesses fixed at k+ {canaries.k_plus}, k- {canaries.k_minus}: "
          "the auditor keeps it; never give it to the node or the coordinator")
    if args.seed is not None:
        print("warning: --seed makes the coins reproducible: anyone who knows it knows them (tests and benches "
              "only)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------- fedchat audit empirical


def _claim(args) -> tuple[float | None, float, str]:
    """(claimed epsilon or None, delta, where they come from): from a verified ledger, or as given."""
    if args.ledger:
        from fedchat.audit.ledger_audit import audit_ledger
        from shared import ledger

        if args.epsilon is not None or args.delta is not None:
            raise ConfigError("give either --ledger (and --key) or --epsilon/--delta, not both: the ledger says "
                              "both.")
        if not args.key:
            raise ConfigError("--ledger needs --key: the node's public ledger key (NODE.pub), obtained from the "
                              "node operator by a channel where it cannot be swapped.")
        audit = audit_ledger(args.ledger, args.key)
        if not audit.ok:
            raise LedgerError(f"{args.ledger} does not verify ({'; '.join(audit.problems)}): its claim cannot be "
                              f"tested. Run `fedchat audit {args.ledger} --key {args.key}` and settle that first.")
        claimed = audit.epsilon_claimed
        delta = float(ledger.read_entries(args.ledger)[-1]["delta"])
        claimed = claimed if claimed is not None and math.isfinite(claimed) else None
        return claimed, delta, f"ledger {args.ledger} ({audit.node}, {audit.rounds} rounds, verified)"
    if args.key:
        raise ConfigError("--key is only for --ledger: give the node's ledger too.")
    delta = 1e-5 if args.delta is None else args.delta
    if not 0 <= delta < 1:
        raise ConfigError(f"--delta must be in [0, 1), e.g. 1e-5 (got {delta}).")
    if args.epsilon is not None and not args.epsilon >= 0:
        raise ConfigError(f"--epsilon must be >= 0 (got {args.epsilon}).")
    return args.epsilon, delta, "--epsilon" if args.epsilon is not None else "none given"


def _losses(args, canaries) -> tuple:
    """(base losses, trained losses) on every canary's secret."""
    import torch

    from fedchat.audit.canary import secret_losses
    from shared.adapter import load_adapter
    from shared.model import load_model, load_tokenizer, resolve_base_model, select_device

    if bool(args.model) == bool(args.adapter):
        raise ConfigError("give the trained model as --model DIR (a merged folder) or --adapter DIR (an adapter "
                          "of --base-model), one of the two.")
    device = select_device(args.device)
    base_dir = resolve_base_model(args.base_model)
    tokenizer = load_tokenizer(base_dir)
    base = load_model(base_dir, device, torch.float32)
    base_losses = secret_losses(base, tokenizer, canaries)
    if args.adapter:  # not merged: exact whatever modules the adapter wraps (even a tied lm_head)
        trained = load_adapter(base, Path(args.adapter))
    else:
        vocab = base.config.vocab_size
        del base
        trained = load_model(resolve_base_model(args.model), device, torch.float32)
        if trained.config.vocab_size != vocab:
            raise ConfigError(f"{args.model} has another vocabulary than --base-model {args.base_model}: give the "
                              "base model it was trained from.")
    return base_losses, secret_losses(trained, tokenizer, canaries)


def cmd_audit_empirical(args) -> int:
    from fedchat.audit.canary import read_secret
    from fedchat.audit.one_run import audit_report, plot_scores

    canaries = read_secret(args.secret)
    k_plus = canaries.k_plus if args.k_plus is None else args.k_plus
    k_minus = canaries.k_minus if args.k_minus is None else args.k_minus
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence must be in (0, 1), e.g. 0.95 (got {args.confidence}).")
    claimed, delta, source = _claim(args)
    base_losses, trained_losses = _losses(args, canaries.canaries)
    report = audit_report(base_losses, trained_losses, canaries.included, k_plus=k_plus, k_minus=k_minus,
                          delta=delta, epsilon_claimed=claimed, confidence=args.confidence)
    report["claim_source"] = source
    report["canary_ids"] = [c.id for c in canaries.canaries]
    report["included_per_canary"] = canaries.included.tolist()
    if args.plot:
        plot_scores(report["scores"], canaries.included, report["guesses_per_canary"], args.plot,
                    f"{report['correct']} of {report['guesses']} guesses right: epsilon >= "
                    f"{report['epsilon_lower']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    _print(report, args, k_plus != canaries.k_plus or k_minus != canaries.k_minus)
    return 1 if report["verdict"] == "FAIL" else 0


def _print(r: dict, args, k_overridden: bool) -> None:
    pct = f"{r['confidence']:.0%}"
    print(f"canaries          {r['canaries']} ({r['included']} included, {r['canaries'] - r['included']} excluded)")
    print(f"guesses           {r['guesses']}: {r['guessed_included']} 'included' ({r['correct_included']} right), "
          f"{r['guessed_excluded']} 'excluded' ({r['correct_excluded']} right)")
    print(f"correct           {r['correct']} of {r['guesses']}")
    print(f"epsilon lower     {r['epsilon_lower']:.3f} (one-run bound, {pct} confidence, delta {r['delta']:g})")
    claimed = "none (no DP claimed)" if r["epsilon_claimed"] is None else f"{r['epsilon_claimed']:.3f}"
    print(f"epsilon claimed   {claimed} from {r['claim_source']}")
    e = r["exposure"]
    if e:
        print(f"exposure          included secrets against the {e['references']} excluded ones: median "
              f"{e['median']:.2f}, max {e['max']:.2f} of at most {e['max_possible']:.2f} bits")
    print(f"mean score        included {r['score_mean_included']:+.3f}, excluded {r['score_mean_excluded']:+.3f} "
          "(trained minus base loss on the secret; negative = learned)")
    if k_overridden:
        print("note              k+/k- differ from the secret file's: valid only if chosen before seeing any score",
              file=sys.stderr)
    if r["verdict"] == "FAIL":
        print(f"verdict           FAIL: the run leaks more than it claims (lower bound {r['epsilon_lower']:.3f} > "
              f"claimed {r['epsilon_claimed']:.3f}): the DP implementation or its accounting is broken")
    else:
        print("verdict           OK: the lower bound does not exceed the claim (evidence, not proof, of DP)")
    for path, what in ((args.plot, "plot"), (args.json, "json")):
        if path:
            print(f"{what}: {path}")


def add_canary_commands(sub) -> None:
    canary = sub.add_parser("canary", help="canaries for an empirical privacy audit").add_subparsers(
        dest="action", required=True)
    make = canary.add_parser("make", help="m canary conversations, each included by a secret coin, and the "
                             "auditor's secret file")
    make.add_argument("--m", type=int, default=100, help="number of canaries (each included with probability 1/2)")
    make.add_argument("--out", required=True, help="JSONL for the node: the included canaries (and --data)")
    make.add_argument("--secret", required=True, help="the auditor's secret file (JSON): every canary and its coin")
    make.add_argument("--data", help="the node's dialogue file: --out is then it with the canaries mixed in")
    make.add_argument("--base-model", default="smollm2-135m", help="whose vocabulary the secrets' rare words come "
                      "from (the run's base model)")
    make.add_argument("--secret-words", type=int, default=8, help="rare words per secret")
    make.add_argument("--template", help='JSON {"messages": [...]} with {secret} in an assistant message and '
                      "optionally {id}")
    make.add_argument("--k-plus", type=int, help="'included' guesses the audit will make (default m // 5)")
    make.add_argument("--k-minus", type=int, help="'excluded' guesses the audit will make (default m // 5)")
    make.add_argument("--seed", type=int, help="reproducible coins, for tests only (default: from the OS)")
    make.add_argument("--force", action="store_true", help="overwrite --out and --secret")
    make.set_defaults(func=cmd_canary_make)

    emp = sub.add_parser(EMPIRICAL, prog="fedchat audit empirical",
                         help="(written `fedchat audit empirical`) a one-run lower bound on epsilon from canaries",
                         description="Score each canary by how much training lowered its loss on its secret, "
                         "guess which were included, and bound epsilon from below (Steinke, Nasr, Jagielski "
                         "2023). Exit status 1 when the bound exceeds the claimed epsilon.")
    emp.add_argument("--model", help="the trained model: a merged model folder")
    emp.add_argument("--adapter", help="the trained model: an adapter folder of --base-model")
    emp.add_argument("--base-model", required=True, help="the base model the run started from (smollm2-135m, tiny "
                     "or a folder)")
    emp.add_argument("--secret", required=True, help="the secret file of `fedchat canary make`")
    emp.add_argument("--ledger", help="the node's ledger: its verified claim is the epsilon tested (and its delta)")
    emp.add_argument("--key", help="the node's public ledger key (NODE.pub), with --ledger")
    emp.add_argument("--epsilon", type=float, help="the claimed epsilon, without a ledger")
    emp.add_argument("--delta", type=float, help="the claim's delta, without a ledger (default 1e-5)")
    emp.add_argument("--k-plus", type=int, help="override the secret file's 'included' guesses (only if chosen "
                     "before training)")
    emp.add_argument("--k-minus", type=int, help="override the secret file's 'excluded' guesses")
    emp.add_argument("--confidence", type=float, default=0.95)
    emp.add_argument("--plot", help="write a PNG of the score distributions")
    emp.add_argument("--json", help="write the full report as JSON")
    emp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    emp.set_defaults(func=cmd_audit_empirical)
