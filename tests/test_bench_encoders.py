"""`bench.py encoders` keeps working: its code path runs on tiny towers, and its parity check catches a
nanopali model that holds other weights than the reference (a timing of two different computations)."""
import pytest
import torch

from benchmarks import encoders

# A SigLIP vision tower small enough for CI: 2 layers, width 40, 4×4 patches of 8 px.
TINY_SIGLIP = dict(hidden_size=40, intermediate_size=56, num_attention_heads=2, num_hidden_layers=2, patch_size=8,
                   image_size=32)


def quiet(_):
    pass


@pytest.fixture
def siglip():
    return encoders.siglip_towers(2, TINY_SIGLIP, "SigLIP (tiny)")


def test_siglip_rows_time_both_sides_per_batch_and_dtype_and_print_one_table(siglip, capsys):
    rows = encoders.measure(siglip, ["bf16", "fp32"], [1, 2], repeats=1, log=quiet)
    assert [(r["dtype"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]
    assert all(r["ms"]["reference"] > 0 and r["ms"]["nanopali"] > 0 for r in rows)
    assert all(r["parity"]["diff"] <= r["parity"]["bound"] for r in rows if r["dtype"] == "fp32")
    encoders.print_tables(rows)
    out = capsys.readouterr().out
    assert "| SigLIP (tiny) | image | 2 | bf16 |" in out and "| SigLIP (tiny) | image | bf16 |" in out


def test_the_parity_check_fails_when_one_nanopali_tensor_is_off_by_one_percent_in_fp32(siglip):
    ours = siglip[0].modules[1]
    with torch.no_grad():
        ours.vision_head.mlp.fc2.weight.mul_(1.01)
    with pytest.raises(encoders.ParityError, match="differ by .* in fp32, more than the rounding bound"):
        encoders.measure(siglip, ["fp32"], [2], repeats=1, log=quiet)


def test_the_parity_check_fails_when_nanopali_holds_other_weights_in_bf16(siglip):
    ours = siglip[0].modules[1]
    with torch.no_grad():   # the first MLP's hidden units in another order: the same values, other weights
        fc1 = ours.vision_tower.blocks[0].mlp.fc1
        fc1.weight.copy_(fc1.weight.roll(1, 0))
    with pytest.raises(encoders.ParityError, match="bfloat16 output is .* from the fp32 reference"):
        encoders.measure(siglip, ["bf16"], [2], repeats=1, log=quiet)


def test_without_open_clip_the_mobileclip_rows_are_skipped_saying_how_to_get_them(capsys):
    if encoders.oracle_missing() is None:
        pytest.skip("open_clip imports here: the MobileCLIP rows are measured, not skipped")
    threads = torch.get_num_threads()
    try:
        encoders.main(["--models", "s0", "b", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "MobileCLIP2 rows skipped: open_clip / timm do not import here" in out
    assert "PYTHONPATH=. /tmp/oracle/bin/python bench.py encoders" in out and "Nothing was measured." in out


def test_mobileclip_rows_run_beside_open_clip_where_it_imports():
    pytest.importorskip("open_clip", reason="open_clip + timm are the oracle; see tests/mobileclip_reference.py")
    towers = encoders.mobileclip_towers("MobileCLIP2-S0", 2, dict(layers=(1, 1, 1, 1)), 1)
    rows = encoders.measure(towers, ["fp32", "bf16"], [2], repeats=1, log=quiet)
    assert [(r["tower"], r["dtype"]) for r in rows] == [("image", "fp32"), ("text", "fp32"), ("image", "bf16"),
                                                       ("text", "bf16")]
    assert all("reference channels-last" in r["ms"] for r in rows if r["tower"] == "image")
    with torch.no_grad():
        towers[0].modules[1].image_tower.head.fc.weight.mul_(1.01)
    with pytest.raises(encoders.ParityError):
        encoders.measure(towers[:1], ["fp32"], [2], repeats=1, log=quiet)
