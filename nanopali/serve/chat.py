"""What a client asks, read from a request body: the chat → PaliGemma prefix rule, and the native request.

PaliGemma has no chat template (PaliGemma paper §3.2: the model sees [images | BOS prefix \\n] and
writes the suffix). So a chat maps onto one prefix by an explicit rule (docs/serving.md#the-chat-rule):
exactly one message, from the user; its text parts, joined by a space, are the prefix ("caption en",
"detect cat", "answer en what is this?"); its image_url parts are the images, in order. A system
message or an earlier turn is refused with a 400 that states the rule, never silently dropped: the
model would answer as if it had not been said. Every field is checked here, before an image is decoded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ApiError

MAX_IMAGES = 16    # images in one request; the prompt-length check (positions) usually bites first
MAX_STOPS = 4      # OpenAI's limit on `stop` strings
RULE = ("PaliGemma has no chat template: send exactly one message, role 'user', whose text is the task prefix "
        "('caption en', 'detect cat', 'answer en what is this?') and whose image_url parts are the images "
        "(docs/serving.md#the-chat-rule)")
# OpenAI fields this server does not implement: accepted when absent, null or their neutral value (so a
# client that sends its defaults works), refused otherwise rather than ignored.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": 0, "logit_bias": {},
           "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"]}
INERT = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}   # no effect on the answer
SAMPLING = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos",
            "stream", "stream_options", "n"}
# The native endpoint's tasks (the prefixes of PaliGemma's transfer tasks, paper appendix; sample.py --help).
TASKS = {"caption": "caption {lang}", "describe": "describe {lang}", "ocr": "ocr", "answer": "answer {lang} {argument}",
         "detect": "detect {argument}", "segment": "segment {argument}"}


@dataclass
class Ask:
    prompt: str
    images: list[str]               # data: or file:// URLs, decoded by images.py
    max_tokens: int | None = None   # None: the server's default
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False        # vLLM's extension: decode max_tokens whatever the model says (benchmarks)
    stream: bool = False
    include_usage: bool = False


def parse_chat(body: dict, model_id: str) -> Ask:
    """POST /v1/chat/completions → Ask, or an ApiError naming the field."""
    _check_model(body, model_id)
    _check_fields(body, {"model", "messages"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of messages", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}]: expected an object with 'role' and 'content'", f"messages[{i}]")
    roles = [m.get("role") for m in messages]
    if len(messages) != 1 or roles[0] != "user":
        raise ApiError(400, f"{RULE}. Got {len(messages)} message(s) with roles {roles}", "messages")
    content = messages[0].get("content")
    where = "messages[0].content"
    if isinstance(content, str):
        raise ApiError(400, f"{where} is text alone; PaliGemma answers about images: send a list of parts, "
                       "{'type': 'text', 'text': PREFIX} and {'type': 'image_url', 'image_url': {'url': "
                       "'data:image/png;base64,...'}}", where)
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"{where}: expected a non-empty list of text and image_url parts", where)
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_string(part, "text", at))
        elif kind == "image_url":
            ref = part.get("image_url")
            if not isinstance(ref, dict):
                raise ApiError(400, f"{at}.image_url: expected an object {{'url': 'data:image/...;base64,...'}}", at)
            images.append(_string(ref, "url", f"{at}.image_url"))
        else:
            raise ApiError(400, f"{at}: expected a part of type 'text' or 'image_url', got {_show(part)}", at)
    return _sampling(body, Ask(" ".join(texts), _some_images(images, where)))


def parse_native(body: dict, model_id: str | None = None) -> Ask:
    """POST /v1/paligemma → Ask: one image, and either a `prompt` or a `task` with its `argument`."""
    if "model" in body:
        _check_model(body, model_id)
    _check_fields(body, {"model", "image", "prompt", "task", "argument", "lang"}, openai=False)
    image = _string(body, "image", "body")
    if "prompt" in body:
        if "task" in body or "argument" in body:
            raise ApiError(400, "Give either 'prompt' or 'task' (with 'argument'), not both", "prompt")
        return _sampling(body, Ask(_string(body, "prompt", "body"), [image]), openai=False)
    task = body.get("task")
    if task not in TASKS:
        raise ApiError(400, f"task: expected one of {sorted(TASKS)} (or give 'prompt'), got {_show(task)}", "task")
    lang = body.get("lang", "en")
    if not isinstance(lang, str) or not lang.isascii() or not lang.isalpha() or not 0 < len(lang) <= 8:
        raise ApiError(400, f"lang: expected a language code such as 'en', got {_show(lang)}", "lang")
    takes = "{argument}" in TASKS[task]
    argument = body.get("argument")
    if takes and not (isinstance(argument, str) and argument.strip()):
        raise ApiError(400, f"task {task!r} needs an 'argument' (e.g. 'cat ; dog'), got {_show(argument)}", "argument")
    if not takes and argument not in (None, ""):
        raise ApiError(400, f"task {task!r} takes no argument, got {_show(argument)}", "argument")
    prompt = TASKS[task].format(lang=lang, argument=(argument or "").strip())
    return _sampling(body, Ask(prompt, [image]), openai=False)


def _sampling(body: dict, ask: Ask, openai: bool = True) -> Ask:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, f"n: only n=1 is served (one answer per request), got {_show(n)}", "n")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise ApiError(400, "Give max_tokens or max_completion_tokens, not both", "max_tokens")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    ask.max_tokens = _number(body, name, int, lambda v: v >= 1, "an integer ≥ 1")
    ask.temperature = _number(body, "temperature", float, lambda v: 0 <= v < math.inf, "a finite number ≥ 0") or 0.0
    ask.top_p = _number(body, "top_p", float, lambda v: 0 < v <= 1, "a number in (0, 1]")
    ask.top_k = _number(body, "top_k", int, lambda v: v >= 1, "an integer ≥ 1")
    ask.seed = _number(body, "seed", int, lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2**63)")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop: expected a non-empty string or a list of at most {MAX_STOPS}, got "
                       f"{_show(stop)}", "stop")
    ask.stop = tuple(stops)
    ask.ignore_eos = _flag(body, "ignore_eos")
    ask.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not ask.stream or not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, "stream_options: only {'include_usage': true|false}, and only with stream: true",
                           "stream_options")
        ask.include_usage = _flag(options, "include_usage")
    return ask


def _check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, f"model: expected the served model's name, {model_id!r}, got {_show(model)}", "model")
    if model != model_id:
        raise ApiError(404, f"The model {model!r} does not exist here; this server serves {model_id!r} "
                       "(GET /v1/models)", "model", "model_not_found")


def _check_fields(body: dict, own: set, openai: bool = True) -> None:
    for key, value in body.items():
        if key in own or key in SAMPLING or (openai and key in INERT):
            continue
        if openai and key in NEUTRAL:
            if value is None or value == NEUTRAL[key]:
                continue
            raise ApiError(400, f"{key}={_show(value)} is not supported by this server; leave it out or "
                           f"send {NEUTRAL[key]!r}", key)
        raise ApiError(400, f"Unknown field {_show(key)}; this endpoint takes {sorted(own | SAMPLING)}", key)


def _some_images(images: list[str], where: str) -> list[str]:
    if not images:
        raise ApiError(400, f"{where} has no image_url part; PaliGemma answers about images", where)
    if len(images) > MAX_IMAGES:
        raise ApiError(400, f"{where} has {len(images)} images; the limit is {MAX_IMAGES}", where)
    return images


def _string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ApiError(400, f"{where}.{key}: expected a string, got {_show(value)}", f"{where}.{key}")
    return value


def _number(body: dict, key: str, kind, ok, expected: str):
    value = body.get(key)
    if value is None:
        return None
    good_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not good_type or not ok(value):   # NaN fails `ok`: JSON may spell it NaN
        raise ApiError(400, f"{key}: expected {expected}, got {_show(value)}", key)
    return kind(value)


def _flag(obj: dict, key: str) -> bool:
    value = obj.get(key, False)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{key}: expected true or false, got {_show(value)}", key)
    return bool(value)


def _show(value) -> str:
    """A value for an error message, cut short: a client may send megabytes."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
