"""Serving: a live `fedchat serve` on 127.0.0.1 driven by the official `openai` client, the
generation pieces it is built from, and `fedchat chat`.

The expected answers come from Hugging Face's own `model.generate` on the merged folders
(an implementation independent of the server's token loop).
"""

from __future__ import annotations

import os
import random
import select
import socket
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from openai import OpenAI

from server.checkpoint import RunState, publish_link, round_dir, save_checkpoint
from serving.engine import Engine, Generation, GenerationParams, TextStream
from serving.openai_schema import MAX_STOP_CHARS
from serving.sampling import request_rng, sample
from serving.served_model import ModelWatcher, load_served
from serving.serving_config import MAX_BODY_BYTES, ModelSource, ServeConfig
from shared.adapter import attach_adapter, exchanged_names, get_arrays, set_arrays
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.merge import merge_adapter
from shared.model import load_model
from tests.support.serve_process import ServeProcess

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
CPU, F32 = torch.device("cpu"), torch.float32
HELLO = [{"role": "user", "content": "Hello, who are you?"}]
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "How do plants grow?",
           "Tell me a joke.", "What is 2 + 2?", "Name three colours.", "Why is the sky blue?", "Who wrote Hamlet?"]


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir) -> Path:
    """A coordinator output folder with rounds 1 and 2 (different adapters), checkpointed and
    merged as the coordinator lays them out; OUT/merged and OUT/adapter point at round 1."""
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(base_model="tiny", aggregation="fedavg", lora_r=8)  # the old recipe: rounds that answer apart
    for rnd in (1, 2):
        model = attach_adapter(load_model(tiny_dir, CPU, F32), cfg)
        names = exchanged_names(model, "fedavg")
        rng = np.random.default_rng(rnd)
        set_arrays(model, names, [a + rng.normal(scale=0.5, size=a.shape).astype(np.float32) if ".lora_B." in n
                                  else a for n, a in zip(names, get_arrays(model, names))])
        save_checkpoint(out, RunState(run_id="test-run", config=cfg.to_flower(), round=rnd), model,
                        {"base_model": "tiny", "base_model_path": str(tiny_dir), "run_id": "test-run"})
        merge_adapter(round_dir(out, rnd), out / "models" / f"merged-round-{rnd:04d}")
    publish_link(out / "merged", out / "models" / "merged-round-0001")
    publish_link(out / "adapter", round_dir(out, 1))
    return out


def merged(run_dir: Path, rnd: int) -> Path:
    return run_dir / "models" / f"merged-round-{rnd:04d}"


class Oracle:
    """Greedy answers from transformers' model.generate on a merged folder."""

    def __init__(self, folder: Path, tokenizer) -> None:
        self.model, self.tokenizer = load_model(folder, CPU, F32), tokenizer

    def ids(self, messages, max_tokens: int) -> list[int]:
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return out[0, enc["input_ids"].shape[1]:].tolist()

    def answer(self, messages, max_tokens: int) -> str:
        return self.tokenizer.decode(self.ids(messages, max_tokens), skip_special_tokens=True)


@pytest.fixture(scope="module")
def oracles(run_dir, tokenizer) -> dict[int, Oracle]:
    return {rnd: Oracle(merged(run_dir, rnd), tokenizer) for rnd in (1, 2)}


class LiveServer(ServeProcess):
    """`fedchat serve ...` on 127.0.0.1 (tests/support/serve_process.py), with the test's clients."""

    def health(self) -> dict:
        """/health with the key: the counters too."""
        return httpx.get(f"{self.url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()

    def client(self, key: str | None = KEY, **kw) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=180, **kw)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """Serves round 1's merged folder with an API key from the environment variable."""
    srv = LiveServer(["--model", str(merged(run_dir, 1))], tmp_path_factory.mktemp("logs") / "serve.log",
                     env={"FEDCHAT_API_KEY": KEY})
    yield srv
    srv.stop()


def ask(client: OpenAI, content: str, max_tokens: int = 24, **kw):
    return client.chat.completions.create(model="fedchat", messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, **kw)


def streamed(client: OpenAI, content: str, max_tokens: int = 24, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(
        model="fedchat", messages=[{"role": "user", "content": content}], max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ----------------------------------------------------------------- the live server

@pytest.mark.slow
def test_plain_answer_is_the_models_greedy_answer(server, oracles, tokenizer):
    reply = server.client().chat.completions.create(model="fedchat", messages=HELLO, max_tokens=20, temperature=0)
    expected = oracles[1].ids(HELLO, 20)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")
    prompt = len(tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)["input_ids"])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt, len(expected), prompt + len(expected))
    assert reply.model == "fedchat" and reply.system_fingerprint == "fedchat-round-1"


