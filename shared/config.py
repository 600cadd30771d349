"""The typed configuration everything reads from.

Two objects, one per party:

* ``RunConfig``: what the coordinator decides for a run (model, rounds, LoRA, DP
  mechanism, secure aggregation). Flower passes it as ``context.run_config`` (from
  ``[tool.flwr.app.config]`` in pyproject.toml plus ``--run-config`` overrides); the
  coordinator sends it to nodes with every training instruction.
* ``NodeConfig``: what a node operator decides for their node (data, privacy budget,
  device, keys). Flower passes it as ``context.node_config`` (``--node-config``).

Keys use Flower's hyphenated spelling (``num-rounds``); fields use underscores.
Values are validated at construction, and an error names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from shared.errors import ConfigError

AGGREGATIONS = ("fedavg", "ffa")
DP_MODES = ("local", "distributed")
ACCOUNTANTS = ("prv", "rdp")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SECAGG_MIN_NODES = 3  # fewest contributors to a secure sum, whatever a config says


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


class _FlowerConfig:
    """Conversion between a flat Flower config mapping and a typed dataclass."""

    source: ClassVar[str] = "config"

    @classmethod
    def keys(cls) -> dict[str, dataclasses.Field]:
        return {f.name.replace("_", "-"): f for f in fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_flower(cls, mapping: Mapping[str, Any], *, ignore_unknown: bool = False):
        """Build from hyphenated keys; unknown keys are an error unless ignored."""
        known = cls.keys()
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            if key not in known:
                if ignore_unknown:
                    continue
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"unknown {cls.source} key '{key}'.{hint} Known keys: {', '.join(sorted(known))}."
                )
            values[known[key].name] = _coerce(key, value, known[key])
        return cls(**values)

    def to_flower(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def _fail(self, key: str, problem: str) -> None:
        raise ConfigError(f"{self.source} '{key}' {problem} (got {getattr(self, key.replace('-', '_'))!r}).")


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Flower configs carry int/float/str/bool; accept what converts losslessly."""
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type))
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config '{key}' must be of type {kind.__name__} (got {value!r}).") from None
    return value


