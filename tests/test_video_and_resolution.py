"""Video frames sampled evenly and in order; SigLIP position tables resampled to a new resolution."""
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import nanopali
from nanopali.tasks.video import sample_indices, video_frames
from nanopali.vit import resample_pos_embed
from tolerance import assert_rounding_close

COLOURS = [(i * 20, 255 - i * 20, (i * 53) % 256) for i in range(12)]


def _gif(path, n):
    frames = [Image.new("RGB", (16, 12), COLOURS[i]) for i in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)
    return path


def _frame_index(im):
    r, g, b = np.asarray(im)[6, 8].tolist()
    return min(range(len(COLOURS)), key=lambda i: sum(abs(x - y) for x, y in zip(COLOURS[i], (r, g, b))))


def test_frames_of_an_animated_gif_are_the_segment_centres_in_time_order(tmp_path):
    frames = video_frames(_gif(tmp_path / "v.gif", 12), num_frames=4)
    assert [_frame_index(f) for f in frames] == [1, 4, 7, 10]   # centres of [0,3), [3,6), [6,9), [9,12)
    assert all(f.mode == "RGB" and f.size == (16, 12) for f in frames)


def test_a_folder_of_images_is_read_in_name_order(tmp_path):
    for i in range(6):
        Image.new("RGB", (8, 8), COLOURS[i]).save(tmp_path / f"frame_{i:03d}.png")
    assert [_frame_index(f.resize((16, 12))) for f in video_frames(tmp_path, num_frames=3)] == [1, 3, 5]


def test_a_video_with_fewer_frames_than_asked_gives_all_of_them_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="fewer than"):
        frames = video_frames(_gif(tmp_path / "v.gif", 3), num_frames=8)
    assert [_frame_index(f) for f in frames] == [0, 1, 2]


def test_mp4_without_the_video_extra_names_the_install_command(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(nanopali.InputError, match=r'pip install -e "\.\[video\]"'):
        video_frames(tmp_path / "clip.mp4")


def test_sample_indices_spread_evenly_and_never_repeat():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = sample_indices(100, 16)
    assert idx == sorted(set(idx)) and len(idx) == 16 and idx[0] == 3 and idx[-1] == 96


def test_resampling_a_position_table_to_its_own_size_is_the_identity():
    pos = torch.randn(16, 7)
    assert torch.equal(resample_pos_embed(pos, 16), pos)


def test_resampling_a_linear_ramp_to_twice_the_grid_gives_the_ramp_on_the_new_grid():
    # value = 3·row + 5·col + c on a 4x4 grid; bilinear with aligned corners reproduces a linear
    # function exactly, with rows/cols spaced (4-1)/(8-1) apart on the 8x8 grid.
    g_old, g_new, w = 4, 8, 3
    r, c = torch.meshgrid(torch.arange(g_old, dtype=torch.float64), torch.arange(g_old, dtype=torch.float64),
                          indexing="ij")
    pos = torch.stack([3 * r + 5 * c + k for k in range(w)], -1).reshape(g_old * g_old, w)
    out = resample_pos_embed(pos, g_new * g_new).reshape(g_new, g_new, w)
    s = (g_old - 1) / (g_new - 1)
    r2, c2 = torch.meshgrid(torch.arange(g_new) * s, torch.arange(g_new) * s, indexing="ij")
    want = torch.stack([3 * r2 + 5 * c2 + k for k in range(w)], -1)
    # bilinear weights times values up to 3·3 + 5·3 + 2 = 26, interpolated in float32: rounding only
    assert_rounding_close(out, want, torch.float32, 4, "resampled ramp")


def test_a_non_square_position_table_is_refused():
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(torch.randn(12, 4), 16)
