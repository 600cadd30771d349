"""Text generation for serving: a token loop with a KV cache, incremental decoding, and one
generation worker that takes requests from a queue.

Why one worker and a queue: on a CPU one generation already uses every core, and a
request that runs alone produces exactly the tokens it would produce alone (batched
matrix products round differently, so batching can change greedy answers). The
worker checks for cancellation between tokens, so a client that goes away frees the
worker within one token.

The same `Generation` serves streaming and non-streaming requests (a non-streaming
answer is the concatenation of the streamed pieces), so the two are equal by
construction at temperature 0.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from serving.model import ServedModel
from shared.errors import FedchatError

log = logging.getLogger("fedchat.serve")


class QueueFullError(FedchatError):
    """The generation queue is full: the client should retry later."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class TextStream:
    """Token ids in, text out: never splits a multi-byte character, never emits text that
    may turn out to be the start of a stop string, and cuts the text at the first stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self._decode, self._stop = decode, tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decode(self.ids)
        if text.endswith("\ufffd"):  # the token ends inside a multi-byte character: wait for the rest
            return ""
        return self._advance(text, final=False)

    def flush(self) -> str:
        """The text held back so far (at the end of generation)."""
        if self.stopped or not self.ids:
            return ""
        return self._advance(self._decode(self.ids), final=True)

    def _advance(self, text: str, final: bool) -> str:
        if self._stop:
            start = max(0, len(self.text) - self._longest + 1)
            hits = [i for i in (text.find(s, start) for s in self._stop) if i != -1]
            if hits:
                text, final, self.stopped = text[:min(hits)], True, True
        end = len(text) if final else len(text) - self._held_back(text)
        delta = text[len(self.text):end]
        self.text += delta
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        for k in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0


class Generation:
    """One answer: iterate it for text pieces; afterwards `finish_reason` and the token counts are set.

    finish_reason is "stop" (end-of-sequence token or a stop string), "length" (max_tokens)
    or "cancelled" (`cancel()` was called, e.g. the client went away).
    """

    def __init__(self, served: ServedModel, prompt_ids: list[int], params: GenerationParams) -> None:
        self.served, self.prompt_ids, self.params = served, prompt_ids, params
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._cancel = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[str]:
        text = TextStream(self.served.decode, self.params.stop)
        eos = self.served.eos_ids
        for token in self._tokens():
            self.completion_tokens += 1
            if token in eos:
                self.finish_reason = "stop"
                break
            delta = text.push(token)
            if delta:
                yield delta
            if text.stopped:
                self.finish_reason = "stop"
                return
            if self._cancel.is_set():
                self.finish_reason = "cancelled"
                return
        else:
            self.finish_reason = "cancelled" if self._cancel.is_set() else "length"
        rest = text.flush()
        if rest:
            yield rest

    @torch.no_grad()
    def _tokens(self) -> Iterator[int]:
        """Sampled token ids, one forward pass each, reusing the KV cache (as model.generate does)."""
        if self._cancel.is_set():
            return
        model, device, params = self.served.model, self.served.device, self.params
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        input_ids = torch.tensor([self.prompt_ids], dtype=torch.long, device=device)
        mask = torch.ones_like(input_ids)
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        for step in range(params.max_tokens):
            token = _pick(out.logits[0, -1], params, generator)
            yield token
            if step + 1 == params.max_tokens or self._cancel.is_set():
                return
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            out = model(input_ids=torch.tensor([[token]], device=device), attention_mask=mask,
                        past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)


def _pick(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator) -> int:
    logits = logits.float()
    if params.temperature == 0:
        return int(logits.argmax())
    # shifted so the largest is 0: a tiny temperature then gives 0 and -inf (a NaN only where
    # it underflows to 0 and 0/0 meets the largest, which is then weight 1), never inf - inf
    scaled = torch.nan_to_num((logits - logits.max()) / params.temperature, nan=0.0)
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p  # keeps at least one
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


# ------------------------------------------------------------------ the worker


@dataclass
class Job:
    """A generation waiting for, or running on, the worker. `emit` is called from the worker
    thread with ("delta", text), then ("done", generation) or ("error", request_id); a failure's
    exception and traceback are logged under `request_id`, never handed to the client."""

    generation: Generation
    emit: Callable[[tuple], None]
    request_id: str = field(default_factory=lambda: f"gen-{secrets.token_hex(8)}")
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class EngineStats:
    queued: int = 0
    running: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    completion_tokens: int = 0


class Engine:
    """One generation worker thread and a bounded FIFO queue; holds the model to serve and
    swaps it atomically (a job keeps the model it was submitted with)."""

    def __init__(self, served: ServedModel, max_queue: int = 64) -> None:
        self._served = served
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.stats = EngineStats()
        self._current: Generation | None = None
        self._thread = threading.Thread(target=self._run, name="fedchat-generate", daemon=True)
        self._thread.start()

    @property
    def served(self) -> ServedModel:
        return self._served

    def swap(self, served: ServedModel) -> None:
        """Serve `served` from the next request on; requests already accepted finish on theirs."""
        self._served = served

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.stats.queued >= self.max_queue:
                raise QueueFullError(f"{self.stats.queued} requests are already waiting (--max-queue "
                                     f"{self.max_queue}): retry shortly.")
            self.stats.queued += 1
        self._jobs.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running generation and end the worker (queued jobs are dropped)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.generation.cancel()
        current = self._current
        if current is not None:
            current.cancel()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self.stats.queued -= 1
                self.stats.running = 1
            gen = self._current = job.generation
            try:
                for piece in gen:
                    job.emit(("delta", piece))
                job.emit(("done", gen))
            except Exception:  # one bad request must not stop the worker
                log.exception("%s: generation failed", job.request_id)
                with self._lock:
                    self.stats.failed += 1
                job.emit(("error", job.request_id))
            finally:
                self._current = None
                with self._lock:
                    self.stats.running = 0
                    self.stats.completion_tokens += gen.completion_tokens
                    if gen.finish_reason == "cancelled":
                        self.stats.cancelled += 1
                    elif gen.finish_reason is not None:
                        self.stats.completed += 1
