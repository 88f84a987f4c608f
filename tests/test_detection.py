"""`<loc>` answers → exact pixel boxes, and boxes drawn in their colour on the image."""
import numpy as np
import pytest
from PIL import Image

from nanopali.tasks.detection import PALETTE, bins_to_box, draw_detections, parse_detections


def test_known_answer_gives_exact_boxes_with_y_before_x():
    # docs/boxes-and-masks.md#detection: <locY1><locX1><locY2><locX2>, 1024 bins;
    # HF-blog decoding round(bin / 1024 * side)
    dets = parse_detections("<loc0256><loc0512><loc0768><loc1023> cat ; <loc0000><loc0000><loc0512><loc0512> dog",
                            width=200, height=100)
    assert [d.label for d in dets] == ["cat", "dog"]
    assert dets[0].box == (100, 25, 200, 75)   # x0 = 512/1024*200, y0 = 256/1024*100, x1 = round(199.8)
    assert dets[1].box == (0, 0, 100, 50)
    assert dets[0].bins == (256, 512, 768, 1023)


def test_big_vision_decoding_divides_by_1023_and_truncates():
    assert bins_to_box((256, 512, 768, 1023), 200, 100, divisor=1023) == (100, 25, 200, 75)
    assert bins_to_box((1, 1, 2, 2), 1000, 1000, divisor=1023) == (0, 0, 1, 1)     # int(0.977), int(1.955)
    assert bins_to_box((1, 1, 2, 2), 1000, 1000, divisor=1024) == (1, 1, 2, 2)     # round(0.977), round(1.95)


def test_malformed_and_truncated_objects_are_skipped_not_fatal():
    text = ("<loc0100><loc0100><loc0200><loc0200> ok ; <loc0100><loc0100> cut ; "
            "<loc0300><loc0300><loc0200><loc0400> inverted ; <loc0100><loc0100><loc0900><loc0900> last ; <loc01")
    assert [d.label for d in parse_detections(text, 64, 64)] == ["ok", "last"]
    assert parse_detections("a cat on a mat", 64, 64) == []


def test_an_object_without_label_is_kept_with_an_empty_label():
    (d,) = parse_detections("<loc0000><loc0000><loc1000><loc1000>", 1024, 1024)
    assert d.label == "" and d.box == (0, 0, 1000, 1000)


def test_drawn_png_has_the_box_colour_on_the_box_edges_and_not_inside(tmp_path):
    img = Image.new("RGB", (120, 80), (0, 0, 0))
    (det,) = parse_detections("<loc0256><loc0256><loc0768><loc0768>", *img.size)
    path = tmp_path / "boxes.png"
    draw_detections(img, [det], width=2).save(path)
    a = np.asarray(Image.open(path))
    x0, y0, x1, y1 = det.box
    colour = list(PALETTE[0])
    assert a[(y0 + y1) // 2, x0].tolist() == colour and a[(y0 + y1) // 2, x1].tolist() == colour
    assert a[y0, (x0 + x1) // 2].tolist() == colour and a[y1, (x0 + x1) // 2].tolist() == colour
    assert a[(y0 + y1) // 2, (x0 + x1) // 2].tolist() == [0, 0, 0]


def test_an_unknown_divisor_is_refused():
    with pytest.raises(ValueError, match="divisor"):
        bins_to_box((0, 0, 1, 1), 10, 10, divisor=1000)
