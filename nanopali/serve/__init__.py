"""A local server: OpenAI's chat API, a native endpoint with boxes and masks, and a page (docs/serving.md).

    errors.py    refusals in OpenAI's error format
    chat.py      what a client asks: the chat → PaliGemma prefix rule, the native request, every field checked
    images.py    data: / file:// image URLs → size-checked PIL images squashed to the model's S×S
    batcher.py   the bounded queue and the one decode loop that answers concurrent requests as a batch
    app.py       the FastAPI routes; page.html is the page at /

A request flows app → chat (parse) → images (decode) → batcher (queue, batch, generate_ids, one event per
token) → app (JSON, or server-sent events). `serve.py` at the top loads a model and runs this with uvicorn;
FastAPI and uvicorn are the `serve` extra, imported only here (`import nanopali` never imports them).
"""
