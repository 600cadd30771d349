"""fedchat eval and shared/evaluation.py: library scores, the JSON it writes, clear errors."""

import json

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from fedchat.cli import main
from shared.adapter import attach_adapter, save_adapter
from shared.config import RunConfig
from shared.evaluation import greedy_answers, last_exchange, load_heldout, text_scores
from shared.model import load_model
from tests.support.data import conversation, write_jsonl


def test_scores_are_the_libraries_on_known_strings():
    preds = ["the cat sat on the mat", "paris is the capital of france"]
    refs = ["the cat is on the mat", "paris is the capital of france"]
    s = text_scores(preds, refs)
    # LCS "the cat on the mat": 5 of 6 tokens either way -> F1 5/6; the second pair is identical
    assert s["rouge_l_per_pair"] == pytest.approx([5 / 6, 1.0])
    assert s["rouge_l"] == pytest.approx((5 / 6 + 1) / 2)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert s["rouge_l_per_pair"][0] == scorer.score(refs[0], preds[0])["rougeL"].fmeasure
    assert s["bleu"] == sacrebleu.corpus_bleu(preds, [refs]).score
    assert s["chrf"] == sacrebleu.corpus_chrf(preds, [refs]).score
    same = text_scores(["Hello there, friend."], ["Hello there, friend."])
    assert same["rouge_l"] == 1.0 and same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    assert text_scores(["xyz"], ["completely different words"])["rouge_l"] == 0.0


def test_prompt_is_everything_before_the_last_answered_user_turn(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    turns = [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    assert last_exchange(turns) == (turns[:4], "Paris.")
    assert last_exchange([{"role": "assistant", "content": "I start."}]) is None
    path = write_jsonl(tmp_path / "h.jsonl", [{"messages": turns}, {"messages": turns[-1:]}, conversation()])
    held = load_heldout(path)
    assert len(held.conversations) == 3 and held.references == ["Paris.", "Paris."]  # the 2nd has no user turn
    assert len(load_heldout(path, max_conversations=1).conversations) == 1


def test_continuous_batching_answers_as_padded_generate(tiny_dir, tokenizer):
    model = load_model(tiny_dir, torch.device("cpu"), torch.float32)
    prompts = [[{"role": "user", "content": q}] for q in ("Hi", "What is the capital of France?", "Tell me a joke")]
    continuous = greedy_answers(model, tokenizer, prompts, max_new_tokens=6, engine="continuous", progress=False)
    padded = greedy_answers(model, tokenizer, prompts, max_new_tokens=6, engine="padded", batch_size=2,
                            progress=False)
    assert continuous == padded and len(continuous) == 3


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory):
    qa = [("What is the capital of France?", "Paris is the capital of France."), ("Hi", "Hello, how are you?"),
          ("Do you like music?", "Yes, I like jazz."), ("What is 2+2?", "It is 4.")]
    return write_jsonl(tmp_path_factory.mktemp("eval") / "eval.jsonl", [conversation(q, a) for q, a in qa])


def test_eval_writes_json_with_every_field_and_a_plot(tmp_path, tiny_dir, heldout_file, capsys):
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    assert main(["eval", "tiny", "--data", str(heldout_file), "--base", "tiny", "--json", str(out), "--plot", str(png),
                 "--max-new-tokens", "4"]) == 0
    table = capsys.readouterr().out
    assert "ROUGE-L" in table and "chrF" in table and "BLEU" in table
    report = json.loads(out.read_text())
    for key in ("data", "conversations", "scored", "max_seq_len", "max_new_tokens", "engine", "decoding", "metrics",
                "model", "base", "samples"):
        assert key in report
    assert report["conversations"] == report["scored"] == 4 and report["engine"] == "continuous"
    for who in ("model", "base"):
        for key in ("name", "loss", "perplexity", "rouge_l", "bleu", "chrf", "seconds"):
            assert report[who][key] is not None
        assert report[who]["loss"] > 0 and report[who]["perplexity"] > 1
        assert 0 <= report[who]["rouge_l"] <= 1 and 0 <= report[who]["chrf"] <= 100
    assert report["model"]["loss"] == report["base"]["loss"]  # the same model twice
    for sample in report["samples"]:
        assert set(sample) == {"prompt", "reference", "model", "base", "rouge_l_model", "rouge_l_base"}
    assert png.stat().st_size > 1000


def test_eval_of_base_plus_adapter(tmp_path, tiny_dir, heldout_file):
    cfg = RunConfig(base_model="tiny")
    peft = attach_adapter(load_model(tiny_dir, torch.device("cpu"), torch.float32), cfg)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a non-zero B: the adapter changes the model
    save_adapter(peft, tmp_path / "adapter", {"base_model": "tiny"})
    out = tmp_path / "eval.json"
    assert main(["eval", "tiny", "--adapter", str(tmp_path / "adapter"), "--base", "tiny", "--data",
                 str(heldout_file), "--json", str(out), "--max-new-tokens", "2", "--engine", "padded"]) == 0
    report = json.loads(out.read_text())
    assert report["model"]["name"] == "tiny+adapter" and report["model"]["loss"] != report["base"]["loss"]


def test_bad_data_file_or_missing_model_is_a_clear_error(tmp_path, tiny_dir, heldout_file, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(), "not json", {"messages": []}])
    assert main(["eval", "tiny", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err and "line 3" in err and "refused" in err
    assert main(["eval", "tiny", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no-model"), "--data", str(heldout_file)]) == 2
    err = capsys.readouterr().err
    assert "no-model" in err and "Hugging Face model folder" in err
    assert main(["eval", "tiny", "--adapter", str(tmp_path / "no-adapter"), "--data", str(heldout_file)]) == 2
    assert "no-adapter: no such folder" in capsys.readouterr().err
    only_user = write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "assistant", "content": "Hello."}]}])
    assert main(["eval", "tiny", "--data", str(only_user)]) == 2
    assert "no conversation has a user turn answered" in capsys.readouterr().err
