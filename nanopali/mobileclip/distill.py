"""Multi-modal reinforced training: the loss MobileCLIP and MobileCLIP2 train with (arXiv 2311.17049 §3.1).

A reinforced dataset stores, per image, A augmentations (their parameters, so the image can be re-made)
and S synthetic captions (from a captioner), and for each of them the embeddings of K teacher CLIP
models. A step samples one augmentation and one synthetic caption per image and never runs a teacher.
For a batch of b pairs, with S_τ(U, V) = softmax over rows of U·Vᵀ / τ (unit-norm rows):

    L_CLIP     = ½ [CE(S_τ̂(Φ_img, Φ_txt), I) + CE(S_τ̂(Φ_txt, Φ_img), I)]      (student Φ, temperature τ̂)
    L_Distill  = ½ (1/bK) Σ_k [ KL(S_τk(Ψk_img, Ψk_txt) ‖ S_τ̂(Φ_img, Φ_txt))
                               + KL(S_τk(Ψk_txt, Ψk_img) ‖ S_τ̂(Φ_txt, Φ_img)) ]   (teachers Ψk, temperatures τk)
    L          = (1 - λ) L_CLIP + λ L_Distill

computed on the ground-truth captions and on the sampled synthetic captions, the two added (ml-mobileclip's
DRClipLoss: `loss_gt` and `loss_syn`, summed by its training loop). Logit scales are 1/τ, as open_clip
keeps them. open_clip's `DistillClipLoss.dist_loss` writes the distillation term as a cross-entropy
-Σ p log q, which is the KL above plus the teachers' entropy: a constant for the student, so the same
gradients (tests/test_mobileclip_distill.py checks both).
Letters: b batch, D student embedding, Dk teacher k's embedding, K teachers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: pair i is image i with text i. image, text (b, D) unit-norm; scale = 1/τ̂."""
    logits = scale * image @ text.T                                                       # (b, b)
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Σ_rows KL(softmax(teacher row) ‖ softmax(student row)) / rows."""
    p = teacher_logits.log_softmax(-1)
    return (p.exp() * (p - student_logits.log_softmax(-1))).sum(-1).mean()


def distillation_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                      teacher_images: list[torch.Tensor], teacher_texts: list[torch.Tensor],
                      teacher_scales: list[float]) -> torch.Tensor:
    """½ (image→text + text→image) KL from each teacher's similarity distribution to the student's,
    averaged over the K teachers. Teachers are data (stored embeddings): no gradient reaches them."""
    if not (len(teacher_images) == len(teacher_texts) == len(teacher_scales) > 0):
        raise ValueError(f"Give the same number (≥ 1) of teacher image embeddings ({len(teacher_images)}), text "
                         f"embeddings ({len(teacher_texts)}) and scales ({len(teacher_scales)})")
    student = scale * image @ text.T                                                       # (b, b)
    total = 0.0
    for ti, tt, ts in zip(teacher_images, teacher_texts, teacher_scales):
        ti, tt = (F.normalize(e.detach().to(student.dtype), dim=-1) for e in (ti, tt))
        t = ts * ti @ tt.T                                                                 # (b, b)
        total = total + (kl_rows(t, student) + kl_rows(t.T, student.T)) / 2
    return total / len(teacher_images)


@dataclass
class ReinforcedBatch:
    """One step's stored targets: teacher embeddings (a list over the K teachers, each (b, Dk)) for the
    sampled augmentation of each image, its ground-truth caption and its sampled synthetic caption."""
    teacher_images: list[torch.Tensor]
    teacher_texts: list[torch.Tensor]
    teacher_synthetic_texts: list[torch.Tensor]


def reinforced_loss(image: torch.Tensor, text: torch.Tensor, synthetic_text: torch.Tensor | None,
                    scale: torch.Tensor, targets: ReinforcedBatch, teacher_scales: list[float],
                    lam: float) -> dict[str, torch.Tensor]:
    """(1 - λ) L_CLIP + λ L_Distill on the ground-truth captions, plus the same on the synthetic ones.

    image, text, synthetic_text: the student's unnormalised embeddings (b, D); scale: exp(logit_scale).
    λ = 0 is CLIP training on the same pairs (the baseline); λ = 1 is distillation alone."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (λ, the distillation weight) must be in [0, 1], got {lam}")
    x = F.normalize(image, dim=-1)
    out = {}
    pairs = [("gt", text, targets.teacher_texts)]
    if synthetic_text is not None:
        pairs.append(("syn", synthetic_text, targets.teacher_synthetic_texts))
    for name, t, teacher_t in pairs:
        y = F.normalize(t, dim=-1)
        out[f"contrastive_{name}"] = (1 - lam) * contrastive_loss(x, y, scale)
        if lam > 0:
            out[f"distill_{name}"] = lam * distillation_loss(x, y, scale, targets.teacher_images, teacher_t,
                                                             teacher_scales)
    out["loss"] = sum(out.values())
    return out


__all__ = ["contrastive_loss", "kl_rows", "distillation_loss", "ReinforcedBatch", "reinforced_loss"]
