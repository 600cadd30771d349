"""Dialogue files: validation, chat-template encoding with assistant-only labels, batching.

A dialogue file is JSONL, one conversation per line, in the chat format that OpenAI
and TRL fine-tuning use::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

Both sides use this module: nodes train on their files, the coordinator evaluates on
a held-out file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.errors import DataError, ModelError

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)
_MAX_LISTED = 50


@dataclass
class DialogueFile:
    path: Path
    conversations: list[list[dict[str, str]]]
    line_numbers: list[int]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, problem)
    blank_lines: int = 0


def _problem(record: object) -> str | None:
    """What is wrong with one parsed line, or None when it is a usable conversation."""
    if not isinstance(record, dict):
        return f"a line must be a JSON object with a 'messages' list, not {type(record).__name__}"
    if "messages" not in record:
        return "no 'messages' key: write {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}"
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict):
            return f"message {i} is not an object with 'role' and 'content'"
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            return f"message {i} has unknown role {role!r}: use one of {', '.join(ROLES)}"
        if role == "system" and i != 1:
            return f"message {i} is a system message: a system message may only come first"
        if not isinstance(content, str):
            return f"message {i} ({role}) has no text 'content' string"
        if not content.strip():
            return f"message {i} ({role}) has empty content: remove the message or fill it in"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn: a conversation needs at least one assistant reply to learn from"
    return None


def read_dialogues(path: str | Path, *, skip_bad_lines: bool = False) -> DialogueFile:
    """Read and validate a dialogue file.

    By default any bad line refuses the whole file, and the error lists every bad line.
    With ``skip_bad_lines`` the good lines are kept and the bad ones are reported in
    ``DialogueFile.skipped``: a line is never dropped silently.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file. Give the path of a JSONL dialogue file.")
    raw = path.read_bytes()
    conversations, numbers, problems = [], [], []
    blank = 0
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append((number, f"not UTF-8 (byte {exc.start} of the line): save the file as UTF-8"))
            continue
        if not text.strip():
            blank += 1
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append((number, f"not valid JSON ({exc.msg} at column {exc.colno}): each line must be one JSON "
                                     "object"))
            continue
        except RecursionError:  # json's decoder recurses once per level of nesting
            problems.append((number, "JSON nested too deeply to read: a line must be one flat object "
                                     "{\"messages\": [{\"role\": ..., \"content\": \"...\"}, ...]}"))
            continue
        problem = _problem(record)
        if problem:
            problems.append((number, problem))
            continue
        conversations.append([{"role": m["role"], "content": m["content"]} for m in record["messages"]])
        numbers.append(number)
    if raw.endswith(b"\n"):
        blank -= 1  # the final newline does not start a line
    if problems and not skip_bad_lines:
        listed = "\n".join(f"  line {n}: {p}" for n, p in problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(
            f"{path}: {len(problems)} bad line(s), {len(conversations)} good; the file was refused:\n"
            f"{listed}{more}\nFix these lines, or skip them explicitly (--skip-bad-lines / skip-bad-lines=true)."
        )
    if not conversations:
        detail = f" ({len(problems)} bad line(s) skipped)" if problems else ""
        raise DataError(f"{path}: no usable conversation in the file{detail}: it needs at least one JSONL "
                        "conversation.")
    return DialogueFile(path, conversations, numbers, problems, max(blank, 0))


def write_dialogues(path: str | Path, conversations: list[list[dict[str, str]]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------- encoding


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def label_count(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the character spans the model must learn.

    Each assistant turn's span runs from the end of the generation prompt before it to
    the end of the turn, so it includes the end-of-turn token (the model learns to stop).
    """
    text = _render(tokenizer, messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise ModelError(
                "the model's chat template does not render conversations prefix by prefix, so "
                "assistant tokens cannot be located: use a standard chat template."
            )
        spans.append((len(before), len(upto)))
    return text, spans


def encode_conversation(tokenizer, messages: list[dict[str, str]], max_len: int) -> Encoded:
    """Token ids with the chat template, labels on assistant tokens only, cut at max_len."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [
        tok if any(start <= s < end for start, end in spans) else IGNORE
        for tok, (s, _) in zip(ids, offsets)
    ]
    truncated = len(ids) > max_len
    return Encoded(ids[:max_len], labels[:max_len], truncated)


def collate(batch: list[Encoded], pad_id: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label IGNORE."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def dialogue_stats(dialogues: DialogueFile, tokenizer, max_len: int) -> dict:
    """What `fedchat data check` prints: sizes, turns, tokens, truncation."""
    encoded = [encode_conversation(tokenizer, m, 10**9) for m in dialogues.conversations]
    lengths = [len(e.input_ids) for e in encoded]
    roles = {r: 0 for r in ROLES}
    for messages in dialogues.conversations:
        for m in messages:
            roles[m["role"]] += 1
    truncated = [e for e in encoded if len(e.input_ids) > max_len]
    lost = sum(1 for e in encoded if len(e.input_ids) > max_len
               and Encoded(e.input_ids[:max_len], e.labels[:max_len], True).label_count == 0)
    return {
        "file": str(dialogues.path),
        "conversations": len(dialogues.conversations),
        "turns": sum(len(m) for m in dialogues.conversations),
        "turns_by_role": roles,
        "tokens": sum(lengths),
        "assistant_tokens": sum(e.label_count for e in encoded),
        "tokens_per_conversation": {
            "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths), "min": min(lengths)},
        "max_seq_len": max_len,
        "truncated": len(truncated),
        "truncated_without_assistant_tokens": lost,
        "bad_lines_skipped": [{"line": n, "problem": p} for n, p in dialogues.skipped],
        "blank_lines": dialogues.blank_lines,
    }
