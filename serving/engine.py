"""Text generation for serving: transformers' continuous batching, shared by every request.

Each served model gets one `ContinuousBatchingManager` (`model.init_continuous_batching`): a
generation thread over a paged KV cache. A request joins the running batch at the next token
boundary and leaves it when it ends, so a short answer never waits for a long one and the model
runs one forward pass per token for all of them (on 2 CPU cores, 8 requests in one batch make
about 3.5x the tokens of one). Streaming and non-streaming requests are the same generation; a
non-streaming answer is the concatenation of the streamed pieces.

What is ours on top of the manager:

* per-request sampling (serving/sampling.py): the manager has one sampling mode for the whole
  batch; greedy and sampled requests share a batch here, each sampled one with its own seed;
* stop strings and text (TextStream): the manager stops at end-of-sequence tokens and max_tokens;
  a stop string is found in the decoded text, and the request is then cancelled in the manager;
* the hand-off (Batcher): a thread takes the manager's outputs (every new token of every request)
  and turns them into text events for the request's consumer; a request whose client went away is
  cancelled in the manager at once, which frees its slot and its cache blocks at the next step;
* hot reload (Engine.swap): a new round gets a manager of its own; the old one finishes the
  requests it holds, then stops;
* recovery: a failure inside the model's forward pass ends the manager's loop and fails every
  request in it (each is logged with the traceback under its request id); the next request starts
  a fresh manager.

Greedy answers: a request batched with others runs its rows through the same matrix products as
alone, but in a larger matrix; CPU kernels may then sum in another order, so a logit can change in
its last bits and, where two tokens are within that of each other, the greedy token too
(tests/test_serving.py checks the test prompts are answered the same batched and alone).
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from serving.model import ServedModel
from serving.sampling import per_request_sampling, request_rng, sample
from shared.errors import FedchatError

log = logging.getLogger("fedchat.serve")

PAGE_TOKENS = 256  # KV cache page; a request holds whole pages
PREFILL_TOKENS = 512  # prompt tokens per forward pass: a long prompt is prefilled in chunks, between decode steps
CACHE_TOKENS_PER_REQUEST = 2048  # the default KV cache holds --max-batch requests of this many tokens


class QueueFullError(FedchatError):
    """Too many requests are waiting: the client should retry later."""


class GenerationError(FedchatError):
    """A generation failed inside the model (the log has the traceback under the request id)."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class TextStream:
    """Token ids in, text out: never splits a multi-byte character, never emits text that may turn
    out to be the start of a stop string, and cuts the text at the first stop string.

    Work per token is bounded whatever the answer's length: decoding is incremental (only the ids
    since the last emitted piece, with the piece before them as context: vLLM's scheme, exact for
    byte-level BPE tokenizers), and each stop string is matched by a Knuth-Morris-Pratt automaton fed
    the new characters only, so a character costs O(1) amortised per stop string and the text held
    back is the longest end of it that a stop string can still complete (at most that string's length).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stop if s)
        self._fail = [_failure(s) for s in self._stops]
        self._matched = [0] * len(self._stops)  # per stop string: its longest prefix the text ends with
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the context of the next piece
        self._held = ""  # decoded and scanned, not emitted: it may begin a stop string
        self.text = ""  # emitted so far
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        piece = self._piece()
        return self._scan(piece) if piece else ""

    def flush(self) -> str:
        """The text held back so far (at the end of generation)."""
        if self.stopped:
            return ""
        delta = self._scan(self._piece(final=True))
        if self.stopped:
            return delta
        rest, self._held = self._held, ""
        self.text += rest
        return delta + rest

    def _piece(self, final: bool = False) -> str:
        """The text the ids since the last piece add ("" while they end inside a character)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def _scan(self, piece: str) -> str:
        """Feed new text to the stop automata; the text that can be emitted now."""
        for i, char in enumerate(piece):
            found = 0  # the longest stop string that ends here (the answer ends where it starts)
            for k, stop in enumerate(self._stops):
                m, fail = self._matched[k], self._fail[k]
                while m and stop[m] != char:
                    m = fail[m - 1]
                if stop[m] == char:
                    m += 1
                if m == len(stop):
                    found, m = max(found, m), fail[m - 1]
                self._matched[k] = m
            if found:
                text = self._held + piece[:i + 1]
                delta, self._held, self.stopped = text[:len(text) - found], "", True
                self.text += delta
                return delta
        text = self._held + piece
        keep = max(self._matched, default=0)
        delta, self._held = text[:len(text) - keep], text[len(text) - keep:]
        self.text += delta
        return delta


