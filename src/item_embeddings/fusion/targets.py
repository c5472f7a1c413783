"""What the fused space is trained to reproduce: every item's neighbour distribution over the
other items of its batch, built so that items with and without a photo are comparable.

For an anchor item and the other items of a batch (docs/fusion.md, *Objective*):

* **The profile** (how much weight the anchor's 1st, 2nd, ... nearest items with a photo get,
  and its 1st, 2nd, ... nearest items without one) is the *text* space's: the text softmax's
  probabilities on each group, sorted. A photo never changes *whether* an item's neighbours have
  photos, nor how concentrated its neighbourhood is.
* **The order** inside each group is decided with all the evidence the pair has: text and image
  cosines summed when both have a photo, the text cosine alone when neither has, and for a mixed
  pair the text cosine plus the cosine between the photo and the photo the other item's text
  predicts (:class:`Imputation`, a ridge regression fitted before training).

Inside each group this orders items exactly as the masked concatenation ``[text, image]`` does
(items with a photo) and as the text space does (items without); the top-k of every target row
has exactly the text space's share of items with a photo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

TAU = 0.05              # softmax temperature of target and fused similarities
# Weight of the preservation term: per anchor, the KL between the target's and the fused space's
# distributions *conditioned on the anchor's own group* (items with a photo, items without), so
# the order inside each group is kept however little mass the group gets (docs/fusion.md).
PRESERVE_WEIGHT = 1.0
_MIN_TAU = 0.025        # exp2(-2 log2(e) / tau) of the text softmax stays a normal float32
# Ridge strengths tried for the imputation, per sampled item (lambda = alpha * n): from almost
# unregularised to so strong that the prediction is the mean photo (what random image vectors
# get, as nothing about them can be predicted from the text).
RIDGE_ALPHAS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
RIDGE_FOLDS = 5
MIN_IMPUTATION_ITEMS = 2 * RIDGE_FOLDS  # fewer items with a photo: impute the mean photo
IMPUTATION_RANK = 64    # rank of the kept regression (its product with a batch is cheap)


@dataclass(frozen=True)
class Imputation:
    """The photo an item's text predicts: ``text @ text_factor @ image_factorᵀ + offset``.

    Fitted by ridge regression of the (centred) image vectors on the (centred) text vectors of
    items that have both, the strength chosen by cross-validation, and kept at rank
    ``IMPUTATION_RANK`` (the targets multiply by the factors, a batch's largest extra
    products). Used by the targets of mixed pairs and to start the model's stand-in for a
    missing image half (``init_from_pca``).
    """

    text_factor: torch.Tensor   # [text_dim, r] float32
    image_factor: torch.Tensor  # [img_dim, r] float32, orthonormal columns
    offset: torch.Tensor        # [img_dim] float32
    alpha: float | None         # chosen ridge strength per item (None: too few photos to fit)
    r2: float | None            # cross-validated share of image variance the text explains
    items: int                  # items with a photo it was fitted on
    kept: float = 1.0           # share of the regression's squared norm the rank-r factors keep

    @classmethod
    def from_weight(cls, weight: torch.Tensor, offset: torch.Tensor, alpha: float | None = None,
                    r2: float | None = None, items: int = 0,
                    rank: int = IMPUTATION_RANK) -> Imputation:
        """The rank-``rank`` truncation (SVD) of ``text @ weight + offset``."""
        u, sv, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        r = min(rank, len(sv))
        total = float(sv.pow(2).sum())
        kept = float(sv[:r].pow(2).sum()) / total if total > 0 else 1.0
        return cls((u[:, :r] * sv[:r]).to(offset.dtype), vh[:r].T.to(offset.dtype), offset,
                   alpha, r2, items, kept)

    @property
    def weight(self) -> torch.Tensor:
        """[text_dim, img_dim]: the (truncated) regression matrix."""
        return self.text_factor @ self.image_factor.T

    def predict(self, text: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.offset, text @ self.text_factor, self.image_factor.T)

    def summary(self) -> dict:
        return {"ridge_alpha": self.alpha, "cv_r2": self.r2, "items": self.items,
                "rank": self.text_factor.shape[1], "kept": self.kept}


def no_imputation(text_dim: int, img_dim: int, mean_image: torch.Tensor | None = None,
                  items: int = 0) -> Imputation:
    """No regression: every missing photo is imputed as the mean photo (or zero)."""
    offset = torch.zeros(img_dim) if mean_image is None else mean_image.float()
    return Imputation.from_weight(torch.zeros(text_dim, img_dim), offset, items=items, rank=1)


def fit_imputation(text: torch.Tensor, image: torch.Tensor) -> Imputation:
    """Ridge regression ``image ~ text`` on rows that have both (unit rows), with the strength
    that predicts held-out rows best (``RIDGE_FOLDS``-fold cross-validation).

    The rows enter only through Gram matrices (float32 products, float64 algebra): each fold's
    held-out error for every strength comes from the eigenbasis of the training Gram matrix,
    without predicting a row.
    """
    n, text_dim = text.shape
    if n < MIN_IMPUTATION_ITEMS:
        return no_imputation(text_dim, image.shape[1], image.mean(dim=0) if n else None, n)
    t_mean, v_mean = text.mean(dim=0), image.mean(dim=0)
    t, v = text - t_mean, image - v_mean
    folds = torch.arange(n) % RIDGE_FOLDS
    parts = [((t[folds == f].T @ t[folds == f]).double(),
              (t[folds == f].T @ v[folds == f]).double(),
              float(v[folds == f].double().pow(2).sum())) for f in range(RIDGE_FOLDS)]
    gram, cross = sum(p[0] for p in parts), sum(p[1] for p in parts)
    alphas = torch.tensor(RIDGE_ALPHAS, dtype=torch.float64) * n
    errors = torch.zeros(len(RIDGE_ALPHAS), dtype=torch.float64)
    for held_gram, held_cross, held_norm in parts:
        # W(alpha) = Q diag(1 / (eig + alpha)) R with R = Qᵀ (training cross products); the
        # held-out error |T W - V|² = |V|² - 2 dᵀ g + dᵀ (QᵀG_hQ ∘ RRᵀ) d, d = 1 / (eig + alpha)
        eigvals, q = torch.linalg.eigh(gram - held_gram)
        r = q.T @ (cross - held_cross)
        quadratic = (q.T @ held_gram @ q) * (r @ r.T)
        linear = ((q.T @ held_cross) * r).sum(dim=1)
        d = 1.0 / (eigvals.clamp_min(0).unsqueeze(0) + alphas.unsqueeze(1))   # [alphas, dim]
        errors += held_norm - 2 * d @ linear + ((d @ quadratic) * d).sum(dim=1)
    best = int(torch.argmin(errors))
    weight = torch.linalg.solve(gram + alphas[best] * torch.eye(text_dim, dtype=torch.float64),
                                cross)
    r2 = 1.0 - float(errors[best]) / sum(p[2] for p in parts)
    offset = v_mean.double() - t_mean.double() @ weight
    return Imputation.from_weight(weight, offset.float(), RIDGE_ALPHAS[best], r2, n)


class TrainingBatch(NamedTuple):
    """One minibatch with its fixed targets (no gradient; can be built ahead, off the trainer)."""

    text: torch.Tensor          # [B, text_dim] unit rows, the M items with an image first
    image: torch.Tensor         # [M, img_dim] unit rows: the images of text's first M rows
    target_sym: torch.Tensor    # [B, B] T + Tᵀ with T = P + PRESERVE_WEIGHT * P_own
    target_p_log_p: torch.Tensor  # scalar: Σ P log P + preserve Σ P_own log P_own (a constant)
    preserve: float = PRESERVE_WEIGHT  # the preservation term's weight the targets were built with


def check_tau(tau: float) -> None:
    if tau < _MIN_TAU:
        raise ValueError(f"tau must be >= {_MIN_TAU} (the softmax uses a fixed shift), got {tau}")


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_SELF = -200.0          # shifted base-2 logit of an item paired with itself: exp2 gives 0


def _ranked_like(order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row, ``values`` reassigned so that the largest goes to the column with the largest
    ``order``, the second largest to the second, and so on (a per-row permutation of
    ``values``; -inf orders last).

    An argsort is slow on the CPU; numpy's vectorised sort of int32 keys is not: ``order`` is
    quantised to the key's high bits (steps of 8 / 2^(31 - column bits), about 2e-6 for a batch
    of 512) and the column rides in the low bits, so equal keys keep the column order.
    """
    rows, cols = order.shape
    col_bits = max(1, (cols - 1).bit_length())
    levels = 2 ** (31 - col_bits)
    # 64 levels of headroom: float32 rounding must not carry the top level into the sign bit
    keys = (order.clamp(-4.0, 4.0).neg_().add_(4.0).mul_((levels - 64) / 8.0)
            .to(torch.int32).numpy())
    keys <<= col_bits
    keys |= np.arange(cols, dtype=np.int32)
    keys.sort(axis=1)
    keys &= (1 << col_bits) - 1
    keys += (np.arange(rows, dtype=np.int32) * cols)[:, None]
    ranked = np.sort(values.numpy(), axis=1)[:, ::-1]
    out = np.empty(rows * cols, dtype=ranked.dtype)
    out[keys.ravel()] = ranked.ravel()
    return torch.from_numpy(out.reshape(rows, cols))


