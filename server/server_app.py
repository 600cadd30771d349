"""The coordinator's ServerApp: rounds, held-out evaluation, checkpoints, report, merge.

The round loop is Flower's legacy loop (``LegacyContext`` + a fit workflow) written
out here so a run can resume at the round after its last checkpoint. The fit workflow
is Flower's default one or fedchat's secure sum (server/secagg_workflow.py); the strategy is the same for both.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from server.checkpoint import (
    RunState,
    check_resumable,
    latest_checkpoint,
    load_optimizer,
    load_state,
    publish_link,
    record_resume,
    save_checkpoint,
)
from server.evaluate import HeldOutEvaluator
from server.report import plot_losses, write_report
from server.secagg_workflow import SecureAggregation, load_run_roster
from server.strategy import FedchatStrategy
from server.traffic import TrafficMeter
from shared.adapter import attach_adapter, exchanged_names, frozen_a_fingerprint, get_arrays, set_arrays
from shared.config import RunConfig
from shared.errors import CheckpointError
from shared.logs import setup_logging
from shared.model import load_model, load_tokenizer, resolve_base_model, select_device, select_dtype

log = logging.getLogger("fedchat.coordinator")


class Coordinator:
    """The global adapter of one run, with its evaluation, checkpoints and report."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.base_dir = resolve_base_model(cfg.base_model)
        device = select_device(cfg.device)
        base = load_model(self.base_dir, device, select_dtype(cfg.dtype, device))
        self.model_bytes = sum(p.numel() * 4 for p in base.parameters())  # fp32 size of the full model
        self.model = attach_adapter(base, cfg)
        self.tokenizer = load_tokenizer(self.base_dir)
        self.names = exchanged_names(self.model, cfg.aggregation)
        self.frozen_a = frozen_a_fingerprint(self.model)
        self.evaluator = (HeldOutEvaluator(cfg.eval_data, self.tokenizer, max_len=cfg.max_seq_len,
                                           max_conversations=cfg.eval_max_conversations)
                          if cfg.eval_data else None)
        self.optimizer_state: dict = {}  # distributed DP's Adam moments, from the checkpoint a resumed run continues
        self.state = self._start_or_resume()

    def _start_or_resume(self) -> RunState:
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None:
            return RunState(run_id=uuid.uuid4().hex[:12], config=self.cfg.to_flower(),
                            started=datetime.now(UTC).isoformat(timespec="seconds"))
        if not self.cfg.resume:
            raise CheckpointError(f"{self.out} already holds checkpoints (up to {checkpoint.name}). Set resume=true to "
                                  "continue that run, or choose a new out-dir.")
        state = load_state(checkpoint)
        check_resumable(state, self.cfg, checkpoint)
        if state.round < self.cfg.num_rounds:  # the report says so: a run that stopped and goes on
            state.resumed.append({"at": datetime.now(UTC).isoformat(timespec="seconds"),
                                  "from_round": state.round,
                                  "note": f"the run stopped after round {state.round} (its last checkpoint); round "
                                          f"{state.round + 1} runs again, and a node that had trained it before the "
                                          "stop keeps that line in its ledger too"})
            record_resume(checkpoint, state)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(checkpoint / "adapter_model.safetensors"))
        self.optimizer_state = load_optimizer(checkpoint)
        log.info("resuming run %s from %s (round %d of %d done)", state.run_id, checkpoint, state.round,
                 self.cfg.num_rounds)
        return state

    @property
    def arrays(self):
        return get_arrays(self.model, self.names)

    def evaluate(self) -> float | None:
        return self.evaluator(self.model) if self.evaluator else None

    def checkpoint(self, optimizer: dict | None = None) -> Path:
        meta = {"base_model": self.cfg.base_model, "base_model_path": str(self.base_dir),
                "aggregation": self.cfg.aggregation, "seed": self.cfg.seed, "run_id": self.state.run_id}
        return save_checkpoint(self.out, self.state, self.model, meta, optimizer)

    def report(self, status: str, merged: Path | None = None, generation: dict | None = None) -> dict:
        s = self.state
        nodes = sorted({c["node"] for r in s.rounds for c in r["clients"]})
        evals = [r["eval_loss"] for r in s.rounds if r.get("eval_loss") is not None]
        update_bytes = sum(a.nbytes for a in self.arrays)
        report = {
            "status": status, "run_id": s.run_id, "started": s.started,
            "base_model": self.cfg.base_model, "aggregation": self.cfg.aggregation,
            "dp": self.cfg.dp, "secagg": self.cfg.secagg, "clients": len(nodes), "nodes": nodes,
            "num_rounds": self.cfg.num_rounds, "completed_rounds": s.round,
            "failed_rounds": [r["round"] for r in s.rounds if r.get("status") != "ok"],
            "base_eval_loss": s.base_eval_loss, "final_eval_loss": evals[-1] if evals else s.base_eval_loss,
            "adapter": str((self.out / "adapter").absolute()),
            "merged_model": str(merged.absolute()) if merged else None,
            "full_model_bytes": self.model_bytes, "adapter_update_bytes": update_bytes,
            "config": self.cfg.to_flower(), "rounds": s.rounds, "resumed": s.resumed,
        }
        if generation is not None:
            report["generation"] = generation
        write_report(self.out / "report.json", report)
        plot_losses(s.rounds, s.base_eval_loss, self.out / "loss.png",
                    f"{self.cfg.base_model}, {self.cfg.aggregation}{', DP' if self.cfg.dp else ''}"
                    f"{', secure sum' if self.cfg.secagg else ''}")
        return report

    def compare_with_base(self, merged: Path) -> dict | None:
        """The merged model beside the base on the first held-out conversations: loss, and greedy
        answers scored with ROUGE-L, BLEU and chrF (shared.evaluation); None without eval-data."""
        if not self.cfg.eval_data:
            return None
        from shared.errors import FedchatError
        from shared.evaluation import compare_saved

        device = select_device(self.cfg.device)
        try:
            scores = compare_saved(merged, self.base_dir, self.cfg.eval_data, device=device,
                                   dtype=select_dtype(self.cfg.dtype, device), max_len=self.cfg.max_seq_len)
        except FedchatError as exc:  # the run itself finished: keep its report, say why this part is missing
            log.error("evaluation of the merged model beside the base failed: %s", exc)
            return {"error": str(exc)}
        log.info("merged model beside the base on %d held-out answers: ROUGE-L %.4f -> %.4f, chrF %.2f -> %.2f (%.1fs)",
                 scores["scored"], scores["base"]["rouge_l"], scores["model"]["rouge_l"], scores["base"]["chrf"],
                 scores["model"]["chrf"], scores["seconds"])
        return scores

    def merge(self) -> Path:
        from shared.merge import merge_adapter

        target = self.out / "models" / f"merged-round-{self.state.round:04d}"
        merge_adapter(self.out / "adapter", target, overwrite=True)
        publish_link(self.out / "merged", target)
        return self.out / "merged"


