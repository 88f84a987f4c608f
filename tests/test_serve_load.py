"""Several users at once (issue 28; docs/serving.md#batching): a bounded load on loopback.

Two servers start side by side on the bundled model: one batching (--max-batch 16), one decoding a
request at a time (--max-batch 1). Concurrent `openai` clients send them chat requests:
- mixed: 64 requests from 16 clients over the 3 bundled images × caption / count / detect (answers of
  2 to 20 tokens share batches): each answer must be its own request's, the one nanopali.generate
  gives for that image and prompt alone, so no row sees another's;
- detect: 64 `detect` requests from 8 clients over the 3 images, on both servers, each mode's faster
  of two runs (the machine may be shared): batching must give ≥ 3x the throughput, and the batching
  server's RSS must not grow from the first detect run to the second.
The figures are printed with the results. Throughput is measured on detect, not the mixed load:
requests join at the next batch, so a 2-token answer's client waits for its batch's 20-token row, and
8 clients over mixed answers measure 2.3-2.9x (docs/serving.md#batching gives both). Both servers run
in float32: in bfloat16 oneDNN keeps a kernel per new matmul shape, whose cache grows the RSS until it
is full and would hide whether the server itself keeps anything per request.
"""
import concurrent.futures
import itertools
import os
import time

import pytest

from test_serve_api import IMAGES, ROOT, Server, data_url, openai, user

REQUESTS = 64
IMAGE_NAMES = sorted(n for n in os.listdir(IMAGES) if n.endswith(".png"))
DETECT = "detect circle ; square ; triangle"
MIXED = list(itertools.product(IMAGE_NAMES, ["caption en", "count shapes", DETECT]))
DETECTS = [(image, DETECT) for image in IMAGE_NAMES]


@pytest.fixture(scope="module")
def expected():
    import nanopali
    from nanopali.processing import load_image

    model, processor = nanopali.load(os.path.join(ROOT, "nanopali", "assets", "tiny-shapes"), dtype="float32")
    return {(image, prompt): nanopali.generate(model, processor, [load_image(os.path.join(IMAGES, image))], [prompt],
                                               32)[0] for image, prompt in MIXED}


def load(server, cases, clients, n=REQUESTS):
    """n requests from `clients` threads, each sending its next request when its last is answered:
    (seconds for all, sorted latencies, [(case, answer)])."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)
    urls = {image: data_url(os.path.join(IMAGES, image)) for image in IMAGE_NAMES}

    def ask(i):
        case = cases[i % len(cases)]
        t0 = time.perf_counter()
        r = client.chat.completions.create(model="tiny-shapes", messages=user(case[1], urls[case[0]]), max_tokens=32)
        return time.perf_counter() - t0, case, r.choices[0].message.content

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, range(n), timeout=120))
    return time.perf_counter() - t0, sorted(r[0] for r in results), [r[1:] for r in results]


def figures(name, run, clients):
    seconds, lat, _ = run
    return (f"[serve load] {name}: {REQUESTS} requests from {clients} clients in {seconds:.2f} s = "
            f"{REQUESTS / seconds:.1f} req/s; latency p50 {lat[len(lat) // 2] * 1000:.0f} ms, "
            f"p95 {lat[int(len(lat) * 0.95)] * 1000:.0f} ms")


@pytest.fixture(scope="module")
def measured(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("load")
    batched = Server(d / "batched.log", "--max-batch", "16", "--dtype", "float32")
    single = Server(d / "single.log", "--max-batch", "1", "--dtype", "float32")
    try:
        load(single, DETECTS, 8, n=8)                      # warm-up: the first calls, the first allocations
        mixed = load(batched, MIXED, 16)
        runs, rss = {"batched": [], "one at a time": []}, []
        for _ in range(2):
            runs["batched"].append(load(batched, DETECTS, 8))
            rss.append(batched.rss_mb())
            runs["one at a time"].append(load(single, DETECTS, 8))
        runs = {name: min(pair, key=lambda run: run[0]) for name, pair in runs.items()}
        mean_batch = batched.health()["queue"]["mean_batch"]
    finally:
        batched.stop()
        single.stop()
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + figures("mixed, batched", mixed, 16))
        for name, run in runs.items():
            print(figures(f"detect, {name}", run, 8))
        print(f"[serve load] batched server: mean batch {mean_batch}; RSS {rss[0]:.0f} MB after the first detect run, "
              f"{rss[1]:.0f} MB after the second")
    return mixed, runs, rss


def test_every_concurrent_request_gets_its_own_answer(measured, expected):
    mixed, runs, _ = measured
    for answers in [mixed[2]] + [run[2] for run in runs.values()]:
        assert len(answers) == REQUESTS
        assert [a for a in answers if a[1] != expected[a[0]]] == []


def test_batching_gives_at_least_3x_the_throughput_of_one_at_a_time(measured):
    _, runs, _ = measured
    assert runs["one at a time"][0] / runs["batched"][0] >= 3.0


def test_server_memory_stays_flat_under_load(measured):
    _, _, (rss0, rss1) = measured
    assert rss1 - rss0 < 10, f"RSS grew {rss1 - rss0:.1f} MB over {REQUESTS} requests"