def _failure(pattern: str) -> list[int]:
    """Knuth-Morris-Pratt: for each prefix of `pattern`, the length of its longest proper prefix that is
    also its suffix."""
    fail, m = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while m and pattern[i] != pattern[m]:
            m = fail[m - 1]
        if pattern[i] == pattern[m]:
            m += 1
        fail[i] = m
    return fail


@dataclass
class Generation:
    """One answer. Once it has ended, `finish_reason` is "stop" (end-of-sequence token or a stop
    string), "length" (max_tokens), "cancelled" (the client went away) or "error"."""

    prompt_ids: list[int]
    params: GenerationParams
    finish_reason: str | None = None
    completion_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Job:
    """A generation and who waits for it. `emit` is called from the engine's thread with
    ("delta", text) for each piece, then ("done", generation) or ("error", request_id)."""

    generation: Generation
    emit: Callable[[tuple], None]
    request_id: str = field(default_factory=lambda: f"gen-{secrets.token_hex(8)}")
    submitted: float = field(default_factory=time.perf_counter)
    batcher: Batcher | None = field(default=None, repr=False)  # where it runs, once submitted


class Admission:
    """A request's place in the engine, from before its body is read until its generation ends
    (Engine.admit); `release` gives it back if the request never starts (a no-op once it has)."""

    def __init__(self, engine: Engine) -> None:
        self._engine, self.taken, self._released = engine, False, False

    def release(self) -> None:
        if not (self.taken or self._released):
            self._released = True
            self._engine._release()


@dataclass
class EngineStats:
    queued: int = 0  # accepted, waiting for a place in the batch (or in its prompt's prefill)
    running: int = 0  # in the batch, generating
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    completion_tokens: int = 0
    fast_path: int = 0  # requests started alone, on the fast path
    handed_over: int = 0  # of those, requests that moved to the batch when another arrived


class _Run:
    """A job in its batcher: its text so far and where its tokens stand."""

    def __init__(self, job: Job, served: ServedModel) -> None:
        self.job, self.gen = job, job.generation
        self.text = TextStream(served.decode, self.gen.params.stop)
        self.eos = served.eos_ids
        self.rng = request_rng(self.gen.params.seed)  # its own draws, on the fast path and in the batch alike
        self.tokens: list[int] = []  # generated so far
        self.offset = 0  # tokens it had made on the fast path before it joined the manager's batch
        self.started = False  # its first token came: it is generating
        self.solo = False  # on the fast path (Batcher._solo)
        self.handover = False  # another request arrived: leave the fast path for the batch

    def take(self, tokens: list[int], finished: bool = False) -> str | None:
        """Feed the request's new tokens; its finish reason once it has ended."""
        gen = self.gen
        self.started = True
        for token in tokens:
            gen.completion_tokens += 1
            self.tokens.append(token)
            if token in self.eos:
                return "stop"
            delta = self.text.push(token)
            if delta:
                self.job.emit(("delta", delta))
            if self.text.stopped:
                return "stop"
        if gen.completion_tokens >= gen.params.max_tokens:
            return "length"
        return "stop" if finished else None


def next_token(logits, params: GenerationParams, rng) -> int:
    """The token after `logits` (the last position's scores): argmax when greedy, as `generate` picks it."""
    if params.temperature > 0:
        return sample(logits, params.temperature, params.top_p, rng)
    return int(logits.argmax())


