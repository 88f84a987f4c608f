"""The prefix-LM mask (PaliGemma paper §3.2; docs/sequence.md), against hand-computed small cases.

Rows are [left pads][image + BOS + prompt + "\\n"][suffix + EOS]. The pictures below are written by
hand: row = query, column = key, '#' = may attend. Both examples use two rows of 7 tokens:
  row 0: no pads, 5 prefix tokens, 2 suffix tokens   attention_mask 1111111, token_type_ids 0000011
  row 1: 2 pads, 4 prefix tokens, 1 suffix token     attention_mask 0011111, token_type_ids 0000001
"""
import pytest
import torch

from nanopali import PrefixLMMask

ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
TOKEN_TYPE_IDS = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1]])

PICTURE = """\
row 0: start=0 prefix_end=5
  p #####..
  p #####..
  p #####..
  p #####..
  p #####..
  s ######.
  s #######
row 1: start=2 prefix_end=6
  P #......
  P .#.....
  p ..####.
  p ..####.
  p ..####.
  p ..####.
  s ..#####"""


def _grid(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in r] for r in rows])


EXPECTED = torch.stack([
    _grid([line[4:] for line in PICTURE.splitlines()[1:8]]),
    _grid([line[4:] for line in PICTURE.splitlines()[9:16]]),
])  # (B, T, S)


@pytest.fixture
def mask():
    return PrefixLMMask.from_batch(ATTENTION_MASK, TOKEN_TYPE_IDS)


def test_allowed_mask_equals_the_hand_computed_picture(mask):
    assert mask.allowed().shape == (2, 1, 7, 7)
    assert torch.equal(mask.allowed()[:, 0], EXPECTED)


def test_no_real_token_attends_to_a_pad(mask):
    m = mask.allowed()[1, 0]
    assert not m[2:, :2].any()


def test_a_pad_attends_only_to_itself(mask):
    m = mask.allowed()[1, 0]
    assert torch.equal(m[:2], torch.eye(7, dtype=torch.bool)[:2])


def test_image_and_prefix_tokens_attend_to_each_other_in_both_directions(mask):
    m = mask.allowed()[:, 0]
    assert m[0, :5, :5].all() and m[1, 2:6, 2:6].all()


def test_prefix_tokens_cannot_see_suffix_tokens(mask):
    m = mask.allowed()[:, 0]
    assert not m[0, :5, 5:].any() and not m[1, 2:6, 6:].any()


def test_suffix_tokens_cannot_see_later_suffix_tokens(mask):
    assert not mask.allowed()[0, 0, 5, 6]


def test_suffix_tokens_see_the_whole_prefix_and_earlier_suffix_tokens(mask):
    m = mask.allowed()[:, 0]
    assert m[0, 6, :7].all() and m[1, 6, 2:].all()


def test_without_token_type_ids_every_real_token_is_prefix():
    m = PrefixLMMask.from_batch(ATTENTION_MASK).allowed()[1, 0]
    assert m[2:, 2:].all() and not m[2:, :2].any()


def test_loss_mask_covers_only_suffix_and_eos(mask):
    assert mask.loss_mask().tolist() == [[False] * 5 + [True] * 2, [False] * 6 + [True]]


def test_positions_count_from_one_at_the_first_real_token(mask):
    pos = mask.positions()
    assert pos[0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert pos[1, 2:].tolist() == [1, 2, 3, 4, 5]  # pads' positions are never read


def test_positions_count_from_zero_with_base_zero(mask):
    assert mask.positions(base=0)[1, 2:].tolist() == [0, 1, 2, 3, 4]


def test_sliding_window_limits_only_suffix_queries():
    # 1 pad, prefix of 3 (longer than the window of 2), suffix of 2.
    m = PrefixLMMask.from_batch(torch.tensor([[0, 1, 1, 1, 1, 1]]), torch.tensor([[0, 0, 0, 0, 1, 1]]))
    assert torch.equal(m.allowed(window=2)[0, 0], _grid([
        "#.....",
        ".###..",   # prefix queries see the whole prefix, however long
        ".###..",
        ".###..",
        "...##.",   # a suffix query sees the last 2 keys, itself included
        "....##",
    ]))


def test_window_longer_than_the_row_changes_nothing(mask):
    assert torch.equal(mask.allowed(window=7)[:, 0], EXPECTED)


def test_mask_prints_as_the_expected_picture(mask):
    assert str(mask) == PICTURE


def test_processor_rows_hold_exactly_one_bos_after_pads_and_image_tokens(model_pair, test_images):
    pair = model_pair("pg1")
    p = pair.processor
    batch = p(images=[test_images["rgb-square"]] * 3, prompts=["caption en", "ocr", "answer en where is the cow?"],
              suffixes=["a cat", "12 34", "on the beach"])
    for ids, am in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        start = am.index(1)
        assert ids.count(p.bos_id) == 1
        assert ids[:start] == [p.pad_id] * start
        assert ids[start:start + p.num_image_tokens] == [p.image_token_id] * p.num_image_tokens
        assert ids[start + p.num_image_tokens] == p.bos_id


def test_suffix_ends_with_eos_and_is_the_token_type_one_part(model_pair, test_images):
    pair = model_pair("pg1")
    batch = pair.processor(images=[test_images["rgb-square"]], prompts=["caption en"], suffixes=["a cat"])
    ids, types = batch["input_ids"][0].tolist(), batch["token_type_ids"][0].tolist()
    n = sum(types)
    assert ids[-n:] == pair.processor.sp.encode("a cat") + [pair.processor.eos_id]
    assert types == [0] * (len(ids) - n) + [1] * n


@pytest.mark.parametrize("attention_mask", [
    [[1, 1, 1, 1, 1, 0, 0]],   # right padding
    [[0, 1, 1, 0, 1, 1, 1]],   # a hole in the row
], ids=["right-padded", "hole"])
def test_malformed_attention_mask_is_rejected_by_name(attention_mask):
    with pytest.raises(ValueError, match="attention_mask"):
        PrefixLMMask.from_batch(torch.tensor(attention_mask), torch.zeros(1, 7, dtype=torch.long))


def test_suffix_before_prefix_in_token_type_ids_is_rejected_by_name():
    with pytest.raises(ValueError, match="token_type_ids"):
        PrefixLMMask.from_batch(torch.ones(1, 7, dtype=torch.long), torch.tensor([[0, 1, 1, 0, 0, 0, 0]]))


def test_attention_mask_without_a_batch_axis_is_rejected_by_name():
    with pytest.raises(ValueError, match="attention_mask"):
        PrefixLMMask.from_batch(torch.ones(7, dtype=torch.long))


def test_token_type_ids_of_another_shape_are_rejected_by_name():
    with pytest.raises(ValueError, match="token_type_ids"):
        PrefixLMMask.from_batch(torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long))


def test_model_rejects_a_right_padded_batch(model_pair, test_images):
    pair = model_pair("pg1")
    batch = pair.processor(images=[test_images["rgb-square"]] * 2, prompts=["caption en", "answer en where is it?"])
    right_padded = dict(batch, attention_mask=batch["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="attention_mask"):
        pair.model(**right_padded)


def test_a_decode_step_reads_the_rows_of_the_whole_mask_at_its_slot(mask):
    # one mask rule for every slot: the step's slot as a 0-d tensor (as a compiled step has it) selects
    # the same rows of the whole mask as the integer index does, with and without a window
    for window in (None, 2):
        whole = mask.allowed(window=window)                                          # (B, 1, T, T)
        for slot in range(7):
            assert torch.equal(mask.allowed(torch.tensor(slot), 1, 7, window), whole[:, :, slot:slot + 1])
