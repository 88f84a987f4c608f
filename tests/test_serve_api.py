"""serve.py as a client meets it (issue 28; docs/serving.md): a real uvicorn server in a subprocess on
127.0.0.1, spoken to with the official `openai` client and raw HTTP.

The answers are checked against `sample.py --json` for the same image and prompt (run in this process),
streaming and not; every limit and bad request gets its status and a message in OpenAI's error format
(the queue, the timeout and leaving clients: tests/test_serve_limits.py). `Server` and the request
helpers are shared with the other tests/test_serve_*.py.
"""
import base64
import io
import json
import os
import pathlib
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="the serve tests need the test extra: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="serve.py needs the serve extra: pip install -e '.[serve]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "nanopali", "assets", "images")
SHAPES = os.path.join(IMAGES, "shapes_1.png")
KEY = "test-key"
PROMPTS = ["caption en", "count shapes", "detect circle ; square ; triangle"]


class Server:
    """serve.py in a subprocess on 127.0.0.1 and a free port (--port 0: it prints its URL once it accepts)."""

    def __init__(self, log_path, *args):
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        self._url = None

    @property
    def url(self) -> str:
        """The server's URL, once it accepts: it starts while other fixtures are being made."""
        return self.wait_ready()._url

    def wait_ready(self, timeout=90):
        deadline = time.monotonic() + timeout
        while self._url is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                self.log.seek(0)
                raise AssertionError(f"serve.py did not start (exit {self.proc.poll()}):\n{self.log.read()[-3000:]}")
            if line.startswith("serving "):
                self._url = line.split(" at ")[1].split()[0]
        return self

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def data_url(path=SHAPES) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def user(prompt, *urls):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": prompt}]}]


_MAIN = []


def main_server(request):
    """(the server most serve tests talk to, its folder): an API key, file:// URLs allowed from folder/allowed,
    a 1 MB body limit, --max-tokens past the model's positions. Started once a session, as tests/test_serve_page.py
    uses it too, and stopped when the session ends."""
    if not _MAIN:
        d = pathlib.Path(tempfile.mkdtemp(prefix="nanopali-serve-"))
        (d / "allowed").mkdir()
        Image.open(SHAPES).save(d / "allowed" / "shapes.png")
        server = Server(d / "main.log", "--api-key", KEY, "--allow-files", str(d / "allowed"), "--max-body-mb", "1",
                        "--max-tokens", "9000")
        request.config.add_cleanup(lambda: (server.stop(), shutil.rmtree(d, ignore_errors=True)))
        _MAIN.append((server, d))
    return _MAIN[0]


