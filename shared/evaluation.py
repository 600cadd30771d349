"""Held-out evaluation of a chat model: loss and perplexity on assistant tokens, and greedy
answers to each conversation's last user turn scored against the reference answer.

Loss is `shared.model.heldout_loss` over `shared.dialogue.encode_conversation` (the same
numbers the coordinator logs every round). The answer scores come from the libraries
that define them, never from code of ours: ROUGE-L F1 from Google's ``rouge-score``
(its default tokenizer, Porter stemming; 0-1, averaged over conversations), BLEU and
chrF from ``sacrebleu`` (corpus level, 0-100). Greedy answers come from transformers'
continuous batching (``generate_batch``), or from ``generate`` on left-padded batches.

Both `fedchat eval` and the coordinator's report (merged model against its base) use it.
"""

from __future__ import annotations

import logging
import math
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.dialogue import encode_conversation, read_dialogues
from shared.errors import ConfigError, DataError, ModelError, require_extra
from shared.model import heldout_loss

log = logging.getLogger("fedchat.evaluation")

ENGINES = ("continuous", "padded")
METRICS = ("loss", "perplexity", "rouge_l", "bleu", "chrf")
# What the coordinator's report and the demo evaluate: small, so a run's end stays quick.
REPORT_CONVERSATIONS = 40
REPORT_NEW_TOKENS = 32


@dataclass(frozen=True)
class HeldOut:
    """Held-out conversations and, for those that end on an answer to a user, the prompt
    (every message before that answer) and the reference answer."""

    path: str
    conversations: list[list[dict[str, str]]]
    prompts: list[list[dict[str, str]]]
    references: list[str]


def last_exchange(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str] | None:
    """(messages up to the last user turn that an assistant answers, that answer), or None."""
    for i in range(len(messages) - 1, 0, -1):
        if messages[i]["role"] == "assistant" and messages[i - 1]["role"] == "user":
            return messages[:i], messages[i]["content"]
    return None


def load_heldout(path: str | Path, max_conversations: int = 0) -> HeldOut:
    """Read a JSONL dialogue file (refused whole if any line is bad: shared.dialogue says which)."""
    if max_conversations < 0:
        raise ConfigError(f"max conversations must be 0 (all) or positive (got {max_conversations}).")
    conversations = read_dialogues(path).conversations
    if max_conversations:
        conversations = conversations[:max_conversations]
    pairs = [p for p in map(last_exchange, conversations) if p is not None]
    if not pairs:
        raise DataError(f"{path}: no conversation has a user turn answered by the assistant, so there is nothing to "
                        "generate and score: give conversations like [user, assistant, ...].")
    return HeldOut(str(path), conversations, [p for p, _ in pairs], [r for _, r in pairs])


# ------------------------------------------------------------------ scores