class FitRounds:
    """Flower's legacy fit loop (``LegacyContext`` + a fit workflow), one round at a time: the
    strategy's round through the secure sum (SecureAggregation) or Flower's default fit workflow, timed, its
    bytes counted by the meter (the grid every message goes through), as a report row."""

    def __init__(self, context: Context, cfg: RunConfig, strategy: FedchatStrategy, meter: TrafficMeter) -> None:
        self.cfg, self.strategy, self.meter = cfg, strategy, meter
        self.legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)
        self.round = 0
        self.secagg = SecureAggregation(cfg, load_run_roster(cfg), strategy.shapes) if cfg.secagg else None
        self.run_cfg = ConfigRecord({Key.START_TIME: time.time()})
        self.legacy.state.config_records[MAIN_CONFIGS_RECORD] = self.run_cfg

    def __enter__(self) -> FitRounds:
        """Keeps Flower's client manager in step with the connected nodes until the loop ends."""
        self._thread, self._stop, registered = start_update_client_manager_thread(self.meter,
                                                                                  self.legacy.client_manager)
        registered.wait()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def run(self, rnd: int) -> dict:
        self.round = rnd
        self.run_cfg[Key.CURRENT_ROUND] = rnd
        self.legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(self.strategy.current), True)
        self.meter.reset()
        self.strategy.outcome = None
        log.info("round %d/%d: starting (%s%s)", rnd, self.cfg.num_rounds, "secure sum" if self.secagg else "plaintext",
                 ", DP" if self.cfg.dp else "")
        started = time.perf_counter()
        (self.secagg or default_fit_workflow)(self.meter, self.legacy)
        return _round_row(rnd, self.strategy, self.meter, self.secagg, time.perf_counter() - started)


