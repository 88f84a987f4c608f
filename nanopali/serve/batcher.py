"""Several users at once: a bounded queue, and one decode loop that answers a batch of requests together.

app.py makes a Job (prompt, S×S images, limits) and `submit`s it; a full queue refuses it at once
(QueueFull → 503). The decode loop (`run`, on serve.py's main thread) takes the oldest waiting job and
every waiting job that can share its loop (same sampling settings, fitting the model's positions
together, up to max_batch), runs `generate_ids` on them as one left-padded batch, and on each step
hands each row its new token: the row's text grows, its new text goes to its client's event queue, and
the row finishes on EOS, a stop string, its own max_tokens, or its client leaving (`on_token` returns the
rows to finish, nanopali/generate.py). Requests that arrive meanwhile join the next batch:
docs/serving.md#batching measures that against one request at a time.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from ..generate import generate_ids
from .chat import Ask

GATHER_S = 0.05   # the longest a batch waits for more to join: a loopback round trip of a busy Python client


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests waiting")
        self.waiting, self.retry_after = waiting, retry_after


@dataclass(eq=False)
class Job:
    """One request's row: what it asked, and what it has been answered so far."""
    ask: Ask
    images: list                    # S×S PIL images (images.fit)
    size: tuple[int, int]           # the first image's original (width, height), for boxes
    prompt_tokens: int              # its row's length: image tokens, BOS, prompt, "\n"
    max_tokens: int
    created: float                  # time.monotonic() when its request arrived; every time below is on that clock
    deadline: float                 # after which app.py gives up on it
    loop: asyncio.AbstractEventLoop
    # ("text", new text) | ("end", finish reason) | ("error", status, message), from the decode loop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    ids: list = field(default_factory=list)                        # new ids, the EOS included, as generate_ids returns
    text: str = ""
    shown: str = ""                 # the text already sent: always a prefix of `text` at the end
    finish_reason: str | None = None
    cancelled: bool = False
    started: float | None = None    # its batch began (prefill)
    first_token: float | None = None
    ended: float | None = None

    @property
    def key(self):
        """Jobs with the same key can share one decode loop. Greedy rows all can; a seeded row cannot
        share (its batch's rows draw from one generator, so its answer would depend on its neighbours)."""
        a = self.ask
        if a.temperature == 0:
            return ("greedy", a.ignore_eos)
        return ("sampled", a.temperature, a.top_k, a.top_p, a.ignore_eos, None if self.shares else id(self))

    @property
    def shares(self) -> bool:
        return self.ask.temperature == 0 or self.ask.seed is None

    def cancel(self) -> None:
        """Called from the event loop when the client left or its time ran out; the decode loop finishes the row."""
        if self.finish_reason is None:
            self.cancelled = True

    def step(self, token: int, eos: int, decode) -> bool:
        """The row's next token; True when the row is finished."""
        if self.finish_reason is not None:
            return True
        if self.cancelled:
            self.finish_reason = "cancelled"
            return True
        self.first_token = self.first_token or time.monotonic()
        self.ids.append(token)
        if token == eos and not self.ask.ignore_eos:
            return self.end("stop", decode)
        # The text so far is needed for a stream or a stop string; otherwise only at the end.
        text, stopped = self._text(decode) if self.ask.stream or self.ask.stop else ("", False)
        if stopped:
            return self.end("stop", decode)
        if len(self.ids) >= self.max_tokens:
            return self.end("length", decode)
        if not self.ask.stream:
            return False
        # Held back: a trailing U+FFFD (half of a multi-byte character, which SentencePiece completes with the
        # next byte piece), and the last len(stop) - 1 characters, which may begin a stop string.
        safe = text.rstrip("\ufffd")
        safe = safe[: len(safe) - max((len(s) - 1 for s in self.ask.stop), default=0)]
        if len(safe) > len(self.shown) and safe.startswith(self.shown):
            self._post(("text", safe[len(self.shown):]))
            self.shown = safe
        return False

    def end(self, reason: str, decode) -> bool:
        self.text, _ = self._text(decode)
        self.finish_reason, self.ended = reason, time.monotonic()
        if self.ask.stream and self.text.startswith(self.shown) and len(self.text) > len(self.shown):
            self._post(("text", self.text[len(self.shown):]))
            self.shown = self.text
        self._post(("end", reason))
        return True

    def fail(self, status: int, message: str) -> None:
        self.finish_reason, self.ended = "error", time.monotonic()
        self._post(("error", status, message))

    def _text(self, decode) -> tuple[str, bool]:
        """The answer so far, cut before the first stop string; whether one was found."""
        text = decode(self.ids)
        cut = min((i for s in self.ask.stop if (i := text.find(s)) >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _post(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is stopping
            pass


class Batcher:
    def __init__(self, model, processor, max_batch: int = 16, max_queue: int = 64):
        self.model, self.processor = model, processor
        self.max_batch, self.max_queue = max_batch, max_queue
        self.positions = model.cfg.text.max_positions
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._arriving = 0
        self._counts = {"served": 0, "cancelled": 0, "failed": 0, "batches": 0, "rows": 0}
        self._last_batch_s, self._demand = 1.0, 0   # the last batch's time; its rows + the requests that waited

    def close(self) -> None:
        """Makes `run` return once its batch is done."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @contextlib.contextmanager
    def arriving(self):
        """Around a request's way to the queue (body, images, checks), so the decode loop can wait for it."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull with a Retry-After estimate in seconds."""
        with self._cond:
            self._drop_cancelled()
            if len(self._waiting) >= self.max_queue:
                batches = math.ceil(len(self._waiting) / self.max_batch)
                raise QueueFull(len(self._waiting), min(60, max(1, math.ceil(batches * self._last_batch_s))))
            self._waiting.append(job)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            c = dict(self._counts)
            return {"waiting": len(self._waiting), "decoding": len(self._running), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, **c,
                    "mean_batch": round(c["rows"] / c["batches"], 2) if c["batches"] else None}

    # ---- the decode loop ----

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            job.finish_reason = "cancelled"
            self._counts["cancelled"] += 1

    def _take(self) -> list[Job] | None:
        """The oldest waiting job and those that can share its loop (FIFO, so none waits forever).

        It waits up to GATHER_S for more while requests are on their way in (body read, images decoded), and
        while it is smaller than the last batch and the requests that waited through it: the clients that
        batch answered tend to come back together, and without the wait a batch of 7 and one of 1, or two
        of 8, take turns (docs/serving.md#batching)."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                self._drop_cancelled()
                if self._waiting:
                    break
                self._cond.wait()
            jobs, deadline = [self._waiting.popleft()], time.monotonic() + GATHER_S
            while True:
                self._gather(jobs)
                left = deadline - time.monotonic()
                expected = self._arriving or len(jobs) < self._demand
                if len(jobs) == self.max_batch or not (expected and jobs[0].shares) or left <= 0:
                    break
                self._cond.wait(left)
            self._running = jobs
            return jobs

    def _gather(self, jobs: list[Job]) -> None:
        T, n = max(j.prompt_tokens for j in jobs), max(j.max_tokens for j in jobs)
        for job in list(self._waiting):
            if len(jobs) == self.max_batch:
                break
            # left padding: the batch's rows all run to max length + max new tokens
            if not job.cancelled and job.key == jobs[0].key and \
                    max(T, job.prompt_tokens) + max(n, job.max_tokens) <= self.positions:
                self._waiting.remove(job)
                jobs.append(job)
                T, n = max(T, job.prompt_tokens), max(n, job.max_tokens)

    def run(self) -> None:
        """The decode loop, until `close`. serve.py runs it on the main thread, which loaded the model:
        decoding from another thread after the main thread has used torch's OpenMP pool measured about 2x
        slower per step with 2 threads (docs/serving.md#batching)."""
        while (jobs := self._take()) is not None:
            t0 = time.monotonic()
            try:
                self._run(jobs)
            except Exception as e:  # noqa: BLE001 - one bad batch fails its requests, never the server
                traceback.print_exc(file=sys.stderr)
                for job in jobs:
                    if job.finish_reason is None:
                        job.fail(500, f"Decoding failed: {type(e).__name__}: {e}")
            with self._cond:
                self._last_batch_s, self._demand = time.monotonic() - t0, len(jobs) + len(self._waiting)
                self._running = []
                self._counts["batches"] += 1
                self._counts["rows"] += len(jobs)
                for job in jobs:
                    kind = {"cancelled": "cancelled", "error": "failed"}.get(job.finish_reason, "served")
                    self._counts[kind] += 1

    def _run(self, jobs: list[Job]) -> None:
        eos, decode, ask = self.model.cfg.eos_token_id, self.processor.decode, jobs[0].ask
        for job in jobs:
            job.started = time.monotonic()
        batch = self.processor(images=[j.images for j in jobs], prompts=[j.ask.prompt for j in jobs])

        def on_token(tokens: torch.Tensor) -> torch.Tensor:                 # (B,) → rows to finish (B,)
            return torch.tensor([j.step(t, eos, decode) for j, t in zip(jobs, tokens.tolist())])

        # Every row ends by its own max_tokens at the latest, so none is left open when this returns.
        generate_ids(self.model, batch, max(j.max_tokens for j in jobs), ask.temperature, ask.top_k, ask.top_p,
                     ask.seed, stop_at_eos=not ask.ignore_eos, on_token=on_token)
