"""The serve limits that need time to pass (issue 28; docs/serving.md#limits): a full queue, the timeout,
a client that leaves; the one line of nanopali/generate.py they rest on, `on_token` finishing rows; and
serve.py's own flags, refused before a model is loaded.

The server here decodes one request at a time with a queue of one and a 3 s timeout, so each case is
made to happen on purpose: a "long" request ignores the tiny model's EOS for 5000 tokens (vLLM's
`ignore_eos`), which keeps the decode loop busy for many seconds.
"""
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from test_serve_api import ROOT, SHAPES, Server, chat_body, httpx, openai, post


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serve") / "one.log", "--max-batch", "1", "--queue", "1", "--timeout", "3",
                    "--max-tokens", "5000")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def long_request(**more):
    return chat_body(max_tokens=5000, ignore_eos=True, **more)


def open_stream(server, body):
    """A streaming request, read until its first token arrived (so it is decoding). The line iterator is
    kept with the response: dropping it closes the connection, which is what cancels a row."""
    client = httpx.Client(timeout=30)
    response = client.send(client.build_request("POST", server.url + "/v1/chat/completions", json=body), stream=True)
    assert response.status_code == 200, response.read()
    response.lines = response.iter_lines()
    next(line for line in response.lines if '"content": "' in line and '"content": ""' not in line)
    return client, response


def wait_for(server, ok, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ok(q := server.health()["queue"]):
            return q
        time.sleep(0.02)
    raise AssertionError(f"the server's queue never reached the state: {server.health()['queue']}")


def test_full_queue_is_refused_with_503_and_retry_after(one):
    client, stream = open_stream(one, long_request(stream=True))           # decoding
    queued = {}
    waiter = threading.Thread(target=lambda: queued.update(r=post(one, "/v1/chat/completions", chat_body())))
    waiter.start()
    wait_for(one, lambda q: q["waiting"] == 1)                             # the queue of one is full
    r = post(one, "/v1/chat/completions", chat_body())
    stream.close()
    client.close()
    waiter.join(timeout=20)
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    assert queued["r"].status_code == 200                                  # the queued one is still answered


def test_client_that_disconnects_cancels_its_row(one):
    before = one.health()["queue"]["cancelled"]
    client, stream = open_stream(one, long_request(stream=True))
    left = time.monotonic()
    stream.close()
    client.close()
    wait_for(one, lambda q: q["cancelled"] > before and q["decoding"] == 0)
    assert time.monotonic() - left < 2.0     # long before its 5000 tokens (~10 s), and before the 3 s timeout


def test_requests_past_the_timeout_end_with_a_timeout_error(one):
    streamed = openai.OpenAI(base_url=one.url + "/v1", api_key="-", max_retries=0)
    result = {}
    # Queued behind the stream; long too, so it cannot finish in what is left of its 3 s once the stream is cut.
    waiter = threading.Thread(target=lambda: result.update(r=post(one, "/v1/chat/completions", long_request())))
    with pytest.raises(openai.APIError, match="--timeout of 3 s"):
        body = long_request(stream=True)
        extra = {k: body.pop(k) for k in ("ignore_eos",)}
        for _ in streamed.chat.completions.create(**body, extra_body=extra):
            if not waiter.ident:
                waiter.start()
    waiter.join(timeout=20)
    assert result["r"].status_code == 504 and "--timeout of 3 s" in result["r"].json()["error"]["message"]


# ---- generate_ids: rows that on_token finishes ----

@pytest.fixture(scope="module")
def tiny():
    import nanopali

    model, processor = nanopali.load(os.path.join(ROOT, "nanopali", "assets", "tiny-shapes"), dtype=torch.float32)
    batch = processor(images=[SHAPES] * 3, prompts=["caption en", "detect circle ; square ; triangle", "count shapes"])
    return model, batch


def test_row_finished_by_on_token_gets_pad_and_the_other_rows_are_unchanged(tiny):
    from nanopali.generate import generate_ids

    model, batch = tiny
    free = generate_ids(model, batch, 32)
    steps = []

    def finish_row_0_after_2(tokens):
        steps.append(tokens)
        return torch.tensor([len(steps) >= 2, False, False])
    cut = generate_ids(model, batch, 32, on_token=finish_row_0_after_2)
    assert cut[0][:2] == free[0][:2] and set(cut[0][2:]) == {model.cfg.pad_token_id}
    assert cut[1:] == free[1:]      # same process, same batch and path: bit for bit


def test_decoding_stops_once_on_token_has_finished_every_row(tiny):
    from nanopali.generate import generate_ids

    model, batch = tiny
    calls = []
    rows = generate_ids(model, batch, 32, stop_at_eos=False,
                        on_token=lambda t: calls.append(t) or torch.ones(3, dtype=torch.bool))
    assert len(calls) == 1 and all(len(r) == 1 for r in rows)


# ---- serve.py's flags ----

@pytest.mark.parametrize("argv, words", [
    (["--port", "99999"], "--port must be in 0..65535, got 99999"),
    (["--vae", "missing.npz"], "--vae missing.npz: no such file"),
    (["--allow-files", "missing-dir"], "--allow-files missing-dir: no such directory"),
    (["--max-batch", "0"], "--max-batch must be ≥ 1, got 0"),
    (["--queue", "0"], "--queue must be ≥ 1, got 0"),
    (["--timeout", "0"], "--timeout and --max-body-mb must be > 0"),
    (["--checkpoint", "/nonexistent/checkpoint"], "/nonexistent/checkpoint"),
])
def test_bad_flag_is_refused_with_a_message_naming_it(argv, words):
    import serve

    with pytest.raises(ValueError, match=re.escape(words)):   # InputError / CheckpointError: exit 2 in a shell
        serve.main(["--port", "0", *argv])


def test_port_in_use_exits_2_with_one_line_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--port", str(port)], capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"error: Cannot listen on 127.0.0.1:{port}") and r.stderr.count("\n") == 1