def run_coordinator(grid: Grid, context: Context, cfg: RunConfig) -> dict:
    coordinator = Coordinator(cfg)
    state = coordinator.state
    meter = TrafficMeter(grid)
    strategy = FedchatStrategy(cfg, state.run_id, coordinator.arrays, coordinator.frozen_a, meter)
    for row in state.rounds:  # a resumed run still holds nodes to the ledger heads they reported
        for c in row["clients"]:
            if "ledger_entries" in c and "ledger_head" in c:
                strategy.ledger_heads[c["node_id"]] = (int(c["ledger_entries"]), str(c["ledger_head"]))
    with FitRounds(context, cfg, strategy, meter) as rounds:
        optimizer = rounds.secagg.server_optimizer if rounds.secagg else None
        if optimizer:
            optimizer.load(coordinator.optimizer_state)
        if state.round == 0 and state.base_eval_loss is None:
            state.base_eval_loss = coordinator.evaluate()
            if state.base_eval_loss is not None:
                log.info("round 0 (initial adapter = base model): held-out loss %.4f", state.base_eval_loss)
            coordinator.checkpoint()
        for rnd in range(state.round + 1, cfg.num_rounds + 1):
            row = rounds.run(rnd)
            set_arrays(coordinator.model, coordinator.names, strategy.current)
            t_eval = time.perf_counter()
            row["eval_loss"] = coordinator.evaluate()
            row["eval_seconds"] = round(time.perf_counter() - t_eval, 2)
            state.rounds.append(row)
            state.round = rnd
            coordinator.checkpoint(optimizer.state() if optimizer else None)
            coordinator.report("running")
            _log_round(row, cfg)
    merged = coordinator.merge() if cfg.merge else None
    return coordinator.report("finished", merged, coordinator.compare_with_base(merged) if merged else None)


def _round_row(rnd: int, strategy: FedchatStrategy, meter: TrafficMeter, secagg, seconds: float) -> dict:
    outcome = strategy.outcome
    by_id = {c["node_id"]: c for c in (outcome.clients if outcome else [])}
    for node_id, c in by_id.items():
        c["bytes_up"], c["bytes_down"] = meter.up.get(node_id, 0), meter.down.get(node_id, 0)
    row = {"round": rnd, "status": "ok" if outcome and outcome.applied else "failed",
           "train_loss": outcome.train_loss if outcome else None, "seconds": round(seconds, 2),
           "bytes_up": sum(meter.up.values()), "bytes_down": sum(meter.down.values()),
           "clients": list(by_id.values()), "failures": outcome.failures if outcome else [],
           "dropped": outcome.dropped if outcome else 0, "left_out": outcome.left_out if outcome else []}
    if secagg is not None:
        row["secagg"] = dict(secagg.last_parameters)
    if row["status"] == "failed":
        if outcome and outcome.error:  # not run: too few nodes could train
            row["error"] = outcome.error
        elif secagg is not None and "halted_at" in secagg.last_parameters:
            p = secagg.last_parameters
            stage = p["halted_at"]
            dropped = "; ".join(f"{len(ids)} dropped out at '{at}' ({', '.join(map(str, ids))})"
                                for at, ids in p.get("dropped_at_stage", {}).items())
            row["error"] = (f"secure aggregation halted at stage '{stage}': {p['active_after_stage'][stage]} of the "
                            f"{p['nodes']} sampled nodes remained, {p.get('needed', p['min_survivors'])} are needed"
                            f"{f' ({dropped})' if dropped else ''}; no node's update was revealed and the global "
                            "adapter is unchanged"
                            + ("; the nodes' errors are in 'failures'" if row["failures"] else ""))
        else:
            row["error"] = "no usable update this round; the global adapter is unchanged"
        log.error("round %d failed: %s", rnd, row["error"])
    return row


def _log_round(row: dict, cfg: RunConfig) -> None:
    for c in row["clients"]:
        eps = f"epsilon {c['epsilon']:.3f}/{c['target_epsilon']:g}" if "epsilon" in c else "no DP"
        loss = f"train loss {c['train_loss']:.4f}" if "train_loss" in c else ""
        log.info("  node %-12s %-16s n=%-5s %s %s up %d B", c["node"], c["status"][:16], c.get("num_examples", "-"),
                 eps, loss, c.get("bytes_up", 0))
    ev = f"{row['eval_loss']:.4f}" if row.get("eval_loss") is not None else "n/a"
    log.info("round %d/%d done in %.1fs: held-out loss %s", row["round"], cfg.num_rounds, row["seconds"], ev)


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """The ServerApp; `overrides` (hyphenated run-config keys) win over Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_logging()
        cfg = RunConfig.from_flower({**context.run_config, **(overrides or {})})
        run_coordinator(grid, context, cfg)

    return app


app = make_server_app()