class Batcher:
    """One served model's generation: a fast path for a request alone, transformers' continuous-batching
    manager (generation thread, paged KV cache) for requests together, and the thread that hands each
    batched request's new tokens to its job.

    The fast path: a request that arrives while the batcher holds no other runs in a thread of its own,
    by the loop `generate` runs (a DynamicCache, one forward pass per token, argmax), so its greedy answer
    is `generate`'s. When a second request arrives, the second joins the manager's batch at once and the
    first follows it at its next token: its prompt and the tokens it has made so far are prefilled in the
    batch (one chunked prefill), and it goes on there with its own generator. A request that arrives
    while others are batched joins the batch; the fast path is taken again once the batcher is empty.
    """

    def __init__(self, served: ServedModel, engine: Engine) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.served, self._engine = served, engine
        eos = sorted(served.eos_ids)
        config = GenerationConfig(do_sample=False, max_new_tokens=1, eos_token_id=eos,
                                  pad_token_id=served.tokenizer.pad_token_id)  # type: ignore[attr-defined]
        cb = ContinuousBatchingConfig(
            page_size=PAGE_TOKENS, num_blocks=math.ceil(engine.cache_tokens(served) / PAGE_TOKENS) + 1,
            max_batch_tokens=PREFILL_TOKENS, max_requests_per_batch=engine.max_batch,
            # one batch at a time, no CUDA graphs, no compile: RequestSampler samples in Python between
            # the forward pass and the argmax (serving/sampling.py)
            use_async_batching=False, use_cuda_graph=False,
            # no KV blocks reused from earlier requests: an answer must not depend on what was asked before
            allow_block_sharing=False)
        self._manager = served.model.init_continuous_batching(  # type: ignore[attr-defined]
            generation_config=config, continuous_batching_config=cb)
        self._manager.logit_processor = per_request_sampling()  # read when start() builds the batch processor
        self._runs: dict[str, _Run] = {}
        self._solo: _Run | None = None  # the request on the fast path
        self._lock = threading.Lock()
        self._retired = False  # a newer model is served: stop once idle
        self._closing = False  # the manager is asked to stop: no new requests
        self._manager.start()
        self._thread = threading.Thread(target=self._deliver, name="fedchat-outputs", daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return not self._closing and self._manager.is_running()

    @property
    def running(self) -> bool:
        return self._manager.is_running()

    def counts(self) -> tuple[int, int]:
        """(waiting, generating) requests."""
        with self._lock:
            started = sum(run.started for run in self._runs.values())
            return len(self._runs) - started, started

    def add(self, job: Job) -> bool:
        """Start the job: on the fast path when it is alone, else in the batch; False when this batcher
        takes no more requests."""
        with self._lock:
            if not self.accepting:
                return False
            run = _Run(job, self.served)
            alone = not self._runs
            if self._solo is not None:
                self._solo.handover = True
            self._runs[job.request_id] = run
            job.batcher = self
            if alone:
                self._solo, run.solo = run, True
        if alone:
            self._engine.note("fast_path")
            threading.Thread(target=self._run_solo, args=(run,), name="fedchat-solo", daemon=True).start()
            return True
        added = False
        try:
            added = self._enqueue(run)
        finally:
            if not added:  # the manager stopped in between (or refused it)
                with self._lock:
                    self._runs.pop(job.request_id, None)
        return added

    def _enqueue(self, run: _Run) -> bool:
        """Put the run in the manager's batch, with the tokens it has made already as part of its prompt."""
        gen, params = run.gen, run.gen.params
        run.offset = len(run.tokens)
        added = self._manager.add_request(
            gen.prompt_ids + run.tokens, request_id=run.job.request_id, streaming=True,
            max_new_tokens=params.max_tokens - len(run.tokens), eos_token_id=sorted(self.served.eos_ids),
            temperature=float(params.temperature), top_p=float(params.top_p), rng=run.rng)
        with self._lock:
            gone = self._runs.get(run.job.request_id) is not run
        if added is not None and gone:  # cancelled while it moved
            self._manager.cancel_request(run.job.request_id)
        return added is not None

    def _run_solo(self, run: _Run) -> None:
        """The fast path (see the class): generate until the run ends, is cancelled or must hand over."""
        import torch
        from transformers import DynamicCache

        model, gen = self.served.model, run.gen
        try:
            with torch.inference_mode():
                cache = DynamicCache(config=model.config)  # type: ignore[attr-defined]
                ids = torch.tensor([gen.prompt_ids], device=self.served.device)
                while True:
                    with self._lock:
                        if self._runs.get(run.job.request_id) is not run:  # cancelled, or failed by stop()
                            return
                        if run.handover:
                            self._solo, run.solo = None, False
                            break
                    logits = model(input_ids=ids, past_key_values=cache, use_cache=True,  # type: ignore[operator]
                                   logits_to_keep=1).logits[0, -1]
                    token = next_token(logits, gen.params, run.rng)
                    reason = run.take([token])
                    if reason is not None:
                        self._finish(run, reason)
                        return
                    ids = torch.tensor([[token]], device=ids.device)
        except Exception as exc:  # the forward pass or decoding failed: this request only
            self._fail(run, repr(exc), exc)
            return
        finally:
            with self._lock:
                if self._solo is run:
                    self._solo = None
        self._engine.note("handed_over")
        try:
            added = self._enqueue(run)
        except Exception as exc:  # noqa: BLE001 (the manager refused it: failed like any request)
            self._fail(run, repr(exc), exc)
            return
        if not added:
            self._fail(run, "the generation loop stopped")

    def cancel(self, request_id: str) -> bool:
        """Take the request out of the batch now; False when it had ended already."""
        with self._lock:
            run = self._runs.pop(request_id, None)
        if run is None:
            return False
        if not run.solo:  # the fast path sees it gone before its next token
            self._manager.cancel_request(request_id)  # its slot and cache blocks are freed before the next step
        run.gen.finish_reason = "cancelled"
        self._engine.ended(run.gen)
        self._stop_if_idle()
        return True

    def retire(self) -> None:
        """A newer model is served: finish the requests held, then stop."""
        with self._lock:
            self._retired = True
        self._stop_if_idle()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop now: requests still running end as cancelled."""
        with self._lock:
            self._closing = True
        self._manager.stop(block=True, timeout=timeout, hard_stop=True)
        self._thread.join(timeout)

    def _stop_if_idle(self) -> None:
        with self._lock:
            if not (self._retired and not self._runs and not self._closing):
                return
            self._closing = True
        # in a thread of its own: stop() waits for the generation thread, which may be delivering to us
        threading.Thread(target=self._manager.stop, kwargs={"block": True}, name="fedchat-retire", daemon=True).start()
        log.info("the model of round %s serves no request any more: its generation loop stops", self.served.round)

    def _deliver(self) -> None:
        """The manager's outputs (every new token of every request) to the jobs; ends with the manager."""
        manager = self._manager
        while True:
            output = manager.get_result(timeout=0.1)
            if output is None:
                if not manager.is_running():
                    break
                if manager.background_thread_status.fatal_error is not None:
                    time.sleep(0.01)  # it is failing its requests and ending: get_result does not wait then
                continue
            with self._lock:
                run = self._runs.get(output.request_id)
            if run is None:  # cancelled: a token it made in the step that was running
                continue
            try:
                if output.error is not None:
                    self._fail(run, output.error)
                    continue
                reason = run.take(output.generated_tokens[len(run.tokens) - run.offset:], output.is_finished())
            except Exception as exc:  # decoding failed: this request only
                self._fail(run, repr(exc), exc)
                continue
            if reason is not None:
                self._finish(run, reason)
        with self._lock:  # the loop is gone (stopped, or died before it could fail these)
            left, self._runs = list(self._runs.values()), {}
        for run in left:
            self._fail(run, "the generation loop stopped", remove=False)

    def _finish(self, run: _Run, reason: str) -> None:
        with self._lock:
            if self._runs.pop(run.job.request_id, None) is None:
                return  # cancelled meanwhile
        if reason == "stop" and run.text.stopped and not run.solo:
            self._manager.cancel_request(run.job.request_id)  # a stop string: the manager does not know it
        rest = run.text.flush()
        if rest:
            run.job.emit(("delta", rest))
        run.gen.finish_reason = reason
        self._engine.ended(run.gen)
        run.job.emit(("done", run.gen))
        self._stop_if_idle()

    def _fail(self, run: _Run, error: str, exc: BaseException | None = None, remove: bool = True) -> None:
        if remove:
            with self._lock:
                if self._runs.pop(run.job.request_id, None) is None:
                    return
        run.gen.finish_reason = "cancelled" if self._closing else "error"
        self._engine.ended(run.gen)
        if self._closing:  # the server is stopping: nobody waits for an answer
            run.job.emit(("error", run.job.request_id))
            return
        fatal = self._manager.background_thread_status.fatal_error
        log.error("%s: generation failed (%s)", run.job.request_id, error, exc_info=exc or fatal)
        run.job.emit(("error", run.job.request_id))
        self._stop_if_idle()


class Engine:
    """The served model's batcher, swapped atomically on hot reload, and the request counters.

    At most `max_batch` requests run in one batch; `max_queue` more may wait; the KV cache holds
    `kv_cache_tokens` tokens (default: see cache_tokens).
    """

    def __init__(self, served: ServedModel, max_queue: int = 64, max_batch: int = 8,
                 kv_cache_tokens: int | None = None) -> None:
        self.max_queue, self.max_batch, self.kv_cache_tokens = max_queue, max_batch, kv_cache_tokens
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stats = EngineStats()
        self._batcher = Batcher(served, self)
        self._retired: list[Batcher] = []  # older rounds' batchers, finishing their requests
        self._stopped = False

    @property
    def served(self) -> ServedModel:
        return self._batcher.served

    def cache_tokens(self, served: ServedModel) -> int:
        """The KV cache's size: --kv-cache-tokens, else room for one request at the model's full context and
        for `max_batch` requests of 2048 tokens at once (more wait, or are set aside and resumed, by the
        manager's scheduler)."""
        if self.kv_cache_tokens:
            return self.kv_cache_tokens
        return max(served.context_length, self.max_batch * min(served.context_length, CACHE_TOKENS_PER_REQUEST))

    def context_length(self, served: ServedModel) -> int:
        """The most tokens (prompt and answer) one request may hold: the model's context, or the whole
        KV cache where that is smaller."""
        return min(served.context_length, self.cache_tokens(served))

    @property
    def stats(self) -> EngineStats:
        with self._lock:
            batchers, stats = [self._batcher, *self._retired], EngineStats(**self._stats.__dict__)
        for batcher in batchers:
            waiting, generating = batcher.counts()
            stats.queued += waiting
            stats.running += generating
        return stats

    def swap(self, served: ServedModel) -> None:
        """Serve `served` from the next request on; requests already accepted finish on theirs."""
        fresh = Batcher(served, self)
        with self._lock:
            if self._stopped:  # the server is stopping: nothing more to serve
                fresh.stop()
                return
            old, self._batcher = self._batcher, fresh
            self._retired = [b for b in self._retired if b.running] + [old]
        old.retire()

    def admit(self) -> Admission:
        """A place for one more request, taken before its body is read: QueueFullError when `max_batch`
        requests generate and `max_queue` more are waiting or being read already."""
        with self._lock:
            if self._in_flight >= self.max_batch + self.max_queue:
                raise QueueFullError(f"{self._in_flight - self.max_batch} requests are already waiting "
                                     f"(--max-queue {self.max_queue}): retry shortly.")
            self._in_flight += 1
        return Admission(self)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def submit(self, job: Job, served: ServedModel | None = None, place: Admission | None = None) -> ServedModel:
        """Start the job on `served` (the model its prompt was checked against) while that model is
        served, else on the current one, in the place admitted for it (else a new one); returns the model
        it runs on. From here its place is freed when its generation ends."""
        place = place or self.admit()
        try:
            for _ in range(3):
                batcher = self._batcher_for(served)
                if batcher.add(job):
                    place.taken = True
                    return batcher.served
                served = None  # it stopped meanwhile (a newer round took over, or the model failed)
            raise GenerationError("the generation loop keeps stopping: the server's log says why.")
        finally:
            place.release()

    def _batcher_for(self, served: ServedModel | None) -> Batcher:
        """The batcher of `served` if it takes requests, else the current one (restarted after a failure)."""
        with self._lock:
            for batcher in (self._batcher, *self._retired):
                if batcher.served is served and batcher.accepting:
                    return batcher
            batcher = self._batcher
            if batcher.accepting:
                return batcher
        log.warning("the generation loop of round %s has stopped after a failure: starting a new one",
                    batcher.served.round)
        fresh = Batcher(batcher.served, self)
        with self._lock:
            if self._batcher is batcher:
                self._batcher = fresh
                return fresh
        fresh.stop()  # swapped meanwhile: the newer round's batcher serves
        return self._batcher_for(None)

    def cancel(self, job: Job) -> None:
        """The client went away: free the job's slot at once (nothing happens once it has ended)."""
        if job.batcher is not None:
            job.batcher.cancel(job.request_id)

    def note(self, counter: str) -> None:
        with self._lock:
            setattr(self._stats, counter, getattr(self._stats, counter) + 1)

    def ended(self, gen: Generation) -> None:
        """A generation left the batch (called by its batcher)."""
        with self._lock:
            self._in_flight -= 1
            stats = self._stats
            stats.completion_tokens += gen.completion_tokens
            if gen.finish_reason == "cancelled":
                stats.cancelled += 1
            elif gen.finish_reason == "error":
                stats.failed += 1
            else:
                stats.completed += 1

    def run(self, gen: Generation) -> Iterator[str]:
        """The answer's text pieces, for callers without an event loop (`fedchat chat`)."""
        events: queue.Queue = queue.Queue()
        job = Job(gen, events.put)
        self.submit(job)
        try:
            while (event := events.get())[0] == "delta":
                yield event[1]
            if event[0] == "error":
                raise GenerationError(f"the generation failed: the log has the details under {job.request_id}.")
        finally:
            self.cancel(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop generating: requests still running end as cancelled."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            batchers = [self._batcher, *self._retired]
        for batcher in batchers:
            batcher.stop(timeout)
