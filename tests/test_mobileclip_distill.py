"""The multi-modal reinforced training loss (nanopali/mobileclip/distill.py), against hand computation and
open_clip's formula; and the shapes entry point runs end to end (a few steps; the measured run is in
docs/mobileclip.md)."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanopali.mobileclip import shapes as mshapes
from nanopali.mobileclip.distill import ReinforcedBatch, contrastive_loss, distillation_loss, reinforced_loss
from tolerance import assert_rounding_close


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_contrastive_loss_of_two_pairs_by_hand():
    x, y = _unit([1, 0], [0, 1]), _unit([1, 0], [1, 1])
    s = 2.0
    c = 1 / math.sqrt(2)                       # cos(x0, y1) = cos(x1, y1) = 1/√2, cos(x0, y0) = 1, cos(x1, y0) = 0
    e, ec = math.exp(s), math.exp(s * c)
    i2t = (-math.log(e / (e + ec)) - math.log(ec / (1 + ec))) / 2        # rows: image 0, image 1
    t2i = (-math.log(e / (e + 1)) - math.log(ec / (ec + ec))) / 2         # rows: text 0, text 1
    got = contrastive_loss(x, y, torch.tensor(s, dtype=torch.float64)).item()
    assert got == pytest.approx((i2t + t2i) / 2, abs=1e-12)


def test_distillation_loss_of_two_pairs_by_hand():
    """One teacher; KL(p‖q) row by row, both directions, halved."""
    x, y = _unit([1, 0], [0, 1]), _unit([1, 0], [0, 1])           # student: cos = identity
    tx, ty = _unit([1, 0], [1, 1]), _unit([1, 0], [0, 1])         # teacher: image 1 half-way between
    s, ts = 3.0, 5.0

    def kl(p_logits, q_logits):
        p = [math.exp(v) / sum(map(math.exp, p_logits)) for v in p_logits]
        q = [math.exp(v) / sum(map(math.exp, q_logits)) for v in q_logits]
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    c = 1 / math.sqrt(2)
    t = [[ts, 0], [ts * c, ts * c]]                               # teacher logits (image rows)
    st = [[s, 0], [0, s]]
    i2t = (kl(t[0], st[0]) + kl(t[1], st[1])) / 2
    t2i = (kl([t[0][0], t[1][0]], st[0]) + kl([t[0][1], t[1][1]], st[1])) / 2
    got = distillation_loss(x, y, torch.tensor(s, dtype=torch.float64), [tx], [ty], [ts])
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-12)


def _batch(b=6, d=8, dt=(5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(b, d, generator=g, requires_grad=True) for _ in range(3)]   # image, text, synthetic text
    teachers = ReinforcedBatch(*[[torch.randn(b, k, generator=g, requires_grad=True) for k in dt] for _ in range(3)])
    return student, teachers


def test_distillation_is_open_clips_cross_entropy_minus_the_teachers_entropy():
    """open_clip `DistillClipLoss.dist_loss`: -Σ softmax(t) log_softmax(s), per teacher, averaged; the
    KL of the paper differs by the teacher entropy, so the values differ by it and the gradients agree."""
    (x, y, _), tb = _batch()
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    scale, scales = torch.tensor(14.0), [20.0, 10.0]
    ours = distillation_loss(x, y, scale, tb.teacher_images, tb.teacher_texts, scales)
    student = scale * x @ y.T
    ce, entropy = 0, 0
    for ti, tt, ts in zip(tb.teacher_images, tb.teacher_texts, scales):
        t = ts * F.normalize(ti.detach(), dim=-1) @ F.normalize(tt.detach(), dim=-1).T
        for tl, sl in ((t, student), (t.T, student.T)):
            ce = ce + -(tl.softmax(1) * sl.log_softmax(1)).sum(1).mean(0) / 2 / len(scales)
            entropy = entropy + -(tl.softmax(1) * tl.log_softmax(1)).sum(1).mean(0) / 2 / len(scales)
    terms = x.shape[-1] + 2 * x.shape[0]     # a similarity over the width, a softmax over the batch
    assert_rounding_close(ours.item(), (ce - entropy).item(), torch.float32, terms, "loss")
    g_ours = torch.autograd.grad(ours, x, retain_graph=True)[0]
    g_ref = torch.autograd.grad(ce, x)[0]
    assert_rounding_close(g_ours, g_ref, torch.float32, 2 * terms, "gradient")


def test_loss_equals_open_clip_distill_clip_loss_live():
    loss_module = pytest.importorskip("open_clip.loss", reason="open_clip is the oracle; see docs/mobileclip.md")
    (x, y, _), tb = _batch(dt=(8,))
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    ti, tt = F.normalize(tb.teacher_images[0], dim=-1), F.normalize(tb.teacher_texts[0], dim=-1)
    clip, dist = loss_module.DistillClipLoss()(x, y, torch.tensor(14.0), ti, tt, torch.tensor(20.0))
    entropy = sum(-(t.softmax(1) * t.log_softmax(1)).sum(1).mean() for t in (20 * ti @ tt.T, 20 * tt @ ti.T)) / 2
    assert contrastive_loss(x, y, torch.tensor(14.0)).item() == pytest.approx(clip.item(), abs=1e-6)
    assert distillation_loss(x, y, torch.tensor(14.0), [ti], [tt], [20.0]).item() == pytest.approx(
        (dist - entropy).item(), abs=1e-6)


def test_gradient_reaches_the_student_only():
    (x, y, ys), tb = _batch()
    out = reinforced_loss(x, y, ys, torch.tensor(10.0), tb, [20.0, 10.0], lam=0.7)
    out["loss"].backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, y, ys))
    assert all(t.grad is None for ts in (tb.teacher_images, tb.teacher_texts, tb.teacher_synthetic_texts) for t in ts)


def test_mixing_weight_and_synthetic_captions_combine_as_the_paper_says():
    (x, y, ys), tb = _batch()
    scale, scales, lam = torch.tensor(10.0), [20.0, 10.0], 0.3
    out = reinforced_loss(x, y, ys, scale, tb, scales, lam)
    xn, yn, sn = (F.normalize(t, dim=-1) for t in (x, y, ys))
    gt = (1 - lam) * contrastive_loss(xn, yn, scale) + lam * distillation_loss(
        xn, yn, scale, tb.teacher_images, tb.teacher_texts, scales)
    syn = (1 - lam) * contrastive_loss(xn, sn, scale) + lam * distillation_loss(
        xn, sn, scale, tb.teacher_images, tb.teacher_synthetic_texts, scales)
    assert out["loss"].item() == pytest.approx((gt + syn).item(), abs=1e-6)
    only_clip = reinforced_loss(x, y, None, scale, tb, scales, 0.0)
    assert set(only_clip) == {"contrastive_gt", "loss"}
    with pytest.raises(ValueError, match="lam"):
        reinforced_loss(x, y, ys, scale, tb, scales, 1.5)


def test_shapes_distillation_runs_end_to_end(tmp_path):
    data = mshapes.build_dataset(8, captioner=None)
    assert data["images"].shape == (8, 2, mshapes.IMAGE_SIZE, mshapes.IMAGE_SIZE, 3)
    assert torch.equal(data["images"][:, 1], data["images"][:, 0].flip(2))   # the stored augmentation: a mirror
    model, processor = mshapes.train(data, lam=0.7, steps=1, batch_size=4)
    result = mshapes.evaluate(model, processor, num_scenes=8)
    assert 0 <= result["image_to_caption_top1"] <= 1


def test_captions_parse_back_into_the_teachers_attributes():
    assert mshapes.parse_caption("two red circles and a blue square") == [(2, "red", "circle"), (1, "blue", "square")]
    assert mshapes.parse_caption("three ogres") == []
