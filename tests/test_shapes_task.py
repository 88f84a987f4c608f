"""The synthetic shapes task: deterministic scenes, exact answers, a Gemma-shaped tokenizer, honest metrics."""
import numpy as np
import pytest

from nanopali import shapes
from nanopali.tasks.detection import parse_detections
from nanopali.processing import Processor
from nanopali.shapes import Scene, Shape


def scene(*specs, size=100):
    return Scene(0, size, tuple(Shape(k, c, b) for k, c, b in specs), "plain", 200)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return shapes.train_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.model"), num_scenes=200)


def test_the_same_seed_gives_the_same_scene_and_the_same_pixels():
    a, b = shapes.make_scene(7), shapes.make_scene(7)
    assert a == b and np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    assert shapes.make_scene(8) != a


def test_scenes_hold_one_to_four_shapes_inside_the_image_that_never_touch():
    counts = set()
    for seed in range(300):
        s = shapes.make_scene(seed, 112)
        counts.add(len(s.shapes))
        for i, a in enumerate(s.shapes):
            assert 0 <= a.box[0] < a.box[2] <= 112 and 0 <= a.box[1] < a.box[3] <= 112
            assert not any(shapes.boxes_near(a.box, b.box, gap=1) for b in s.shapes[i + 1:])
    assert counts == {1, 2, 3, 4}


def test_a_lone_shape_fills_exactly_its_box():
    s = scene(("circle", "blue", (20, 30, 60, 70)))
    a = np.asarray(s.image()).astype(int)
    ys, xs = np.nonzero(np.abs(a - 200).sum(-1) > 30)   # clearly not background
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (20, 30, 60, 70)


def test_caption_groups_shapes_by_kind_then_colour_and_counts_them_in_words():
    s = scene(("square", "blue", (60, 5, 80, 25)), ("circle", "red", (5, 5, 25, 25)),
              ("square", "blue", (5, 60, 25, 80)), ("square", "red", (60, 60, 80, 80)))
    assert shapes.caption(s) == "a red circle and a red square and two blue squares"
    assert shapes.count(s) == "4"


def test_a_colour_question_is_asked_only_about_a_kind_that_occurs_once():
    s = scene(("square", "blue", (60, 5, 80, 25)), ("circle", "red", (5, 5, 25, 25)),
              ("square", "green", (5, 60, 25, 80)))
    assert shapes.colour_questions(s) == {"answer en what color is the circle?": "red"}


def test_detection_answer_is_y_before_x_in_kind_order_and_empty_for_absent_kinds():
    s = scene(("square", "blue", (50, 0, 100, 50)), ("circle", "red", (0, 50, 50, 100)), size=1024)
    assert shapes.detect(s) == "<loc0050><loc0000><loc0100><loc0050> circle ; <loc0000><loc0050><loc0050><loc0100> square"
    assert shapes.detect(s, ("triangle",)) == ""
    assert shapes.detect_prompt(("circle", "square")) == "detect circle ; square"


@pytest.mark.parametrize("size", [112, 224, 640, 1000, 1024])
def test_loc_tokens_decode_back_to_the_generators_pixels_within_one_pixel(size):
    for seed in range(50):
        s = shapes.make_scene(seed, size)
        dets = sorted((d.label, d.box) for d in parse_detections(shapes.detect(s), size, size))
        want = sorted((sh.kind, sh.box) for sh in s.shapes)
        assert [label for label, _ in dets] == [kind for kind, _ in want]
        for (_, got), (_, box) in zip(dets, want):
            assert max(abs(g - b) for g, b in zip(got, box)) <= 1
            assert all(g == b for g, b in zip(got, box) if b < size)   # exact but at the far edge


def test_tokenizer_has_gemma_special_ids_a_newline_piece_and_consecutive_loc_seg_ids(tokenizer):
    p = Processor(tokenizer, 112, 64, image_token_id=0)
    sp = p.sp
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert p.loc0 + 1024 == p.seg0 and p.seg0 + 128 == sp.get_piece_size()   # appended last, as in Gemma
    assert sp.encode("count shapes\n")[-1] == sp.piece_to_id("\n")
    answer = shapes.detect(shapes.make_scene(3))
    ids = p.suffix_ids(answer)
    assert p.loc_token_id(int(answer[4:8])) in ids
    assert sum(p.loc0 <= i < p.seg0 for i in ids) == answer.count("<loc")   # one id per <loc> piece
    assert p.decode(ids) == answer
    assert sp.unk_id() not in sp.encode("where is the triangle? 🙂")   # byte fallback: any text encodes


def test_metrics_give_one_to_the_true_answers_and_zero_to_empty_ones():
    scenes = [shapes.make_scene(shapes.HELD_OUT_SEED + i) for i in range(20)]
    truth = {}
    for s in scenes:
        image_key = s.image().tobytes()
        truth[image_key, "caption en"] = shapes.caption(s)
        truth[image_key, "count shapes"] = shapes.count(s)
        truth[image_key, shapes.detect_prompt()] = shapes.detect(s)
        for q, a in shapes.colour_questions(s).items():
            truth[image_key, q] = a
    oracle = shapes.score(scenes, lambda images, prompts: [truth[im.tobytes(), p] for im, p in zip(images, prompts)])
    assert oracle == {"caption_exact_match": 1.0, "count_accuracy": 1.0, "vqa_accuracy": 1.0,
                      "detection_mean_iou": 1.0}
    silent = shapes.score(scenes, lambda images, prompts: [""] * len(prompts))
    assert all(v == 0.0 for v in silent.values())


def test_shapes_fill_one_cell_or_two_by_two_cells_of_the_patch_grid_inset_by_the_margin():
    """At the bundled model's input size a cell is one SigLIP patch: a shape's box is its cells, inset
    by MARGIN, so every patch shows one small shape or one corner of a large one."""
    cell = shapes.RENDER_SIZE // shapes.GRID
    assert shapes.IMAGE_SIZE // shapes.GRID == 14
    inset = round(cell * shapes.MARGIN)
    sides = set()
    for seed in range(200):
        for s in shapes.make_scene(seed).shapes:
            x0, y0, x1, y1 = s.box
            assert x0 % cell == y0 % cell == inset and x1 % cell == y1 % cell == cell - inset
            sides.add((x1 - x0 + 2 * inset) // cell)
            assert x1 - x0 == y1 - y0
    assert sides == {1, 2}