def text_scores(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-L F1 (rouge-score, mean over pairs, 0-1), BLEU and chrF (sacrebleu, corpus, 0-100),
    and the ROUGE-L F1 of each pair."""
    require_extra("eval", "scoring answers with ROUGE-L, BLEU and chrF")
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references, at least one (got {len(predictions)} and "
                         f"{len(references)})")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    per_pair = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return {"rouge_l": sum(per_pair) / len(per_pair),
            "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
            "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
            "rouge_l_per_pair": per_pair}


# ------------------------------------------------------------- generation


def greedy_answers(model, tokenizer, prompts: list[list[dict[str, str]]], *, max_new_tokens: int,
                   engine: str = "continuous", batch_size: int = 8, progress: bool = True) -> list[str]:
    """The greedy answer (at most max_new_tokens) to each prompt, in order.

    'continuous' is transformers' continuous batching (``generate_batch``): requests are
    scheduled token by token into one paged KV cache, so short answers free their slot at
    once; its cache is sized here for these prompts (left to itself it takes 90% of the
    machine's memory on a CPU). 'padded' is ``generate`` on left-padded batches.
    """
    from transformers import GenerationConfig

    if engine not in ENGINES:
        raise ConfigError(f"generation engine '{engine}' is not one of {', '.join(ENGINES)}.")
    if max_new_tokens <= 0:
        raise ConfigError(f"max new tokens must be positive (got {max_new_tokens}).")
    eos = model.generation_config.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id if eos is None else eos,
                              pad_token_id=tokenizer.pad_token_id)
    encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
               for p in prompts]
    with torch.no_grad():
        if engine == "continuous":
            tokens = _continuous(model, encoded, config, progress)
        else:
            tokens = _padded(model, tokenizer, encoded, config, batch_size, progress)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def _continuous(model, encoded: list[list[int]], config, progress: bool) -> list[list[int]]:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 256
    pages_per_request = math.ceil((max(map(len, encoded)) + config.max_new_tokens) / page)
    concurrent = min(len(encoded), 64)
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=concurrent * pages_per_request + 1,
                                  max_batch_tokens=2048, max_requests_per_batch=concurrent)
    results = model.generate_batch(encoded, generation_config=config, continuous_batching_config=cb,
                                   progress_bar=progress)
    outputs = list(results.values())  # generate_batch returns them in input order
    failed = [o.error for o in outputs if o.error]
    if len(outputs) != len(encoded) or failed:
        raise ModelError(f"continuous batching answered {len(outputs) - len(failed)} of {len(encoded)} prompts"
                         f"{': ' + failed[0] if failed else ''}. Use the padded engine (--engine padded).")
    return [o.generated_tokens for o in outputs]


def _padded(model, tokenizer, encoded: list[list[int]], config, batch_size: int, progress: bool) -> list[list[int]]:
    from tqdm import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad less
    tokens: list[list[int]] = [[] for _ in encoded]
    for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", disable=not progress):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding: every prompt ends where generation starts
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for r, i in enumerate(rows):
            tokens[i] = out[r, width:].tolist()
    return tokens


# ------------------------------------------------------------- evaluation


@dataclass
class ModelScores:
    name: str
    loss: float | None
    perplexity: float | None
    rouge_l: float
    bleu: float
    chrf: float
    answers: list[str] = field(repr=False)
    rouge_l_per_pair: list[float] = field(repr=False)
    seconds: float = 0.0

    def metrics(self) -> dict:
        return {k: getattr(self, k) for k in METRICS}


def score_model(model, tokenizer, heldout: HeldOut, *, name: str, max_len: int, max_new_tokens: int,
                engine: str = "continuous", progress: bool = True, with_loss: bool = True) -> ModelScores:
    """Loss and perplexity over every held-out conversation (unless with_loss is False: the
    coordinator has them already), and answer scores on its prompts."""
    require_extra("eval", "scoring answers with ROUGE-L, BLEU and chrF")  # before the minutes of generation
    started = time.perf_counter()
    loss = None
    if with_loss:
        data = [encode_conversation(tokenizer, m, max_len) for m in heldout.conversations]
        loss = heldout_loss(model, data, tokenizer.pad_token_id)
        log.info("%s: held-out loss %.4f on %d conversations", name, loss, len(data))
    log.info("%s: generating %d greedy answers", name, len(heldout.prompts))
    answers = greedy_answers(model, tokenizer, heldout.prompts, max_new_tokens=max_new_tokens, engine=engine,
                             progress=progress)
    scores = text_scores(answers, heldout.references)
    perplexity = None if loss is None else math.exp(loss) if loss < 700 else math.inf
    return ModelScores(name=name, loss=loss, perplexity=perplexity,
                       rouge_l=scores["rouge_l"], bleu=scores["bleu"], chrf=scores["chrf"], answers=answers,
                       rouge_l_per_pair=scores["rouge_l_per_pair"], seconds=round(time.perf_counter() - started, 2))


def evaluation_report(heldout: HeldOut, model: ModelScores, base: ModelScores | None, *, max_len: int,
                      max_new_tokens: int, engine: str) -> dict:
    """The JSON of an evaluation: settings, each model's metrics, and every answer beside its reference."""
    samples = []
    for i, (prompt, reference) in enumerate(zip(heldout.prompts, heldout.references)):
        sample = {"prompt": prompt[-1]["content"], "reference": reference, "model": model.answers[i],
                  "rouge_l_model": model.rouge_l_per_pair[i]}
        if base is not None:
            sample.update(base=base.answers[i], rouge_l_base=base.rouge_l_per_pair[i])
        samples.append(sample)
    return {
        "data": heldout.path, "conversations": len(heldout.conversations), "scored": len(heldout.prompts),
        "max_seq_len": max_len, "max_new_tokens": max_new_tokens, "engine": engine, "decoding": "greedy",
        "metrics": {"loss": "mean next-token cross-entropy on assistant tokens", "perplexity": "exp(loss)",
                    "rouge_l": "ROUGE-L F1, rouge-score (default tokenizer, Porter stemmer), mean over answers, 0-1",
                    "bleu": "sacrebleu corpus BLEU, 0-100", "chrf": "sacrebleu corpus chrF, 0-100"},
        "model": {"name": model.name, **model.metrics(), "seconds": model.seconds},
        "base": None if base is None else {"name": base.name, **base.metrics(), "seconds": base.seconds},
        "samples": samples,
    }


def compare_saved(model_dir: Path, base_dir: Path, data: str | Path, *, device: torch.device, dtype: torch.dtype,
                  max_conversations: int = REPORT_CONVERSATIONS, max_new_tokens: int = REPORT_NEW_TOKENS,
                  max_len: int = 256, progress: bool = False) -> dict:
    """A saved model folder against its base, one loaded at a time (the coordinator's final report:
    answers only, since its report has the held-out loss of both on more conversations)."""
    from shared.model import load_model, load_tokenizer

    started = time.perf_counter()
    heldout = load_heldout(data, max_conversations)
    scores = []
    for name, folder in (("model", model_dir), ("base", base_dir)):
        model = load_model(folder, device, dtype)
        scores.append(score_model(model, load_tokenizer(folder), heldout, name=name, max_len=max_len,
                                  max_new_tokens=max_new_tokens, progress=progress, with_loss=False))
        del model
    report = evaluation_report(heldout, scores[0], scores[1], max_len=max_len, max_new_tokens=max_new_tokens,
                               engine="continuous")
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


# ------------------------------------------------------------- presenting


def format_table(report: dict) -> str:
    """Metric | model | base | change, as plain text."""
    model, base = report["model"], report["base"]
    rows = [("loss (assistant tokens)", "loss", 4), ("perplexity", "perplexity", 2), ("ROUGE-L F1 (0-1)", "rouge_l", 4),
            ("BLEU (0-100)", "bleu", 2), ("chrF (0-100)", "chrf", 2)]
    head = f"{'metric':<26}{model['name'][:20]:>22}" + (f"{base['name'][:20]:>22}{'change':>12}" if base else "")
    lines = [head, "-" * len(head)]
    for label, key, digits in rows:
        if model[key] is None:
            continue
        line = f"{label:<26}{model[key]:>22.{digits}f}"
        if base:
            line += f"{base[key]:>22.{digits}f}{model[key] - base[key]:>+12.{digits}f}"
        lines.append(line)
    lines.append(f"{report['conversations']} held-out conversations ({report['scored']} answers scored, greedy, "
                 f"at most {report['max_new_tokens']} new tokens) from {report['data']}")
    return "\n".join(lines)


def plot_report(report: dict, out: str | Path) -> Path:
    """One bar chart per metric: the model beside the base (when there is one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in (report["base"], report["model"]) if e is not None]
    titles = (("loss", "held-out loss"), ("rouge_l", "ROUGE-L F1"), ("bleu", "BLEU"), ("chrf", "chrF"))
    keys = [(k, t) for k, t in titles if entries[0][k] is not None]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 3.4))
    for ax, (key, title) in zip(axes, keys):
        values = [e[key] for e in entries]
        labels = [textwrap.fill(e["name"], 16) for e in entries]
        bars = ax.bar(labels, values, color=["#999999", "#3b75af"][-len(entries):])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{report['scored']} held-out answers, greedy, {report['max_new_tokens']} new tokens", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
