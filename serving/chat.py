"""`fedchat chat`: an interactive chat in the terminal, with a model folder loaded in this
process or with a running `fedchat serve` (any OpenAI-compatible server, in fact).

Lines typed are user turns; the answer streams back. `/reset` starts a new conversation,
`/exit` (or end of input, Ctrl-D) leaves.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TextIO

from serving.engine import Engine, Generation, GenerationError, GenerationParams
from serving.served_model import ServedModel
from shared.errors import FedchatError

HELP = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) leaves."


class ChatError(FedchatError):
    """One turn of the chat failed (the chat goes on)."""


class LocalChat:
    """Answers from a model loaded in this process (the server's engine, without HTTP)."""

    def __init__(self, served: ServedModel) -> None:
        self.served, self.engine = served, Engine(served, max_batch=1)
        self.name = f"{served.path.name} (round {served.round})" if served.round is not None else served.path.name

    def reply(self, messages: list[dict], params: GenerationParams) -> Iterator[str]:
        prompt_ids = self.served.encode_chat(messages)
        room = self.engine.context_length(self.served) - len(prompt_ids)
        if room < 1:
            raise ChatError(f"the conversation ({len(prompt_ids)} tokens) fills the model's context "
                            f"({self.engine.context_length(self.served)}): /reset to start over.")
        try:
            yield from self.engine.run(Generation(prompt_ids, dataclasses.replace(
                params, max_tokens=min(params.max_tokens, room))))
        except GenerationError as exc:
            raise ChatError(str(exc)) from None

    def close(self) -> None:
        self.engine.stop()


class RemoteChat:
    """Answers from an OpenAI-compatible server, streamed over server-sent events (stdlib only)."""

    def __init__(self, url: str, api_key: str | None, model: str | None = None, timeout: float = 600.0) -> None:
        url = url.rstrip("/")
        self.base = url if url.endswith("/v1") else f"{url}/v1"
        self.api_key, self.timeout = api_key, timeout
        self.name = model or self._first_model()

    def _request(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=headers,
                                     method="GET" if body is None else "POST")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 (a URL the user gave)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise ChatError(f"the server answered {exc.code}: {message}") from None
        except urllib.error.URLError as exc:
            raise FedchatError(f"cannot reach {self.base} ({exc.reason}): is `fedchat serve` running there? "
                               "Check --url.") from None

    def _first_model(self) -> str:
        with self._request("/models") as resp:
            data = json.loads(resp.read()).get("data") or []
        if not data:
            raise FedchatError(f"{self.base}/models lists no model: pass --model-name.")
        return data[0]["id"]

    def reply(self, messages: list[dict], params: GenerationParams) -> Iterator[str]:
        body = {"model": self.name, "messages": messages, "stream": True, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed
        with self._request("/chat/completions", body) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ChatError(f"the server failed: {event['error'].get('message')}")
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece


def chat_loop(backend, params: GenerationParams, system: str | None = None, stdin: TextIO = sys.stdin,
              stdout: TextIO = sys.stdout) -> int:
    """Read user lines, print streamed answers; return 0 at /exit or end of input."""
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {backend.name}. {HELP}", file=stdout)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            if interactive:
                print(file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if system else []
            print("(new conversation)", file=stdout, flush=True)
            continue
        if text == "/help":
            print(HELP, file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": text})
        if interactive:
            print("assistant> ", end="", file=stdout, flush=True)
        pieces = []
        try:
            for piece in backend.reply(history, params):
                pieces.append(piece)
                print(piece, end="", file=stdout, flush=True)
        except ChatError as exc:
            history.pop()  # the turn did not happen
            print(f"\n[error: {exc}]", file=stdout, flush=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat
            print(" [stopped]", end="", file=stdout)
        print(file=stdout, flush=True)
        history.append({"role": "assistant", "content": "".join(pieces)})
