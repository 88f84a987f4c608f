"""The HTTP side (FastAPI): routes, the API key, request bodies, OpenAI's response and stream formats.

A request's body is read up to --max-body, parsed (chat.py), its images decoded in a worker thread
(images.py) and its length checked against the model's positions; then it is queued as a Job
(batcher.py) and its answer read from the Job's events: all at once, or as server-sent events, one
per token, the way OpenAI streams (`data: {chunk}` ... `data: [DONE]`). A client that leaves, or a
request past --timeout, cancels its row. Every refusal is an ApiError in OpenAI's format (errors.py).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import time
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..generate import check_length
from ..processing import InputError
from ..tasks.answers import answer_fields, read_answer
from .batcher import Batcher, Job, QueueFull
from .chat import Ask, parse_chat, parse_native
from .errors import ApiError, error_body
from .images import fit, open_image

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "images")
KEEPALIVE_S = 2.0      # a stream sends an SSE comment this often while it waits (and a non-stream checks its client)
# The page is one file and may fetch nothing but this server: the browser enforces it.
PAGE_POLICY = ("default-src 'none'; connect-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
               "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")


@dataclass
class Settings:
    model_id: str                   # the name /v1/models lists and requests must send
    api_key: str | None = None
    allow_files: str | None = None  # the directory file:// image URLs may read from
    max_batch: int = 16
    max_queue: int = 64
    max_tokens: int = 256           # the most new tokens a request may ask for, and what it gets if it names none
    timeout: float = 120.0          # seconds from arrival to the last token
    max_body: int = 20 * 2 ** 20    # bytes
    info: dict = field(default_factory=dict)          # device, dtype, quantize, threads: shown by /health and the page
    suggestions: tuple[str, ...] = ()                 # prompts the page offers


def create_app(model, processor, settings: Settings, mask_decoder=None) -> FastAPI:
    s = settings
    batcher = Batcher(model, processor, s.max_batch, s.max_queue)
    decoding_images = asyncio.Semaphore(2)   # a 100-megapixel image decodes to 300 MB: two at a time
    examples = sorted(n for n in os.listdir(EXAMPLES) if n.endswith(".png")) if os.path.isdir(EXAMPLES) else []

    app = FastAPI(title="nanopali", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher   # whoever serves the app runs its decode loop: batcher.run() (serve.py)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown path, wrong method
        return JSONResponse(error_body(e.status_code, f"{request.method} {request.url.path}: {e.detail}"),
                            e.status_code, headers=getattr(e, "headers", None))

    def check_key(request: Request) -> None:
        if s.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), s.api_key.encode()):
            raise ApiError(401, "Missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key "
                           "the server was started with (--api-key)", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        check_key(request)
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > s.max_body:
            raise ApiError(413, f"The body is {length} bytes; the limit is {s.max_body:,} (--max-body-mb)",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():   # a chunked body has no length: count it as it comes
            size += len(chunk)
            if size > s.max_body:
                raise ApiError(413, f"The body is over the limit of {s.max_body:,} bytes (--max-body-mb)",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except json.JSONDecodeError as e:
            raise ApiError(400, f"The body is not valid JSON: {e}") from None
        except (ValueError, RecursionError) as e:   # bad UTF-8, a 5000-digit number, nesting 10⁵ deep
            raise ApiError(400, f"The body is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"The body must be a JSON object, got a {type(body).__name__}")
        return body

    async def queue(ask: Ask, arrived: float) -> Job:
        """The decoded images, the length checks, then the queue."""
        def decode():   # off the event loop: an image, or a prompt of megabytes, takes a while
            fitted = [fit(open_image(url, f"image {i}", s.allow_files), processor) for i, url in enumerate(ask.images)]
            return fitted, len(processor.prefix_ids(ask.prompt, len(fitted)))

        async with decoding_images:
            fitted, prompt_tokens = await run_in_threadpool(decode)
        room = model.cfg.text.max_positions - prompt_tokens
        n = ask.max_tokens if ask.max_tokens is not None else min(s.max_tokens, room)
        if n > s.max_tokens:
            raise ApiError(400, f"max_tokens is {n}; this server allows at most {s.max_tokens} (--max-tokens)",
                           "max_tokens")
        try:
            check_length(model.cfg, prompt_tokens, max(n, 1))
        except InputError as e:
            raise ApiError(400, str(e), "max_tokens") from None
        job = Job(ask, [im for im, _ in fitted], fitted[0][1], prompt_tokens, n, arrived, arrived + s.timeout,
                  asyncio.get_running_loop())
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise ApiError(503, f"The server is busy: {e.waiting} requests are waiting (--queue {s.max_queue}); "
                           f"retry in {e.retry_after} s", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        return job

    async def events(job: Job, request: Request | None = None):
        """The job's events until it ends; None every KEEPALIVE_S while nothing comes. ApiError on a
        decoding failure or the timeout; stops early (cancelling the row) if `request`'s client left."""
        getter = None
        try:
            while True:
                left = job.deadline - time.monotonic()
                if left <= 0:
                    job.cancel()
                    raise ApiError(504, f"The request took longer than the server's --timeout of {s.timeout:g} s "
                                   "(waiting and decoding); its row was cancelled", code="timeout")
                getter = getter or asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({getter}, timeout=min(left, KEEPALIVE_S))
                if not done:
                    if request is not None and await request.is_disconnected():
                        job.cancel()
                        return
                    yield None
                    continue
                event, getter = getter.result(), None
                if event[0] == "error":
                    raise ApiError(event[1], event[2])
                yield event
                if event[0] == "end":
                    return
        finally:
            if getter is not None:
                getter.cancel()

    def sse(job: Job, first: list, piece, last):
        """A server-sent event stream: `first` objects, `piece(text)` per token, `await last()` objects."""
        async def stream():
            try:
                for obj in first:
                    yield _data(obj)
                async with aclosing(events(job)) as stream_events:
                    async for event in stream_events:
                        if event is None:
                            yield ": waiting\n\n"   # a comment: keeps proxies from closing, and finds a gone client
                        elif event[0] == "text":
                            yield _data(piece(event[1]))
                for obj in await last():
                    yield obj if isinstance(obj, str) else _data(obj)
            except ApiError as e:
                yield _data(e.body())
            finally:
                job.cancel()                      # the client left mid-stream: free its row (no-op when done)
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def wait(job: Job, request: Request) -> None:
        """Until the job ends; ApiError(499) if its client left first (nobody reads that answer)."""
        async with aclosing(events(job, request)) as job_events:
            async for _ in job_events:
                pass
        if job.cancelled:
            raise ApiError(499, "The client closed the request")

    def usage(job: Job) -> dict:
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": len(job.ids),
                "total_tokens": job.prompt_tokens + len(job.ids)}

    @app.get("/", include_in_schema=False)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read(), headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/examples/{name}", include_in_schema=False)
    async def example(name: str):
        if name not in examples:
            raise ApiError(404, f"No example image {name[:80]!r}; there are {examples}", code="not_found")
        return FileResponse(os.path.join(EXAMPLES, name))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": s.model_id, **s.info, "image_size": processor.image_size,
                "max_tokens": s.max_tokens, "positions": model.cfg.text.max_positions, "timeout": s.timeout,
                "masks": mask_decoder is not None, "auth": s.api_key is not None, "examples": examples,
                "suggestions": list(s.suggestions), "queue": batcher.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [_model_card(s.model_id)]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str, request: Request):
        check_key(request)
        if name != s.model_id:
            raise ApiError(404, f"The model {name[:200]!r} does not exist here; this server serves {s.model_id!r}",
                           "model", "model_not_found")
        return _model_card(s.model_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrived = time.monotonic()
        with batcher.arriving():
            ask = parse_chat(await read_json(request), s.model_id)
            job = await queue(ask, arrived)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": s.model_id}
        if ask.stream:
            def chunk(delta: dict, reason=None) -> dict:
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

            async def last():
                tail = [chunk({}, job.finish_reason)]
                if ask.include_usage:
                    tail.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(job)})
                return tail + ["data: [DONE]\n\n"]
            return sse(job, [chunk({"role": "assistant", "content": ""})], lambda t: chunk({"content": t}), last)
        await wait(job, request)
        return {**head, "object": "chat.completion", "usage": usage(job),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text}, "logprobs": None,
                             "finish_reason": job.finish_reason}]}

    @app.post("/v1/paligemma")
    async def native(request: Request):
        arrived = time.monotonic()
        with batcher.arriving():
            ask = parse_native(await read_json(request), s.model_id)
            job = await queue(ask, arrived)

        async def record() -> dict:
            dets, segs = await run_in_threadpool(read_answer, ask.prompt, job.text, *job.size, mask_decoder)
            end = job.ended or time.monotonic()
            return {"model": s.model_id, "prompt": ask.prompt, "text": job.text, "tokens": job.ids,
                    **answer_fields(dets, segs), "finish_reason": job.finish_reason, "image_size": list(job.size),
                    "usage": usage(job), "timing": {
                        "queued_s": round(job.started - job.created, 4),
                        "first_token_s": round(job.first_token - job.created, 4),
                        "seconds": round(end - job.created, 4),
                        "tokens_per_second": round(len(job.ids) / max(end - job.created, 1e-9), 1)}}

        if ask.stream:
            async def last():
                return [{"done": True, **await record()}]
            return sse(job, [], lambda t: {"text": t}, last)
        await wait(job, request)
        return await record()

    return app


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "nanopali"}


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