@pytest.mark.slow
def test_streamed_answer_equals_plain_answer(server):
    client = server.client()
    for prompt in PROMPTS[:3]:
        plain = ask(client, prompt, max_tokens=40, temperature=0)
        text, chunks = streamed(client, prompt, max_tokens=40, temperature=0)
        assert text == plain.choices[0].message.content
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    # sampling is reproducible with a seed, streamed or not
    a = ask(client, PROMPTS[0], max_tokens=30, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    b, _ = streamed(client, PROMPTS[0], max_tokens=30, temperature=1.0, top_p=0.9, seed=7)
    c = ask(client, PROMPTS[0], max_tokens=30, temperature=1.0, top_p=0.9, seed=8).choices[0].message.content
    assert a == b and a != c


@pytest.mark.slow
def test_stop_strings_cut_the_answer(server):
    client = server.client()
    full = ask(client, PROMPTS[1], max_tokens=40, temperature=1.0, seed=3).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    reply = ask(client, PROMPTS[1], max_tokens=40, temperature=1.0, seed=3, stop=[stop, "never-said"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (cut, "stop")
    text, _ = streamed(client, PROMPTS[1], max_tokens=40, temperature=1.0, seed=3, stop=stop)
    assert text == cut


@pytest.mark.slow
def test_models_show_the_served_round(server, run_dir):
    client = server.client()
    [card] = client.models.list().data
    assert card.id == "fedchat" and card.round == 1 and card.run_id == "test-run"
    assert client.models.retrieve("fedchat").round == 1
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.slow
def test_errors_have_openais_status_and_body(server):
    with pytest.raises(openai.AuthenticationError) as wrong:
        ask(server.client(key="not-the-key"), "hi")
    assert error_of(wrong.value)["code"] == "invalid_api_key"
    missing = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "fedchat", "messages": HELLO})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401

    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad_json = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "fedchat", "messages": [',
                          headers=auth)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"

    client = server.client()
    cases = [({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
             ({"messages": HELLO, "temperature": 3.5}, "temperature"),
             ({"messages": HELLO, "temperature": -1}, "temperature"),
             ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
             ({"messages": HELLO, "top_p": 0}, "top_p"),
             ({"messages": HELLO, "n": 2}, "n"),
             ({"messages": []}, "messages")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="fedchat", **kwargs)
        assert error_of(bad.value)["param"] == param, kwargs

    long = [{"role": "user", "content": "hello " * 2100}]  # the tiny model's context is 2048 tokens
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="fedchat", messages=long, max_tokens=10)
    err = error_of(too_long.value)
    assert err["code"] == "context_length_exceeded" and "2048" in err["message"]
    with pytest.raises(openai.BadRequestError) as too_much:
        client.chat.completions.create(model="fedchat", messages=HELLO, max_tokens=2040)
    assert error_of(too_much.value)["code"] == "context_length_exceeded"

    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert error_of(unknown.value)["code"] == "model_not_found"
    route = httpx.get(f"{server.url}/v1/nope")
    assert route.status_code == 404 and route.json()["error"]["code"] == "unknown_url"
    assert server.health()["failed"] == 0


@pytest.mark.slow
def test_batched_greedy_answers_are_the_answers_given_alone(server):
    """Eight users at once, each with its own `openai` client, prompt and max_tokens, half of them
    streaming: they share the batch, and each greedy answer is exactly the one its prompt gets alone.
    Two more users in the same batch sample (seeded): the batch honours each request's settings."""
    client = server.client()
    limits = {i: 20 + 3 * i for i in range(len(PROMPTS))}
    alone = {i: ask(client, p, max_tokens=limits[i], temperature=0).choices[0].message.content
             for i, p in enumerate(PROMPTS)}
    assert len(set(alone.values())) == len(PROMPTS)  # all different: a mix-up between requests would show
    results: dict = {}
    busiest = 0

    def user(i: int) -> None:
        own = _client_at(server, f"127.0.0.{20 + i}")  # one client (address, connection pool) per user
        prompt = PROMPTS[i % len(PROMPTS)]
        settings = {"temperature": 0} if i < len(PROMPTS) else {"temperature": 1.0, "seed": i, "top_p": 0.95}
        try:
            if i % 2:
                text, chunks = streamed(own, prompt, max_tokens=limits[i % len(PROMPTS)], **settings)
                results[i] = (text, chunks[-1].usage.completion_tokens)
            else:
                reply = ask(own, prompt, max_tokens=limits[i % len(PROMPTS)], **settings)
                results[i] = (reply.choices[0].message.content, reply.usage.completion_tokens)
        except Exception as exc:  # noqa: BLE001 (reported below)
            results[i] = exc

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(PROMPTS) + 2)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        busiest = max(busiest, server.health()["running"])
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    assert {i: results[i][0] if isinstance(results[i], tuple) else results[i] for i in alone} == alone
    assert busiest >= 2  # requests generated together, not one after the other
    for i in (len(PROMPTS), len(PROMPTS) + 1):  # sampled in the same batch: its own answer, within its max_tokens
        text, tokens = results[i]
        assert text != alone[i % len(PROMPTS)] and 1 <= tokens <= limits[i % len(PROMPTS)]
    assert server.health()["failed"] == 0


@pytest.mark.slow
def test_client_disconnecting_mid_stream_frees_its_slot(server):
    client = server.client()
    before = server.health()
    stream = client.chat.completions.create(model="fedchat", messages=HELLO, max_tokens=1900, temperature=0,
                                            stream=True)
    pieces = 0
    for chunk in stream:
        pieces += bool(chunk.choices and chunk.choices[0].delta.content)
        if pieces == 3:
            break
    stream.close()  # the client goes away with ~1900 tokens still to generate
    deadline = time.monotonic() + 10
    while (health := server.health())["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["cancelled"] == before["cancelled"] + 1 and health["running"] == 0
    assert health["completion_tokens"] - before["completion_tokens"] < 950  # stopped early, not at 1900
    assert ask(client, "Are you free?", max_tokens=8, temperature=0).usage.completion_tokens >= 1
    assert server.health()["failed"] == before["failed"]


@pytest.mark.slow
def test_a_request_alone_takes_the_fast_path_and_moves_to_the_batch_when_another_arrives(server, oracles):
    """Alone, a request is generated by `generate`'s own loop (its greedy answer is `generate`'s); when a
    second arrives mid-answer, both finish in the batch, each with its own greedy answer, and a client that
    leaves after the move frees its place in the batch."""
    client = server.client()
    first, second = [{"role": "user", "content": PROMPTS[2]}], [{"role": "user", "content": PROMPTS[3]}]
    before = server.health()
    # a long first answer: on a loaded machine the server could finish a short one before the client, 4 chunks
    # in, gets the second request to it (then both run alone, on the fast path)
    stream = client.chat.completions.create(model="fedchat", messages=first, max_tokens=600, temperature=0,
                                            stream=True)
    pieces: list[str] = []
    other: dict = {}
    joined = threading.Thread(target=lambda: other.update(reply=client.chat.completions.create(
        model="fedchat", messages=second, max_tokens=20, temperature=0)))
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        if len(pieces) == 4:  # three tokens in: a second user arrives
            joined.start()
    joined.join(60)
    health = server.health()
    assert "".join(pieces) == oracles[1].answer(first, 600)
    assert other["reply"].choices[0].message.content == oracles[1].answer(second, 20)
    assert health["fast_path"] == before["fast_path"] + 1 and health["handed_over"] == before["handed_over"] + 1
    assert health["completed"] == before["completed"] + 2 and health["failed"] == before["failed"]

    # leaving after the move: the batch lets it go (its place is freed, nothing fails)
    stream = client.chat.completions.create(model="fedchat", messages=first, max_tokens=1900, temperature=0,
                                            stream=True)
    joined = threading.Thread(target=lambda: ask(client, PROMPTS[3], max_tokens=4, temperature=0))
    for n, _ in enumerate(stream):
        if n == 3:
            joined.start()
            joined.join(60)
        if n == 8:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while (health := server.health())["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["cancelled"] == before["cancelled"] + 1 and health["running"] == 0
    assert health["handed_over"] == before["handed_over"] + 2 and health["failed"] == before["failed"]


@pytest.mark.slow
def test_stop_strings_are_capped(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as too_long:
        ask(client, "hi", stop="x" * (MAX_STOP_CHARS + 1))
    assert error_of(too_long.value)["param"] == "stop" and str(MAX_STOP_CHARS) in error_of(too_long.value)["message"]
    with pytest.raises(openai.BadRequestError) as too_many:
        ask(client, "hi", stop=["a", "b", "c", "d", "e"])
    assert error_of(too_many.value)["param"] == "stop"
    # the most a request may ask for: answered like a request without stop strings (none of them is said)
    most = [c * MAX_STOP_CHARS for c in "#@~^"]
    plain = ask(client, PROMPTS[0], max_tokens=30, temperature=0)
    reply = ask(client, PROMPTS[0], max_tokens=30, temperature=0, stop=most)
    assert reply.choices[0].message.content == plain.choices[0].message.content
    assert reply.usage.completion_tokens == plain.usage.completion_tokens


@pytest.fixture(scope="module")
def small_server(run_dir, tmp_path_factory):
    """Room for two requests (one generating, one waiting), short read deadlines."""
    srv = LiveServer(["--model", str(merged(run_dir, 1)), "--max-batch", "1", "--max-queue", "1",
                      "--header-timeout", "1", "--body-timeout", "2"],
                     tmp_path_factory.mktemp("logs") / "small.log", env={"FEDCHAT_API_KEY": KEY})
    yield srv
    srv.stop()


HEAD = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def _raw(server: LiveServer, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(data)
    return sock


def _wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.slow
def test_a_full_server_refuses_before_reading_the_body(small_server):
    """A queue flood: with every place taken, a request gets 503 queue_full with Retry-After as soon as its
    headers are in, though its body never comes; the places come back when their clients leave."""
    client = small_server.client()
    before = small_server.health()
    streams = []
    for _ in range(2):  # one generating, one waiting: the server is full
        stream = client.chat.completions.create(model="fedchat", messages=HELLO, max_tokens=1900, stream=True)
        next(iter(stream))  # its role chunk: it was admitted
        streams.append(stream)
    flood = _raw(small_server, (HEAD + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000000\r\n\r\n").encode())
    with flood:
        answer = _http_response(flood)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 2" in head.lower() and b"queue_full" in body
    with pytest.raises(openai.InternalServerError) as refused:  # the official client sees the same
        ask(client, "hi", max_tokens=2)
    assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "2"
    for stream in streams:
        stream.close()
    _wait_for(lambda: small_server.health()["cancelled"] == before["cancelled"] + 2, "the places were not freed")
    assert ask(client, "Room now?", max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.slow
def test_slow_clients_lose_their_place(small_server):
    """A body that does not come within --body-timeout gets 408 and frees its place; a connection that
    does not finish its headers within --header-timeout is closed, having held no place at all."""
    before = small_server.health()
    head = (HEAD + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n").encode()
    slow = [_raw(small_server, head + b'{"model": "fedchat", ') for _ in range(2)]  # and never the rest
    try:
        _wait_for(lambda: _refused(small_server), "the two slow bodies did not take the two places")
        for sock in slow:
            answer = _http_response(sock)
            assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
            assert sock.recv(1) == b""  # and the connection is closed
    finally:
        for sock in slow:
            sock.close()
    with _raw(small_server, HEAD.encode()[:40]) as trickle:  # half a request line, then nothing
        assert trickle.recv(1024) == b""  # closed without an answer
    reply = ask(small_server.client(), "Your turn.", max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    health = small_server.health()
    assert health["completed"] >= before["completed"] + 1 and health["failed"] == before["failed"]


def _refused(server: LiveServer) -> bool:
    """True when the server is full: a request gets 503."""
    try:
        ask(server.client(), "hi", max_tokens=1)
    except openai.InternalServerError as exc:
        return exc.status_code == 503
    return False


@pytest.fixture(scope="module")
def fair_server(run_dir, tmp_path_factory):
    """One batch slot, four places, two places per client; behind a (pretend) proxy that names clients in
    X-Forwarded-For."""
    srv = LiveServer(["--model", str(merged(run_dir, 1)), "--max-batch", "1", "--max-queue", "3",
                      "--max-client-requests", "2", "--client-header", "X-Forwarded-For"],
                     tmp_path_factory.mktemp("logs") / "fair.log", env={"FEDCHAT_API_KEY": KEY})
    yield srv
    srv.stop()


def _client_at(server: LiveServer, address: str, **headers: str) -> OpenAI:
    """A client whose connections come from `address` (any 127.x.y.z reaches the server on loopback)."""
    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=180, default_headers=headers,
                  http_client=httpx.Client(transport=httpx.HTTPTransport(local_address=address)))


def _admitted(client: OpenAI):
    """A long streamed request, once the server has admitted it (its role chunk came)."""
    stream = client.chat.completions.create(model="fedchat", messages=HELLO, max_tokens=1900, temperature=0,
                                            stream=True)
    chunks = iter(stream)
    next(chunks)
    return stream, chunks


@pytest.mark.slow
def test_one_client_cannot_take_the_places_and_slots_of_others(fair_server):
    """A client that sends more than its share (--max-client-requests) gets 429 with Retry-After before its
    body is read, while other clients are still admitted; when a slot frees, a client waiting with one
    request gets it before a client that has had one (round robin), and a client's ended request gives
    its place back."""
    a, b = _client_at(fair_server, "127.0.0.2"), _client_at(fair_server, "127.0.0.3")
    before = fair_server.health()
    a1 = _admitted(a)
    next(a1[1])  # generating: it holds the one slot
    a2 = _admitted(a)  # waiting

    with pytest.raises(openai.RateLimitError) as over:  # a third from the same address
        ask(a, "One more?", max_tokens=2)
    assert over.value.status_code == 429 and over.value.response.headers["retry-after"] == "2"
    assert error_of(over.value)["code"] == "rate_limit_exceeded"
    assert "--max-client-requests 2" in error_of(over.value)["message"]
    head = (HEAD + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", fair_server.port), timeout=60,
                                  source_address=("127.0.0.2", 0)) as flood:
        flood.sendall(head)  # and never the body: refused at once all the same
        assert _http_response(flood).startswith(b"HTTP/1.1 429")

    b1 = _admitted(b)  # another client is admitted while the first is at its cap
    assert (fair_server.health()["running"], fair_server.health()["queued"]) == (1, 2)
    a1[0].close()  # the slot frees: b1 (its client holds none yet) takes it before a2 (whose client just had one)
    next(b1[1])
    assert (fair_server.health()["running"], fair_server.health()["queued"]) == (1, 1)  # a2 still waits
    a3 = _admitted(a)  # a1's place came back to its client

    # behind a proxy: the address it names in X-Forwarded-For (the last item) is the client
    proxied = _admitted(_client_at(fair_server, "127.0.0.2", **{"X-Forwarded-For": "203.0.113.5, 198.51.100.7"}))
    with pytest.raises(openai.InternalServerError) as full:  # four places taken: the server is full
        ask(_client_at(fair_server, "127.0.0.4"), "Room?", max_tokens=2)
    assert full.value.status_code == 503 and error_of(full.value)["code"] == "queue_full"
    for stream, _ in (a2, b1, a3, proxied):
        stream.close()
    _wait_for(lambda: fair_server.health()["cancelled"] == before["cancelled"] + 5, "the places were not freed")
    health = fair_server.health()
    assert (health["running"], health["queued"], health["failed"]) == (0, 0, before["failed"])
    assert ask(a, "Room now?", max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.slow
def test_hot_reload_during_traffic(run_dir, oracles, tmp_path):
    srv = LiveServer(["--watch", str(run_dir), "--watch-interval", "0.2"], tmp_path / "serve.log")
    try:
        client = srv.client(key="any")  # no key required
        assert client.models.list().data[0].round == 1
        expected = {rnd: oracles[rnd].answer([{"role": "user", "content": PROMPTS[0]}], 24) for rnd in (1, 2)}
        assert expected[1] != expected[2]  # the two rounds answer differently
        stop, answers, errors = threading.Event(), [], []

        def user(i: int) -> None:
            own = srv.client(key="any")
            while not stop.is_set():
                try:
                    if i % 2:
                        reply = ask(own, PROMPTS[0], temperature=0)
                        answers.append((reply.system_fingerprint, reply.choices[0].message.content))
                    else:
                        text, chunks = streamed(own, PROMPTS[0], temperature=0)
                        answers.append((chunks[0].system_fingerprint, text))
                except Exception as exc:  # noqa: BLE001 (asserted below)
                    errors.append(exc)

        users = [threading.Thread(target=user, args=(i,)) for i in range(3)]
        for t in users:
            t.start()
        while len(answers) < 6 and not errors:
            time.sleep(0.05)
        publish_link(run_dir / "merged", merged(run_dir, 2))  # the coordinator publishes round 2
        deadline = time.monotonic() + 30
        while client.models.list().data[0].round != 2:
            assert time.monotonic() < deadline, srv.log.read_text()
            time.sleep(0.1)
        served_before = len(answers)
        while len(answers) < served_before + 6 and not errors:
            time.sleep(0.05)
        stop.set()
        for t in users:
            t.join(60)
        assert not errors
        by_round = {"fedchat-round-1": expected[1], "fedchat-round-2": expected[2]}
        assert {fp for fp, _ in answers} == set(by_round)
        assert all(text == by_round[fp] for fp, text in answers)  # complete, and from one model each
        assert srv.health()["failed"] == 0
    finally:
        srv.stop()
        publish_link(run_dir / "merged", merged(run_dir, 1))


# ----------------------------------------------------------------- what the server gives away, and to whom


@pytest.mark.slow
def test_health_without_a_key_reveals_no_paths(server, run_dir):
    public = {"status": "ok", "model": "fedchat", "round": 1}
    assert httpx.get(f"{server.url}/health").json() == public
    assert httpx.get(f"{server.url}/health", headers={"Authorization": "Bearer not-the-key"}).json() == public
    with_key = httpx.get(f"{server.url}/health", headers={"Authorization": f"Bearer {KEY}"})
    assert with_key.json().items() >= public.items() and "failed" in with_key.json()
    cards = server.client().models.list().model_dump_json()
    for text in (with_key.text, cards):  # no path of this machine, even to key holders
        assert str(run_dir) not in text and str(REPO) not in text and os.sep + "tmp" not in text


@pytest.mark.slow
def test_an_oversized_request_body_is_refused_with_413(server):
    assert ServeConfig(model="m").max_body_bytes == MAX_BODY_BYTES == 1 << 20
    with pytest.raises(openai.APIStatusError) as big:  # the official client, a body just over 1 MiB
        ask(server.client(), "x" * MAX_BODY_BYTES)
    assert big.value.status_code == 413 and error_of(big.value)["code"] == "request_too_large"
    assert str(MAX_BODY_BYTES) in error_of(big.value)["message"]

    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\n")
    # a Content-Length of 1 TB is refused before a byte of it is sent: the server does not wait for it
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall((head + f"Content-Length: {10**12}\r\n\r\n").encode())
        answer = _http_response(sock)
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer

    # a chunked body (no length given, and never ending) is counted as it streams and refused once
    # past the limit: a server that waited for the end of the body would never answer
    chunk = b"x" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        while sent < 16 * MAX_BODY_BYTES and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server closed the connection after answering
                break
            sent += len(chunk)
        answer = _http_response(sock)
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
    assert MAX_BODY_BYTES < sent < 16 * MAX_BODY_BYTES  # it answered while the body was still coming
    assert ask(server.client(), "Still there?", max_tokens=2).usage.completion_tokens >= 1


def _http_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    return data


@pytest.mark.slow
def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(server, tokenizer):
    """~900 kB of text holds more tokens than the context whatever they are (no token stands for more
    than the vocabulary's longest string): refused without tokenizing it; one that might fit is tokenized,
    off the event loop, and refused with its count. /health answers all along."""
    rng = random.Random(0)
    text = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(130_000))
    assert len(text.encode()) < MAX_BODY_BYTES - 1000
    longest = max(len(t) for t in tokenizer.get_vocab())
    assert len(text) > 2048 * longest  # the tiny model's context, 2048 tokens
    outcome: dict = {}

    def big(content: str, key: str) -> None:
        try:
            ask(server.client(), content, max_tokens=1)
        except openai.BadRequestError as exc:
            outcome[key] = error_of(exc)

    with httpx.Client(base_url=server.url, timeout=30) as probe:
        for content, key in ((text, "huge"), (text[:2048 * 12], "long")):
            thread = threading.Thread(target=big, args=(content, key))
            thread.start()
            while thread.is_alive():
                assert probe.get("/health").status_code == 200
            thread.join()
    assert outcome["huge"]["code"] == "context_length_exceeded"
    counted = int(outcome["huge"]["message"].split("at least ")[1].split()[0])  # counted, not tokenized
    assert len(text) // longest <= counted < len(text) // 5  # a bound from its length, not its tokens (~5 a word)
    assert outcome["long"]["code"] == "context_length_exceeded" and "in the messages" in outcome["long"]["message"]


@pytest.fixture(scope="module")
def mismatched_model(tmp_path_factory, tiny_dir, tokenizer) -> Path:
    """An operator's mistake: a model folder whose weights know 1,000 token ids and whose tokenizer
    makes 49,152. It loads and starts; generating from most prompts fails inside torch."""
    from transformers import AutoConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("mismatched")
    config = AutoConfig.from_pretrained(tiny_dir)
    config.vocab_size = 1000
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_a_500_does_not_echo_exception_text(mismatched_model, tmp_path):
    srv = LiveServer(["--model", str(mismatched_model)], tmp_path / "serve.log", env={"FEDCHAT_API_KEY": KEY})
    try:
        client = srv.client()
        with pytest.raises(openai.InternalServerError) as failed:
            ask(client, "Hello, who are you?")
        err = error_of(failed.value)
        request_id = failed.value.response.headers["x-request-id"]
        assert (err["type"], err["code"]) == ("server_error", "internal_error") and request_id in err["message"]
        with pytest.raises(openai.APIError) as in_stream:  # the status line was sent: the error is a chunk
            streamed(client, "Hello, who are you?")
        stream_id = in_stream.value.body["message"].split("request id ")[1].split(" ")[0]
        log_text = srv.log.read_text()
        for message in (err["message"], in_stream.value.body["message"]):
            assert "index out of range" not in message and "Error" not in message and os.sep not in message
        for rid in (request_id, stream_id):  # what the client got leads the operator to the traceback
            logged = log_text[log_text.index(f"{rid}: generation failed"):]
            assert "Traceback" in logged and "IndexError: index out of range" in logged
        assert srv.health()["failed"] == 2
    finally:
        srv.stop()


@pytest.mark.slow
def test_requests_that_used_to_fail_inside_the_server_are_400s(server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    deep = httpx.post(f"{server.url}/v1/chat/completions", headers=auth,
                      content=b'{"model": "fedchat", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as seed:
        ask(server.client(), "hi", seed=2**64)  # torch's generator cannot take it
    assert error_of(seed.value)["param"] == "seed"
    before = server.health()["failed"]
    reply = ask(server.client(), "hi", max_tokens=4, temperature=1e-45)  # logits / 1e-45 overflow
    assert reply.usage.completion_tokens >= 1 and server.health()["failed"] == before


# ----------------------------------------------------------------- fedchat chat


@pytest.mark.slow
def test_chat_command_with_a_model_folder(run_dir, oracles):
    first = oracles[1].answer([{"role": "user", "content": "Hello"}], 8)
    second = oracles[1].answer([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "And then?"}], 8)
    cmd = [sys.executable, "-m", "fedchat", "chat", "--model", str(merged(run_dir, 1)), "--temperature", "0",
           "--max-tokens", "8"]
    done = subprocess.run(cmd, input="Hello\nAnd then?\n/exit\nnever read\n", capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{first}\n{second}\n"
    at_eof = subprocess.run(cmd, input="Hello\n", capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (at_eof.returncode, at_eof.stdout) == (0, f"{first}\n")


@pytest.mark.slow
def test_chat_command_with_a_running_server(server, oracles):
    done = subprocess.run(
        [sys.executable, "-m", "fedchat", "chat", "--url", f"{server.url}/v1", "--temperature", "0",
         "--max-tokens", "8"], input="Hello\n", capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "FEDCHAT_API_KEY": KEY})
    assert done.returncode == 0, done.stderr
    assert done.stdout == oracles[1].answer([{"role": "user", "content": "Hello"}], 8) + "\n"
    wrong = subprocess.run([sys.executable, "-m", "fedchat", "chat", "--url", server.url, "--api-key", "nope"],
                           input="Hello\n", capture_output=True, text=True, cwd=REPO, timeout=120)
    assert wrong.returncode == 2 and "401" in wrong.stderr


# ----------------------------------------------------------------- the pieces, in process


def test_text_stream_never_splits_characters_or_leaks_a_stop_string(tokenizer):
    text = "Grüße aus Köln 👋🏽, 東京は晴れ. Fine? END of it"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decode = lambda i: tokenizer.decode(i, skip_special_tokens=True)  # noqa: E731
    stream = TextStream(decode)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    stopping = TextStream(decode, ("END", "Fine!"))
    pieces = []
    for t in ids:
        pieces.append(stopping.push(t))
        if stopping.stopped:
            break
    assert stopping.stopped and "".join(pieces) == text[:text.index("END")]
    assert not any("E" in p for p in pieces)  # never streamed a piece of the stop string


def test_text_stream_work_per_token_is_bounded(tokenizer):
    """Each token decodes only the ids since the last piece (and that piece), and the text held back is
    never more than a stop string can still complete, however long the answer and the stop strings."""
    text = "Grüße aus Köln 👋🏽, 東京は晴れ. " * 40
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows: list[int] = []

    def decode(i: list[int]) -> str:
        windows.append(len(i))
        return tokenizer.decode(i, skip_special_tokens=True)

    stops = tuple(c * MAX_STOP_CHARS for c in "#@~") + ("Köln 👋🏽, 東京は晴れ. Grüße aus Köln 👋🏽, 東京は晴れ. !",)
    stream = TextStream(decode, stops)
    pieces = []
    for n, t in enumerate(ids, 1):
        pieces.append(stream.push(t))
        decoded = tokenizer.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd")
        assert len(decoded) - len(stream.text) < max(map(len, stops))  # held back: what a stop may still complete
    assert "".join(pieces) + stream.flush() == text and not stream.stopped
    assert len(ids) > 400 and max(windows) <= 8  # never the whole answer


def _first_stop(text: str, stops: tuple[str, ...]) -> str:
    """The answer cut at the stop string that ends first (the longest of those ending there)."""
    hits = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not hits:
        return text
    end, minus = min(hits)
    return text[:end + minus]


def test_text_stream_cuts_at_the_first_stop_string_like_a_search_of_the_whole_text():
    rng = random.Random(1)
    decode = lambda ids: "".join(map(chr, ids))  # noqa: E731 (one character a token)
    for _ in range(400):
        text = "".join(rng.choices("ab", k=rng.randint(0, 30)))
        stops = tuple("".join(rng.choices("ab", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 4)))
        stream = TextStream(decode, stops)
        out = []
        for char in text:
            out.append(stream.push(ord(char)))
            if stream.stopped:
                break
        out.append(stream.flush())
        assert "".join(out) == _first_stop(text, stops), (text, stops)
        assert stream.stopped == (_first_stop(text, stops) != text)


def test_sampling_keeps_every_bit_of_the_seed_and_stays_in_the_nucleus():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def draws(seed: int, temperature: float = 1.0, top_p: float = 1.0) -> list[int]:
        rng = request_rng(seed)
        return [sample(logits, temperature, top_p, rng) for _ in range(30)]

    assert draws(1) == draws(1) and draws(1) != draws(1 + 2**32) and draws(-1) != draws(1)  # 64-bit seeds
    probs = torch.softmax(logits, dim=-1)
    top5 = torch.topk(probs, 5)
    nucleus = float(top5.values.sum()) - 1e-6  # the five likeliest tokens and no other
    assert set(draws(3, top_p=nucleus)) <= set(top5.indices.tolist()) and len(set(draws(3, top_p=nucleus))) > 1
    assert set(draws(4, temperature=1e-45)) == {int(logits.argmax())}  # no NaN from logits / 1e-45


def test_adapter_source_answers_like_its_merged_folder(run_dir):
    params = GenerationParams(max_tokens=16)
    via_adapter = load_served(ModelSource("adapter", run_dir / "checkpoints" / "round-0002"), CPU, F32)
    via_merged = load_served(ModelSource("merged", merged(run_dir, 2)), CPU, F32)
    assert (via_adapter.round, via_merged.round) == (2, 2)
    prompt = via_merged.encode_chat(HELLO)
    answers = []
    for served in (via_adapter, via_merged):
        engine = Engine(served, max_batch=1)
        try:
            answers.append("".join(engine.run(Generation(prompt, params))))
        finally:
            engine.stop()
    assert answers[0] == answers[1]


def test_watcher_loads_each_newly_published_round(run_dir):
    seen = []
    link = run_dir / "adapter"
    watcher = ModelWatcher(ModelSource("adapter", link), lambda src: load_served(src, CPU, F32), seen.append, 1.0)
    try:
        assert watcher.check() is False  # what the link points at when watching starts is not news
        publish_link(link, run_dir / "checkpoints" / "round-0002")
        assert watcher.check() is True and watcher.check() is False
        assert [s.round for s in seen] == [2]
    finally:
        publish_link(link, run_dir / "checkpoints" / "round-0001")


def test_serve_config_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="nothing to serve"):
        ServeConfig()
    with pytest.raises(ConfigError, match="not both"):
        ServeConfig(model="a", adapter="b")
    with pytest.raises(ConfigError, match="--max-body-bytes must be at least 1024"):
        ServeConfig(model="m", max_body_bytes=100)
    with pytest.raises(ConfigError, match="--max-client-requests must be at least 1"):
        ServeConfig(model="m", max_client_requests=0)
    with pytest.raises(ConfigError, match="not an HTTP header name"):
        ServeConfig(model="m", client_header="X Forwarded For")
    with pytest.raises(ConfigError, match="neither 'merged' nor 'adapter'"):
        ServeConfig(watch=str(tmp_path)).source()
    monkeypatch.setenv("FEDCHAT_API_KEY", "from-env")
    assert ServeConfig.from_env(model="m").api_key == "from-env"
    assert ServeConfig.from_env(model="m", api_key="given").api_key == "given"