def target_distribution(text: torch.Tensor, image: torch.Tensor, imputation: Imputation,
                        tau: float = TAU) -> tuple[torch.Tensor, torch.Tensor]:
    """P, [B, B]: each row's target distribution over the batch's other items (module doc),
    and ``Σ P log P`` (P permutes the text softmax within rows, so this is the text softmax's).

    Args:
        text: [B, text_dim] unit rows; the M items that have a photo come first.
        image: [M, img_dim] unit rows, the photos of ``text[:M]``.
        imputation: The photo each text predicts (for mixed pairs).
        tau: Softmax temperature.
    """
    target, p_log_p, _ = _targets(text, image, imputation, tau)
    return target, p_log_p


def _targets(text: torch.Tensor, image: torch.Tensor, imputation: Imputation,
             tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`target_distribution`'s P and ``Σ P log P``, and per row [B] the part of that sum
    over the row's own group (items with a photo, or without)."""
    check_tau(tau)
    b, m = text.shape[0], image.shape[0]
    scale = _LOG2E / tau
    text_sim = _gram(text)
    # the text softmax in base 2; cosines are at most 1, so a fixed shift needs no max pass
    logits = text_sim.mul(scale).sub_(scale).fill_diagonal_(_SELF)
    target = torch.exp2(logits)
    row_sum = target.sum(dim=1, keepdim=True)
    target /= row_sum
    log_sum = row_sum.squeeze(1).log()
    p_log_p = (torch.linalg.vecdot(target, logits, dim=1) * _LN2 - log_sum).sum()
    # P log P = P (logits ln 2 - log row_sum), summed over each row's own group here, before
    # the ranking: it permutes values only within a group's block, so the sums stay (and no
    # log of B² values is taken for the preservation term)
    own = logits.new_empty(b)
    for rows in (slice(0, m), slice(m, b)):
        block = target[rows, rows]
        own[rows] = (torch.linalg.vecdot(block, logits[rows, rows], dim=1) * _LN2
                     - block.sum(dim=1) * log_sum[rows])
    if m == 0:
        return target, p_log_p, own
    # evidence of two photos: text + image cosines
    both = text_sim[:m, :m].addmm(image, image.T).fill_diagonal_(-torch.inf)
    target[:m, :m] = _ranked_like(both, target[:m, :m])
    if m < b:
        # mixed pairs: text cosine + the photo's cosine with the photo the other text predicts,
        # v · (t A Bᵀ + o) = (v B) · (t A) + v · o: one product, the same evidence for the
        # text-only anchors as its transposed copy
        photos, texts = image @ imputation.image_factor, text[m:] @ imputation.text_factor
        offset = (image @ imputation.offset).unsqueeze(1)
        mixed = torch.addmm(text_sim[:m, m:], photos, texts.T).add_(offset)
        target[:m, m:] = _ranked_like(mixed, target[:m, m:])
        target[m:, :m] = _ranked_like(mixed.T.contiguous(), target[m:, :m])
    return target, p_log_p, own


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ xᵀ`` from three quarters of the product: the lower-left block is the transposed
    upper-right one (the batch's largest target product; docs/fusion.md, *Threads*)."""
    b, h = x.shape[0], x.shape[0] // 2
    out = x.new_empty(b, b)
    torch.mm(x[:h], x.T, out=out[:h])
    out[h:, h:] = x[h:] @ x[h:].T
    out[h:, :h] = out[:h, h:].T
    return out


def group_blocks(b: int, m: int) -> tuple[slice, ...]:
    """The batch's groups that have a pair (the M items with a photo first, then the others)."""
    return tuple(g for g in (slice(0, m), slice(m, b)) if g.stop - g.start >= 2)


def training_batch(text: torch.Tensor, image: torch.Tensor, imputation: Imputation,
                   tau: float = TAU, preserve: float = PRESERVE_WEIGHT) -> TrainingBatch:
    """The batch with its targets ``T + Tᵀ``, ``T = P + preserve * P_own``, and the objective's
    constant part.

    P is :func:`target_distribution`'s; ``P_own`` is P restricted to the anchor's own group
    (items with a photo, or without) and renormalised: the target of the preservation term.
    """
    target, p_log_p, own_p_log_p = _targets(text, image, imputation, tau)
    if preserve:
        for group in group_blocks(text.shape[0], image.shape[0]):
            block = target[group, group]
            mass = block.sum(dim=1)
            # P_own = P / mass on the group: Σ P_own log P_own = Σ P log P / mass - log mass
            p_log_p = p_log_p + preserve * (own_p_log_p[group] / mass - mass.log()).sum()
            block.mul_((preserve / mass).add_(1.0).unsqueeze(1))  # P + preserve * P_own
    # (a transposed copy, then a plain add, is about twice as fast as adding the transpose)
    return TrainingBatch(text, image, target.T.contiguous().add_(target), p_log_p, preserve)