@pytest.fixture(scope="module")
def servers(request):
    return main_server(request)


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def sample_json(servers, tmp_path_factory):
    """sample.py --json on the bundled model and image, one record per prompt: the reference answers
    (computed while the server starts)."""
    import contextlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample", os.path.join(ROOT, "sample.py"))
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(tmp_path_factory.mktemp("sample"))   # its annotated.png lands there
    try:
        with contextlib.redirect_stdout(out):
            args = ["--image", SHAPES, "--json", "--max-new-tokens", "64"]
            assert sample.main(args + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    finally:
        os.chdir(cwd)
    return {r["prompt"]: r for r in map(json.loads, out.getvalue().splitlines())}


def post(server, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_answer_equals_sample_py_for_the_same_image_and_prompt(sample_json, client, prompt):
    r = client.chat.completions.create(model="tiny-shapes", messages=user(prompt, data_url()), max_tokens=64)
    assert r.choices[0].message.content == sample_json[prompt]["text"]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(sample_json[prompt]["tokens"])


def test_streamed_answer_comes_one_chunk_per_token_and_joins_to_sample_py_answer(client, sample_json):
    stream = client.chat.completions.create(model="tiny-shapes", messages=user("caption en", data_url()),
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == sample_json["caption en"]["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len(pieces) == chunks[-1].usage.completion_tokens - 1     # every token but the EOS carries text


def test_native_detect_returns_the_text_tokens_and_boxes_of_sample_py_json(servers, sample_json):
    ref = sample_json["detect circle ; square ; triangle"]
    r = post(servers[0], "/v1/paligemma", {"image": data_url(), "task": "detect",
                                           "argument": "circle ; square ; triangle", "max_tokens": 64})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["text"], got["tokens"], got["boxes"]) == (ref["text"], ref["tokens"], ref["boxes"])
    assert len(got["boxes"]) == 3


def test_native_stream_ends_with_the_same_record_as_without_stream(servers):
    body = {"image": data_url(), "prompt": "detect circle ; square ; triangle"}
    plain = post(servers[0], "/v1/paligemma", body).json()
    events = [json.loads(line[6:]) for line in post(servers[0], "/v1/paligemma", {**body, "stream": True}).text
              .split("\n\n") if line.startswith("data: ")]
    assert "".join(e["text"] for e in events[:-1]) == plain["text"]
    assert {k: events[-1][k] for k in ("text", "tokens", "boxes")} == {k: plain[k] for k in ("text", "tokens", "boxes")}


def test_file_url_inside_the_allowed_directory_is_read(client, servers, sample_json):
    url = "file://" + str(servers[1] / "allowed" / "shapes.png")
    r = client.chat.completions.create(model="tiny-shapes", messages=user("caption en", url))
    assert r.choices[0].message.content == sample_json["caption en"]["text"]


def test_stop_string_cuts_the_answer_before_it(client):
    r = client.chat.completions.create(model="tiny-shapes", messages=user("caption en", data_url()), stop=[" square"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("a green circle and a blue", "stop")


def test_max_tokens_cuts_the_answer_with_finish_reason_length(client, sample_json):
    r = client.chat.completions.create(model="tiny-shapes", messages=user("caption en", data_url()), max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert sample_json["caption en"]["text"].startswith(r.choices[0].message.content)


def test_seeded_sampling_equals_what_sample_py_runs_with_the_same_seed(client):
    import nanopali
    from nanopali.processing import load_image

    model, processor = nanopali.load(os.path.join(ROOT, "nanopali", "assets", "tiny-shapes"), dtype="auto")
    answers = set()
    for seed in (7, 8):
        (want,) = nanopali.generate(model, processor, [load_image(SHAPES)], ["caption en"], 32, temperature=1.5,
                                    seed=seed)
        r = client.chat.completions.create(model="tiny-shapes", messages=user("caption en", data_url()),
                                           temperature=1.5, seed=seed, max_tokens=32)
        assert r.choices[0].message.content == want
        answers.add(want)
    assert len(answers) == 2     # the seed matters: the check above is not greedy decoding twice


def test_models_lists_the_one_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny-shapes"]


# ---- every bad request: its status, and a message that names what is wrong, in OpenAI's error format ----

def chat_body(**change):
    return {"model": "tiny-shapes", "messages": user("caption en", data_url()), **change}


def one_image(url):
    return chat_body(messages=user("caption en", url))


def tiny_png(size, mode="1") -> str:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


BAD_CHATS = {  # name: (body, status, words the message must hold)
    "unknown model": (chat_body(model="gpt-4o"), 404, "serves 'tiny-shapes'"),
    "no model": (chat_body(model=None), 400, "model: expected the served model's name"),
    "system message": (chat_body(messages=[{"role": "system", "content": "be brief"}, *user("caption en", data_url())]),
                       400, "no chat template"),
    "earlier turn": (chat_body(messages=user("caption en", data_url()) * 2), 400, "exactly one message"),
    "assistant only": (chat_body(messages=[{"role": "assistant", "content": "hi"}]), 400, "role 'user'"),
    "text without image": (chat_body(messages=[{"role": "user", "content": "caption en"}]), 400, "about images"),
    "unknown part": (chat_body(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400, "content[0]"),
    "bad base64": (one_image("data:image/png;base64,abc$"), 400, "not valid base64"),
    "not an image": (one_image("data:image/png;base64," + base64.b64encode(b"hello").decode()), 400, "not an image"),
    "web url": (one_image("https://example.com/cat.jpg"), 400, "fetches nothing from the network"),
    "file outside": (one_image("file:///etc/hostname"), 400, "outside the --allow-files directory"),
    "too many pixels": (one_image(tiny_png((10_001, 10_000))), 400, "the limit is 100,000,000"),
    "n=2": (chat_body(n=2), 400, "only n=1"),
    "negative temperature": (chat_body(temperature=-1), 400, "temperature: expected a finite number"),
    "top_p 0": (chat_body(top_p=0), 400, "top_p"),
    "negative seed": (chat_body(seed=-1), 400, "seed"),
    "max_tokens 0": (chat_body(max_tokens=0), 400, "max_tokens: expected an integer ≥ 1"),
    "max_tokens over the cap": (chat_body(max_tokens=9001), 400, "at most 9000 (--max-tokens)"),
    "max_tokens past the positions": (chat_body(max_tokens=8190), 400, "but the model has 8192"),
    "five stops": (chat_body(stop=list("abcde")), 400, "at most 4"),
    "logprobs": (chat_body(logprobs=True), 400, "logprobs=True is not supported"),
    "unknown field": (chat_body(frobnicate=1), 400, "Unknown field 'frobnicate'"),
    "stream not a flag": (chat_body(stream="yes"), 400, "stream: expected true or false"),
}


@pytest.mark.parametrize("name", BAD_CHATS)
def test_bad_chat_request_gets_its_status_and_a_message_naming_the_problem(servers, name):
    body, status, words = BAD_CHATS[name]
    r = post(servers[0], "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"]


@pytest.mark.parametrize("raw, words", [(b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"),
                                        (b"\xff\xfe", "not valid JSON"), (b"[" * 100_000, "not valid JSON")])
def test_body_that_is_not_a_json_object_is_refused(servers, raw, words):
    r = post(servers[0], "/v1/chat/completions", None, raw=raw)
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_body_over_the_size_limit_is_refused_with_413(servers):
    r = post(servers[0], "/v1/chat/completions", None, raw=b" " * (2 ** 20 + 1))
    assert r.status_code == 413 and "the limit is 1,048,576" in r.json()["error"]["message"]


@pytest.mark.parametrize("key", [None, "wrong"])
def test_missing_or_wrong_api_key_is_refused_with_401(servers, key):
    r = post(servers[0], "/v1/chat/completions", chat_body(), key=key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_openai_client_raises_its_own_exceptions_with_our_message(servers):
    bad = openai.OpenAI(base_url=servers[0].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="--api-key"):
        bad.models.list()
    good = openai.OpenAI(base_url=servers[0].url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="serves 'tiny-shapes'"):
        good.chat.completions.create(model="gpt-4o", messages=user("caption en", data_url()))


@pytest.mark.parametrize("body, words", [
    ({"task": "detect"}, "needs an 'argument'"),
    ({"task": "caption", "argument": "cat"}, "takes no argument"),
    ({"task": "dance"}, "expected one of"),
    ({"prompt": "ocr", "task": "ocr"}, "not both"),
    ({"prompt": 3}, "body.prompt: expected a string"),
])
def test_bad_native_request_is_refused_naming_the_field(servers, body, words):
    r = post(servers[0], "/v1/paligemma", {"image": data_url(), **body})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_unknown_path_gets_a_404_in_openai_format(servers):
    r = httpx.get(servers[0].url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()

