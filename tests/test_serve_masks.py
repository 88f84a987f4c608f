"""The native endpoint's masks (issue 28; docs/serving.md#the-native-endpoint): with a VQ-VAE (--vae), a
"segment" answer comes back with the masks `sample.py --json` gives for the same answer.

No model here writes <seg> codes on cue, so, as tests/test_segmentation.py does for sample.py, decoding
is replaced by a fixed answer: the app runs in this process under Starlette's TestClient with its decode
loop on a thread, and the VQ-VAE is random with the published shapes (test_segmentation.random_vae).
"""
import importlib
import io
import json
import os
import threading
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from test_segmentation import CODES, random_vae
from test_serve_api import ROOT, SHAPES, data_url

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")


def test_native_segment_answer_has_the_masks_sample_py_json_gives(monkeypatch, tmp_path):
    import nanopali
    import nanopali.serve.batcher as batcher
    from fastapi.testclient import TestClient
    from nanopali.serve.app import Settings, create_app
    from nanopali.tasks.segmentation import MaskDecoder

    vae = str(tmp_path / "vae-oid.npz")
    np.savez(vae, **random_vae())
    model, processor = nanopali.load(os.path.join(ROOT, "nanopali", "assets", "tiny-shapes"))
    bins = (100, 200, 600, 900)
    ids = [processor.loc_token_id(b) for b in bins] + [processor.seg_token_id(c) for c in CODES] + \
        processor.sp.encode(" circle") + [model.cfg.eos_token_id]

    def answer(model, batch, *args, on_token, **kwargs):   # what generate_ids would stream, one id a step
        for t in ids:
            if bool(on_token(torch.tensor([t])).all()):
                return
    monkeypatch.setattr(batcher, "generate_ids", answer)
    app = create_app(model, processor, Settings("tiny-shapes"), MaskDecoder.from_npz(vae))
    loop = threading.Thread(target=app.state.batcher.run, daemon=True)
    loop.start()
    try:
        with TestClient(app) as client:
            got = client.post("/v1/paligemma", json={"image": data_url(), "task": "segment", "argument": "circle"})
    finally:
        app.state.batcher.close()
        loop.join(timeout=10)
    assert got.status_code == 200, got.text

    text = processor.decode(ids)
    monkeypatch.setattr(importlib.import_module("nanopali.generate"), "generate", lambda *a, **k: ([text], [ids]))
    spec = importlib.util.spec_from_file_location("sample", os.path.join(ROOT, "sample.py"))
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    out = io.StringIO()
    with redirect_stdout(out):
        assert sample.main(["--image", SHAPES, "--prompt", "segment circle", "--vae", vae, "--json",
                            "--out", str(tmp_path / "segmented.png")]) == 0
    want = json.loads(out.getvalue().splitlines()[-1])
    assert got.json()["masks"] == want["masks"] and len(want["masks"]) == 1
    assert got.json()["tokens"] == want["tokens"] == ids
