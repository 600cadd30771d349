"""Dialogue files: every error is reported with its line and a fix; encoding and split."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.data import count_training_conversations, load_local_data
from fedchat.cli import main
from shared.dialogue import IGNORE, encode_conversation, read_dialogues
from shared.errors import DataError
from tests.support.data import conversation, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("line,problem", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"text": "hi"}', "no 'messages' key"),
    ('{"messages": []}', "non-empty list"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
     "unknown role 'bot'"),
    (json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}),
     "empty content"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"},
                              {"role": "assistant", "content": "x"}]}), "system message may only come first"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
     "no text 'content' string"),
])
def test_each_bad_line_is_refused_with_its_line_number(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation(), line, conversation()])
    with pytest.raises(DataError) as err:
        read_dialogues(path)
    assert "line 2:" in str(err.value) and problem in str(err.value)
    assert "--skip-bad-lines" in str(err.value)


def test_not_utf8_is_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(conversation()).encode() + b"\n" + b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        read_dialogues(path)


def test_every_bad_line_is_listed_not_just_the_first(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{", conversation(), "[]", "{}"])
    with pytest.raises(DataError) as err:
        read_dialogues(path)
    text = str(err.value)
    assert "3 bad line(s), 1 good" in text
    for n in (1, 3, 4):
        assert f"line {n}:" in text


def test_skip_bad_lines_keeps_good_ones_and_reports_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{", conversation(), conversation("q2", "a2")])
    result = read_dialogues(path, skip_bad_lines=True)
    assert len(result.conversations) == 2
    assert result.skipped and result.skipped[0][0] == 1
    assert result.line_numbers == [2, 3]


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no usable conversation"):
        read_dialogues(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_dialogues(tmp_path / "nope.jsonl")


def test_only_assistant_tokens_are_labelled(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "and you?"},
                {"role": "assistant", "content": "fine"}]
    enc = encode_conversation(tokenizer, messages, 512)
    learned = tokenizer.decode([t for t in enc.labels if t != IGNORE])
    assert learned.replace("\n", "") == "hello there<|im_end|>fine<|im_end|>"
    assert not enc.truncated
    assert len(enc.labels) == len(enc.input_ids)


def test_long_conversations_are_truncated_and_flagged(tokenizer):
    enc = encode_conversation(tokenizer, conversation("word " * 300, "ok")["messages"], 64)
    assert enc.truncated and len(enc.input_ids) == 64
    assert enc.label_count == 0  # the answer was cut off


def test_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation(f"q{i}", f"a{i}") for i in range(40)])
    a = load_local_data(str(path), tokenizer, max_len=64, validation_fraction=0.25, seed=0)
    b = load_local_data(str(path), tokenizer, max_len=64, validation_fraction=0.25, seed=0)
    assert len(a.train) == 30 and len(a.validation) == 10
    assert [e.input_ids for e in a.validation] == [e.input_ids for e in b.validation]
    train_ids = {tuple(e.input_ids) for e in a.train}
    assert not train_ids & {tuple(e.input_ids) for e in a.validation}


@pytest.mark.parametrize("conversations,fraction", [(1, 0.5), (7, 0.0), (10, 0.1), (23, 0.3), (40, 0.99)])
def test_the_count_before_a_round_is_the_training_split_without_a_tokenizer(tmp_path, tokenizer, conversations,
                                                                              fraction):
    """The budget check before a round counts the training conversations without encoding them: the same number
    that training then uses (a long conversation is truncated, never dropped; a skipped line counts in neither)."""
    rows = [conversation(f"question {i} " + "word " * (400 if i % 5 == 0 else 0)) for i in range(conversations)]
    path = write_jsonl(tmp_path / "d.jsonl", [*rows[:1], "{not json", *rows[1:]])
    loaded = load_local_data(str(path), tokenizer, max_len=64, validation_fraction=fraction, seed=0,
                             skip_bad_lines=True)
    assert count_training_conversations(str(path), validation_fraction=fraction, skip_bad_lines=True) == len(
        loaded.train) >= 1
    with pytest.raises(DataError, match="line 2"):
        count_training_conversations(str(path), validation_fraction=fraction)


def test_data_check_cli_prints_statistics(tmp_path, capsys, tiny_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation(), conversation("long " * 200, "x")])
    assert main(["data", "check", str(path), "--base-model", "tiny", "--max-seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "conversations        2" in out and "truncated at 64" in out and "1 conversation(s)" in out


def test_data_check_cli_exits_2_with_the_listing(tmp_path, capsys, tiny_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation(), "{oops"])
    assert main(["data", "check", str(path), "--base-model", "tiny"]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err


DEEP = "[" * 100_000 + "]" * 100_000  # json's decoder recurses once per level: RecursionError today


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation(), DEEP, '{"messages": ' + DEEP + "}", conversation()])
    with pytest.raises(DataError) as err:
        read_dialogues(path)
    text = str(err.value)
    assert "2 bad line(s), 2 good" in text
    assert "line 2: JSON nested too deeply" in text and "line 3: JSON nested too deeply" in text
    kept = read_dialogues(path, skip_bad_lines=True)
    assert kept.line_numbers == [1, 4]
    assert [n for n, _ in kept.skipped] == [2, 3] and all("nested too deeply" in p for _, p in kept.skipped)


def test_deeply_nested_json_in_data_check_is_a_bad_line_not_a_crash(tmp_path, tiny_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation(), DEEP])
    check = [sys.executable, "-m", "fedchat", "data", "check", str(path), "--base-model", "tiny"]
    refused = subprocess.run(check, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert refused.returncode == 2, refused.stderr
    assert "line 2: JSON nested too deeply" in refused.stderr and "Traceback" not in refused.stderr
    skipped = subprocess.run([*check, "--skip-bad-lines"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert skipped.returncode == 0, skipped.stderr
    assert "conversations        1" in skipped.stdout and "skipped line 2: JSON nested too deeply" in skipped.stdout