@dataclass(frozen=True)
class RunConfig(_FlowerConfig):
    """The coordinator's settings for one federated run."""

    source: ClassVar[str] = "run config"

    base_model: str = field(default="smollm2-135m", metadata=_doc("'smollm2-135m' (embedded), 'tiny' (tests) or a local HF model folder"))
    num_rounds: int = field(default=3, metadata=_doc("federated rounds to run (a resumed run continues up to this number)"))
    nodes_per_round: int = field(default=0, metadata=_doc("nodes sampled per round; 0 = every connected node"))
    min_nodes: int = field(default=3, metadata=_doc("nodes that must be connected before a round starts (at least 3 with secagg)"))
    node_wait_timeout: float = field(default=600.0, metadata=_doc("seconds to wait for min-nodes before giving up"))
    # The defaults are the DP recipe (docs/decisions/dp-recipe.md): under DP-SGD noise of std sigma * C / B
    # lands on every trainable value while clipping caps the signal at C whatever the size, so few trainable
    # values (FFA-LoRA, rank 4: B only, A frozen) and large expected batches with few, large steps keep most of
    # the gain; small batches and many steps suit training without DP. A clipping norm below nearly every
    # conversation's gradient norm gives each the same weight in the step (AdamW makes the scale moot).
    local_steps: int = field(default=2, metadata=_doc("optimizer steps each node takes per round"))
    batch_size: int = field(default=40, metadata=_doc("conversations per step (expected batch size under Poisson sampling)"))
    micro_batch_tokens: int = field(default=2048, metadata=_doc("padded tokens per forward pass (memory bound); batches are split by length"))
    learning_rate: float = field(default=0.075, metadata=_doc("AdamW learning rate for the LoRA tensors"))
    lora_r: int = field(default=4, metadata=_doc("LoRA rank"))
    lora_alpha: int = field(default=8, metadata=_doc("LoRA scaling numerator (scale = alpha / r)"))
    lora_dropout: float = field(default=0.0, metadata=_doc("LoRA dropout"))
    lora_target_modules: str = field(default="q_proj,v_proj", metadata=_doc("comma-separated module names that get adapters"))
    aggregation: str = field(default="ffa", metadata=_doc("'fedavg' (A and B averaged) or 'ffa' (FFA-LoRA: A frozen from the seed, only B exchanged)"))
    seed: int = field(default=0, metadata=_doc("seed of the initial adapter, node sampling and the frozen A in 'ffa'"))
    max_seq_len: int = field(default=256, metadata=_doc("tokens per conversation; longer ones are truncated (and reported)"))
    eval_data: str = field(default="", metadata=_doc("held-out JSONL the coordinator evaluates on; empty = no evaluation"))
    eval_max_conversations: int = field(default=200, metadata=_doc("cap on held-out conversations evaluated (0 = all)"))
    out_dir: str = field(default="runs/latest", metadata=_doc("where checkpoints, report.json and the plot go"))
    ledger_heads: str = field(default="", metadata=_doc("file where the coordinator keeps every node's ledger head per ledger key, across runs; default FEDCHAT_STATE_HOME/coordinator-ledger-heads.json (~/.local/state/fedchat); a simulation's default is OUT-DIR/ledger-heads.json"))
    resume: bool = field(default=True, metadata=_doc("continue from the last checkpoint in out-dir if there is one"))
    merge: bool = field(default=True, metadata=_doc("write the merged model (OUT/merged) when the run ends"))
    dp: bool = field(default=True, metadata=_doc("train with DP-SGD on every node"))
    dp_max_grad_norm: float = field(default=0.1, metadata=_doc("per-conversation gradient clipping norm (0.1 clips nearly every conversation, so each weighs the same)"))
    dp_accountant: str = field(default="prv", metadata=_doc("'prv' (tighter) or 'rdp'"))
    dp_mode: str = field(default="local", metadata=_doc("'local': each node adds all the DP noise to its update; 'distributed': each round is one DP-SGD step of the whole federation, each node adding a share of integer (Skellam) noise to its clipped gradient sum, protected by the secure sum (needs dp and secagg; learning-rate is then the coordinator's Adam rate)"))
    secagg: bool = field(default=True, metadata=_doc("aggregate with fedchat's secure sum so the coordinator only sees the sum of the updates"))
    secagg_roster: str = field(default="", metadata=_doc("the federation roster file (`fedchat roster`), for its colluder bound; empty = SIM-DATA-DIR/roster.json in simulation"))
    secagg_clipping_range: float = field(default=0.0, metadata=_doc("|value| bound before quantisation; 0 = 4 * learning-rate * local-steps"))
    secagg_max_weight: int = field(default=100000, metadata=_doc("largest per-node weight (conversations); larger nodes are capped"))
    secagg_timeout: float = field(default=600.0, metadata=_doc("seconds to wait for replies at each secure-aggregation stage"))
    sim_cpus_per_node: float = field(default=0.0, metadata=_doc("simulation only: CPU cores each virtual node reserves (Flower's client_resources num_cpus); 0 = every core, so nodes train one after another; 1 on 2 cores trains two at once"))
    sim_threads_per_node: int = field(default=0, metadata=_doc("simulation only: torch threads of each virtual node; 0 = OMP_NUM_THREADS if set, else its cores (rounded down, at least 1)"))
    sim_data_dir: str = field(default="", metadata=_doc("simulation only: folder of org-1.jsonl, org-2.jsonl, ... for virtual nodes that have just a partition id (`flwr run .`)"))
    device: str = field(default="auto", metadata=_doc("coordinator device for evaluation: auto, cpu, cuda, cuda:N, mps"))
    dtype: str = field(default="auto", metadata=_doc("coordinator dtype: auto, float32, bfloat16, float16"))

    def __post_init__(self) -> None:
        positive = ("num_rounds", "local_steps", "batch_size", "micro_batch_tokens", "lora_r", "lora_alpha", "max_seq_len", "secagg_max_weight")
        for name in positive:
            if getattr(self, name) <= 0:
                self._fail(name.replace("_", "-"), "must be a positive integer")
        for name in ("nodes_per_round", "eval_max_conversations"):
            if getattr(self, name) < 0:
                self._fail(name.replace("_", "-"), "must be 0 (automatic) or positive")
        if self.min_nodes < 1:
            self._fail("min-nodes", "must be at least 1")
        if not self.learning_rate > 0:
            self._fail("learning-rate", "must be > 0")
        if not 0 <= self.lora_dropout < 1:
            self._fail("lora-dropout", "must be in [0, 1)")
        if not self.target_modules:
            self._fail("lora-target-modules", "must name at least one module, e.g. 'q_proj,v_proj'")
        if self.aggregation not in AGGREGATIONS:
            self._fail("aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
        if self.dp_accountant not in ACCOUNTANTS:
            self._fail("dp-accountant", f"must be one of {', '.join(ACCOUNTANTS)}")
        if self.dp_mode not in DP_MODES:
            self._fail("dp-mode", f"must be one of {', '.join(DP_MODES)}")
        if self.dp_mode == "distributed" and not (self.dp and self.secagg):
            self._fail("dp-mode", "'distributed' shares the noise between the nodes of a secure sum: it needs dp=true "
                                  "and secagg=true")
        if not self.dp_max_grad_norm > 0:
            self._fail("dp-max-grad-norm", "must be > 0")
        if self.secagg_clipping_range < 0:
            self._fail("secagg-clipping-range", "must be 0 (automatic) or positive")
        if self.secagg_max_weight > 10_000_000:  # the sum of the weights of 400 nodes stays below 2**32
            self._fail("secagg-max-weight", "must be at most 10000000")
        if self.sim_cpus_per_node < 0 or self.sim_threads_per_node < 0:
            self._fail("sim-cpus-per-node" if self.sim_cpus_per_node < 0 else "sim-threads-per-node",
                       "must be 0 (automatic) or positive")
        for name in ("node_wait_timeout", "secagg_timeout"):
            if not getattr(self, name) > 0:
                self._fail(name.replace("_", "-"), "must be a positive number of seconds")
        if self.dtype not in DTYPES:
            self._fail("dtype", f"must be one of {', '.join(DTYPES)}")
        if not self.base_model:
            self._fail("base-model", "must name a model ('smollm2-135m', 'tiny' or a folder)")
        if self.secagg:  # the sum of one or two updates reveals them to the coordinator and to each node
            if self.min_nodes < SECAGG_MIN_NODES:
                self._fail("min-nodes", f"must be at least {SECAGG_MIN_NODES} with secagg (a sum of fewer updates "
                                        "reveals them); set min-nodes=3 or more, and run 3 or more nodes")
            if 0 < self.nodes_per_round < SECAGG_MIN_NODES:
                self._fail("nodes-per-round", f"must be 0 (every node) or at least {SECAGG_MIN_NODES} with secagg "
                                              "(a sum of fewer updates reveals them)")

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def update_bound(self) -> float:
        """Bound on |value| of a node's update before secure-sum quantisation.

        AdamW moves each value by at most about (1 - beta1) / sqrt(1 - beta2) ~ 3.2
        learning rates per step, DP noise or not, so 4 * lr * steps is never exceeded
        by an honest node; nodes clip to it (and report what they clipped).
        """
        return self.secagg_clipping_range or 4.0 * self.learning_rate * self.local_steps


@dataclass(frozen=True)
class NodeConfig(_FlowerConfig):
    """A node operator's settings for their node."""

    source: ClassVar[str] = "node config"

    data_path: str = field(default="", metadata=_doc("the node's private dialogue JSONL file"))
    state_dir: str = field(default="", metadata=_doc("where the node keeps its privacy accountant, ledger and key"))
    node_name: str = field(default="", metadata=_doc("the node's name in logs and in its ledger"))
    target_epsilon: float = field(default=8.0, metadata=_doc("lifetime privacy budget epsilon of this node's data (against anyone who sees only the secure sum, in distributed DP)"))
    local_epsilon_cap: float = field(default=64.0, metadata=_doc("distributed DP only: the epsilon of this node's own noise share alone (what would be left if secure aggregation were broken) stays within this"))
    target_delta: float = field(default=1e-5, metadata=_doc("delta of the budget; must be below 1/(training conversations)"))
    device: str = field(default="auto", metadata=_doc("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=_doc("base model dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16"))
    skip_bad_lines: bool = field(default=False, metadata=_doc("skip (and report) malformed lines instead of refusing the file"))
    require_dp: bool = field(default=True, metadata=_doc("refuse to train without DP-SGD, whatever the coordinator asks"))
    require_secagg: bool = field(default=True, metadata=_doc("refuse to send an update outside the secure sum, whatever the coordinator asks"))
    secagg_min_nodes: int = field(default=3, metadata=_doc("fewest nodes whose updates a secure sum must hold, at every stage, for this node to take part (never below 3)"))
    secagg_colluders: int = field(default=-1, metadata=_doc("how many roster members this node assumes may collude with the coordinator; -1 = the roster's colluder bound; a larger value is stricter and refuses rounds it does not allow"))
    secagg_dropout_fraction: float = field(default=0.4, metadata=_doc("largest share of a round's nodes this node lets drop out after key sharing (their masks are rebuilt); more and it reveals nothing"))
    roster: str = field(default="", metadata=_doc("the federation roster file (`fedchat roster`): every member's identity key and the colluder bound"))
    roster_sha256: str = field(default="", metadata=_doc("SHA-256 of the roster this node's operator approved (`fedchat roster approve`); any other roster is refused"))
    identity_key: str = field(default="", metadata=_doc("Ed25519 private key (PEM) that signs this node's secure-aggregation messages, listed in the roster; default STATE_DIR/identity-key.pem (`fedchat roster key` makes one)"))
    validation_fraction: float = field(default=0.1, metadata=_doc("share of local conversations held out for local validation"))
    ledger_key: str = field(default="", metadata=_doc("Ed25519 private key (PEM) that signs the ledger; default STATE_DIR/ledger-key.pem"))
    ledger_registry: str = field(default="", metadata=_doc("folder, outside every state dir, where the node records which ledger holds the budget of which conversations; default FEDCHAT_STATE_HOME/ledgers (~/.local/state/fedchat/ledgers); a simulation's default is OUT-DIR/ledger-registry"))
    allowed_base_models: str = field(default="smollm2-135m,tiny", metadata=_doc("comma-separated base models (names or folders) this node agrees to load; any other run is refused"))
    max_local_steps: int = field(default=1000, metadata=_doc("cap on local-steps a run may ask of this node per round"))
    max_batch_size: int = field(default=4096, metadata=_doc("cap on the (expected) batch size a run may ask"))
    max_seq_len: int = field(default=2048, metadata=_doc("cap on max-seq-len a run may ask (memory)"))
    max_micro_batch_tokens: int = field(default=65536, metadata=_doc("cap on micro-batch-tokens a run may ask (memory)"))
    max_lora_r: int = field(default=64, metadata=_doc("cap on the LoRA rank a run may ask"))

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            self._fail("target-epsilon", "must be > 0")
        if not self.local_epsilon_cap >= self.target_epsilon:
            self._fail("local-epsilon-cap", "must be at least target-epsilon (the share alone is never more private "
                                            "than the sum)")
        if not 0 < self.target_delta < 1:
            self._fail("target-delta", "must be in (0, 1), and below 1/(training conversations)")
        if self.dtype not in DTYPES:
            self._fail("dtype", f"must be one of {', '.join(DTYPES)}")
        if not 0 <= self.validation_fraction < 1:
            self._fail("validation-fraction", "must be in [0, 1)")
        if self.secagg_min_nodes < SECAGG_MIN_NODES:
            self._fail("secagg-min-nodes", f"must be at least {SECAGG_MIN_NODES}: a secure sum of fewer updates "
                                           "reveals them")
        if self.secagg_colluders < -1:
            self._fail("secagg-colluders", "must be -1 (the roster's bound) or a count of roster members, 0 or more")
        if not 0 <= self.secagg_dropout_fraction < 0.5:
            self._fail("secagg-dropout-fraction", "must be in [0, 0.5)")
        if self.roster_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.roster_sha256):
            self._fail("roster-sha256", "must be 64 lower-case hex digits (`fedchat roster approve` writes it)")
        if not self.allowed_models:
            self._fail("allowed-base-models", "must name at least one base model, e.g. 'smollm2-135m'")
        for name in ("max_local_steps", "max_batch_size", "max_seq_len", "max_micro_batch_tokens", "max_lora_r"):
            if getattr(self, name) <= 0:
                self._fail(name.replace("_", "-"), "must be a positive integer")

    @property
    def allowed_models(self) -> list[str]:
        return [m.strip() for m in self.allowed_base_models.split(",") if m.strip()]


def org_name(i: int) -> str:
    """Node i's name (1-based) in the demo data, the local federation and simulated partitions;
    its dialogues are org-i.jsonl."""
    return f"org-{i}"


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`--run-config key=value` pairs; a value is parsed as JSON where it parses, else kept as a string."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--run-config expects key=value, got {item!r}.")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def markdown_reference() -> str:
    """docs/configuration.md: every key of both configs (`python -m shared.config > docs/configuration.md`)."""
    out = ["# Configuration reference", "",
           "Generated from `shared/config.py` (`python -m shared.config > docs/configuration.md`); a test keeps it "
           "in sync.", ""]
    for cls, title, how in (
            (RunConfig, "Run config (the coordinator's)",
             "`[tool.flwr.app.config]` in pyproject.toml, `flwr run ... --run-config \"key=value ...\"`, or "
             "`fedchat demo --run-config key=value ...`."),
            (NodeConfig, "Node config (each node operator's)",
             "`flower-supernode --node-config \"key='value' ...\"` (or the node's TOML file, see deploy/).")):
        out += [f"## {title}", "", f"Set with {how}", "", "| key | default | meaning |", "|---|---|---|"]
        out += [f"| `{k}` | `{f.default!r}` | {f.metadata.get('doc', '')} |" for k, f in cls.keys().items()]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_reference(), end="")
