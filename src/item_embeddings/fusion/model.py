"""The fusion MLP, its training loss with a hand-written gradient, and its weights on disk.

Model: ``concat(text, image or stand-in, has_image) -> Linear -> ReLU -> Linear ->
L2-normalise``. The first Linear is stored in blocks (text columns + bias, image columns, the
has-image column, and the stand-in for a missing image half: a linear function of the text) so
a batch only multiplies the image block for the rows that have an image, and a row without one
multiplies one combined text block. Input rows are L2-normalised on the way in
(:func:`unit_rows`, used by the step and by :meth:`FusionMLP.fuse`), so new items are treated
exactly like the training items. The targets the loss compares with are built in
:mod:`.targets`.

Example::

    model = load_fusion_model("out/fused")          # the step's output dir (or the .safetensors)
    codes = model.fuse(text_vectors, image_vectors, has_image)   # [n, 128] float32, unit rows
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import PipelineParams
from ..outputs import FUSION_WEIGHTS
from ..storage import atomic_path
from .targets import TAU, Imputation, TrainingBatch, check_tau, group_blocks

_T = TypeVar("_T")
_META_KEY = "fusion_model"  # safetensors metadata entry holding the architecture (JSON)
OBJECTIVE = "modality-balanced-kl+norm"
NORM_WEIGHT = 0.01      # weight of the pre-normalisation norm regulariser
_EPS = 1e-12
NULL_SPACE_RATIO = 1e-6  # eigenvalues below this share of the largest: directions no item spans
_MASKED = -1e9          # logit of an item paired with itself
_LOG2E = 1.4426950408889634


class FusionMLP(nn.Module):
    """``concat(text, image or stand-in, has_image)`` -> hidden (ReLU) -> ``output_dim``,
    unit-length output. The stand-in for a missing image half is a linear function of the
    text; only its product with the image block matters, so it is stored as that product
    (``standin_in``, text columns + bias), started from the imputation of the photo
    (``init_from_pca``) and trained with the rest. Zero, it is the zero image half."""

    def __init__(self, text_dim: int, img_dim: int,
                 hidden_dim: int = PipelineParams().fusion_hidden_dim,
                 output_dim: int = PipelineParams().fusion_output_dim):
        super().__init__()
        for name, value in (("text_dim", text_dim), ("img_dim", img_dim),
                            ("hidden_dim", hidden_dim), ("output_dim", output_dim)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.text_dim, self.img_dim = int(text_dim), int(img_dim)
        self.hidden_dim, self.output_dim = int(hidden_dim), int(output_dim)
        self.text_in = nn.Linear(self.text_dim, self.hidden_dim)
        self.image_in = nn.Linear(self.img_dim, self.hidden_dim, bias=False)
        self.mask_in = nn.Parameter(torch.zeros(self.hidden_dim))  # weight of the has-image bit
        self.standin_in = nn.Linear(self.text_dim, self.hidden_dim)  # image block · stand-in
        nn.init.zeros_(self.standin_in.weight)
        nn.init.zeros_(self.standin_in.bias)
        self.out = nn.Linear(self.hidden_dim, self.output_dim)

    def forward(self, text: torch.Tensor, image: torch.Tensor, image_pos: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes for a batch of unit-length input rows (see :func:`unit_rows`).

        Args:
            text: [B, text_dim] text vectors.
            image: [M, img_dim] image vectors of the M batch rows that have one.
            image_pos: [M] int64 positions of those rows in the batch.

        Returns:
            (z, h): the unit-length codes [B, output_dim] and the codes before normalisation.
        """
        h = self.out(F.relu(self.pre_activation(text, image, image_pos)))
        return F.normalize(h, dim=1, eps=_EPS), h

    def pre_activation(self, text: torch.Tensor, image: torch.Tensor, image_pos: torch.Tensor
                       ) -> torch.Tensor:
        """The first layer, ``W1 · concat(text, image or stand-in, has_image) + b1``,
        [B, hidden_dim]: rows with an image add the image block (the has-image column's weight
        as its bias), rows without multiply the text block plus the stand-in's."""
        without = torch.ones(text.shape[0], dtype=torch.bool)
        without[image_pos] = False
        rows = without.nonzero().squeeze(1)
        hidden = text.new_empty(text.shape[0], self.hidden_dim)
        hidden[rows] = F.linear(text[rows], *self.standin_layer())
        if image.shape[0]:
            hidden[image_pos] = F.linear(text[image_pos], self.text_in.weight,
                                         self.text_in.bias).addmm_(
                image, self.image_in.weight.T).add_(self.mask_in)
        return hidden

    def standin_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the first layer for a row without an image: text block plus the
        stand-in's (the image block applied to the stand-in)."""
        return (self.text_in.weight + self.standin_in.weight,
                self.text_in.bias + self.standin_in.bias)

    @torch.no_grad()
    def fuse(self, text: np.ndarray, image: np.ndarray | None = None,
             has_image: np.ndarray | None = None, batch_size: int = 8192) -> np.ndarray:
        """Fuse new items with the trained model.

        Args:
            text: [n, text_dim] text vectors (the text step's encoder).
            image: [n, img_dim] image vectors aligned with ``text``; rows where ``has_image`` is
                False are ignored. None: no item has an image.
            has_image: [n] bool; None means every row of ``image`` is an image.

        Returns:
            [n, output_dim] float32, L2-normalised.

        Raises:
            ValueError: wrong shapes, or a non-finite / zero vector (the row is named).
        """
        text = np.asarray(text, dtype=np.float32)
        if text.ndim != 2 or text.shape[1] != self.text_dim:
            raise ValueError(f"text vectors must be [n, {self.text_dim}], got {list(text.shape)}")
        n = text.shape[0]
        if image is None:
            has = np.zeros(n, dtype=bool)
            image = np.zeros((n, self.img_dim), dtype=np.float32)
        else:
            image = np.asarray(image, dtype=np.float32)
            if image.ndim != 2 or image.shape != (n, self.img_dim):
                raise ValueError(f"image vectors must be [{n}, {self.img_dim}], "
                                 f"got {list(image.shape)}")
            has = np.ones(n, dtype=bool) if has_image is None else np.asarray(has_image, bool)
            if has.shape != (n,):
                raise ValueError(f"has_image must be [{n}], got {list(has.shape)}")
        checks = (("text", text, np.arange(n)), ("image", image, np.flatnonzero(has)))
        for name, vectors, rows in checks:
            bad = rows[~usable_rows(vectors[rows])]
            if bad.size:
                raise ValueError(f"{bad.size} {name} vector(s) are non-finite or zero, "
                                 f"at rows {bad[:5].tolist()}")
        out = np.empty((n, self.output_dim), dtype=np.float32)
        self.eval()
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            pos = np.flatnonzero(has[start:stop])
            z, _ = self(unit_rows(text[start:stop]), unit_rows(image[start:stop][pos]),
                        torch.from_numpy(pos))
            out[start:stop] = z.numpy()
        return out


def unit_rows(vectors: np.ndarray) -> torch.Tensor:
    """Rows L2-normalised as a float32 tensor (the contract says they are; this makes it so)."""
    return F.normalize(torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)),
                       dim=1, eps=_EPS)


def usable_rows(vectors: np.ndarray) -> np.ndarray:
    """[n] bool: the row's squared norm is finite and positive (it can be L2-normalised).

    NaN or Inf anywhere in a row makes its squared norm non-finite, so one pass suffices.
    """
    squared = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    return np.isfinite(squared) & (squared > 0)


@torch.no_grad()
def init_from_pca(model: FusionMLP, second_moment: np.ndarray,
                  imputation: Imputation | None = None) -> int:
    """Start the MLP as the projection on the top principal directions of its input.

    ``second_moment`` is E[x xᵀ] of the (uncentred, unit-row) input ``x = [text, image]``, where
    an item without an image has its imputed photo (``imputation``) or zero. With
    k = min(output_dim, hidden_dim // 2) directions P, the hidden layer holds ReLU(Px) and
    ReLU(-Px) and the output layer subtracts them, so the initial code is exactly Px: training
    starts from the linear baseline (PCA) instead of a random projection and refines it. The
    stand-in of an item without an image starts as its imputed photo, so the start places it
    where an item with that photo would be. The other hidden units keep their random weights
    with zero outgoing weights.

    Returns:
        k, the number of principal directions used.
    """
    dim = model.text_dim + model.img_dim
    if second_moment.shape != (dim, dim):
        raise ValueError(f"second moment must be [{dim}, {dim}], got {list(second_moment.shape)}")
    k = min(model.output_dim, model.hidden_dim // 2, dim)
    # torch's LAPACK honours torch's thread count; numpy's may spin on every core.
    eigvals, eigvecs = torch.linalg.eigh(torch.from_numpy(second_moment).double())
    # Only directions the items span: in the null space (a catalogue with fewer items than
    # dimensions) the basis is whatever rounding makes it, and an item's projection on it is
    # rounding noise at ReLU's kink, so float-level changes of the input (another shard
    # layout) would decide which units train. Those units keep their seeded random weights.
    k = min(k, int((eigvals > NULL_SPACE_RATIO * eigvals.max()).sum()))
    if k == 0:
        return 0
    top = eigvecs[:, torch.argsort(eigvals, descending=True, stable=True)[:k]].T  # [k, dim]
    signs = torch.sign(top[torch.arange(k), top.abs().argmax(dim=1)])  # a fixed sign per vector
    p = (top * signs.unsqueeze(1)).float()
    p_text, p_image = p[:, :model.text_dim], p[:, model.text_dim:]
    model.text_in.weight[:2 * k] = torch.cat([p_text, -p_text])
    model.image_in.weight[:2 * k] = torch.cat([p_image, -p_image])
    model.text_in.bias[:2 * k] = 0
    model.mask_in.zero_()
    model.standin_in.weight.zero_()
    model.standin_in.bias.zero_()
    if imputation is not None:  # P_image · (text @ W + offset)
        standin = p_image @ imputation.weight.T
        offset = p_image @ imputation.offset
        model.standin_in.weight[:2 * k] = torch.cat([standin, -standin])
        model.standin_in.bias[:2 * k] = torch.cat([offset, -offset])
    model.out.weight.zero_()
    eye = torch.eye(k)
    model.out.weight[:k, :k] = eye
    model.out.weight[:k, k:2 * k] = -eye
    if k < model.output_dim:  # output dims beyond k read the random hidden units
        nn.init.normal_(model.out.weight[k:, 2 * k:], std=model.hidden_dim ** -0.5)
    model.out.bias.zero_()
    return k


def _shifted_logits(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """``(similarity - 1) / tau`` in base 2 (times log2 e), self-pairs masked, in place.

    Both softmaxes of the objective are over cosines, which are at most 1, so every shifted
    logit is <= 0 and >= -2 log2(e) / tau: exp2 cannot overflow and, for tau >= _MIN_TAU, stays
    a normal float. No row-max pass is needed, and exp2 is cheaper than exp (docs/fusion.md).
    """
    similarity.sub_(1.0).mul_(_LOG2E / tau)
    return similarity.fill_diagonal_(_MASKED)


def _symmetric_softmax(logits2: torch.Tensor, m: int, preserve: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax Q of a symmetric matrix of base-2 logits, with the preservation term's
    own-group softmax Q_own (rows of the M first items over those items, the others over the
    others), returned as ``C + Cᵀ`` with ``C = Q + preserve * Q_own``.

    With E = 2^logits (symmetric) and row sums s, Q = E / s per row, so ``Q + Qᵀ`` is
    ``E * (1/s_i + 1/s_j)``: no transposed pass over the matrix. Q_own is E / s_own on the two
    diagonal blocks, so there the factor is ``a_i + a_j`` with ``a = 1/s + preserve/s_own``.

    Returns:
        (C + Cᵀ, Σ_rows ln s + preserve Σ_rows ln s_own): natural log-sum-exps.
    """
    e = torch.exp2(logits2)
    row_sum = e.sum(dim=1, keepdim=True)
    inverse = row_sum.reciprocal()
    log_sum_exp = row_sum.log_().sum()
    own = inverse.clone()
    if preserve:
        for group in group_blocks(e.shape[0], m):
            own_sum = e[group, group].sum(dim=1, keepdim=True)
            own[group] += preserve * own_sum.reciprocal()
            log_sum_exp += preserve * own_sum.log_().sum()
    groups = [g for g in (slice(0, m), slice(m, e.shape[0])) if g.stop > g.start]
    for rows in groups:
        for cols in groups:
            factor = own if rows == cols else inverse
            e[rows, cols].mul_(factor[rows] + factor[cols].T)
    return e, log_sum_exp


def _log_likelihood(target_sym: torch.Tensor, logits2: torch.Tensor,
                    log_sum_exp: torch.Tensor) -> torch.Tensor:
    """Σ_ij P_ij · ln Q_ij (+ preserve Σ P_own ln Q_own), Q the row softmax of the symmetric
    ``logits2`` (Q_own its own-group softmax; ``target_sym`` = T + Tᵀ, T = P + preserve P_own).

    ln Q_ij = logits2_ij / log2(e) - lse_i and the rows of P (of P_own) sum to 1; by symmetry of
    the logits, Σ T_ij logits_ij is half of Σ (T + Tᵀ)_ij logits_ij.
    """
    return torch.dot(target_sym.view(-1), logits2.view(-1)) * (0.5 / _LOG2E) - log_sum_exp


@torch.no_grad()
def loss_and_gradients(model: FusionMLP, batch: TrainingBatch, tau: float = TAU,
                       helper: Executor | None = None) -> dict[str, float]:
    """The training objective on one batch; sets every parameter's ``.grad`` to its gradient.

    Objective: row mean of KL(P || softmax(z·zᵀ / tau)) with each item's self excluded
    (P from :func:`.targets.training_batch`), plus ``batch.preserve`` times the row mean of the
    same KL conditioned on the anchor's own group (items with an image, or without), plus
    NORM_WEIGHT * mean((|h| - 1)²) on the code before
    normalisation. The backward pass is written out instead of left to autograd: it is short,
    and autograd's graph and intermediates cost a sizeable share of a step (docs/fusion.md).
    tests/test_fusion.py checks it against autograd on the plain formula.

    Args:
        model: The model; its parameters' ``.grad`` are replaced.
        batch: Inputs and targets (:func:`.targets.training_batch`).
        tau: Softmax temperature (as used for the targets).
        helper: An executor whose thread may compute the text block's weight-gradient
            products (:func:`_text_block_products`), the step's largest, while this thread
            does the rest of the backward pass; if the thread is still busy when the result is
            due, this thread computes them itself.

    Returns:
        ``loss``, ``sim_loss`` and ``norm_loss`` as floats.
    """
    check_tau(tau)
    text, image, target_sym, target_p_log_p, preserve = batch
    hidden = _first_layer(model, text, image).clamp_min_(0)  # ReLU, in place
    h = model.out(hidden)
    norm = torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min_(_EPS)
    z = h / norm
    b = z.shape[0]
    # (z·zᵀ - 1) / tau in base 2, straight out of the matrix product (see _shifted_logits)
    logits2 = torch.addmm(z.new_tensor(-_LOG2E / tau), z * (_LOG2E / tau), z.T)
    logits2.fill_diagonal_(_MASKED)
    q_sym, log_sum_exp = _symmetric_softmax(logits2, image.shape[0], preserve)
    sim_loss = (target_p_log_p - _log_likelihood(target_sym, logits2, log_sum_exp)) / b
    norm_loss = (norm - 1).pow(2).mean()

    # d sim / d logits = (Q - P) / b per row (zero on the diagonal, where both are 0);
    # logits = z zᵀ / tau, so d sim / d z = (D + Dᵀ) z / (b tau) with D + Dᵀ = Q + Qᵀ - P - Pᵀ.
    grad_z = torch.mm(q_sym.sub_(target_sym), z).mul_(1.0 / (b * tau))
    # z = h / |h|; the norm term adds 2 NORM_WEIGHT (|h| - 1) / b * z
    grad_h = (grad_z - z * (z * grad_z).sum(dim=1, keepdim=True)).div_(norm)
    grad_h += z * ((2.0 * NORM_WEIGHT / b) * (norm - 1))
    # ReLU's backward, the op autograd uses (a bool mask multiply is far slower: docs/fusion.md)
    grad_pre = torch.ops.aten.threshold_backward(grad_h @ model.out.weight, hidden, 0)
    text_products = _run_aside(helper, _text_block_products, grad_pre, text, image.shape[0])
    model.out.weight.grad = grad_h.T @ hidden
    model.out.bias.grad = grad_h.sum(dim=0)
    _first_layer_gradients(model, grad_pre, image, text_products)
    loss = sim_loss + NORM_WEIGHT * norm_loss
    return {"loss": loss.item(), "sim_loss": sim_loss.item(), "norm_loss": norm_loss.item()}


def _first_layer(model: FusionMLP, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """:meth:`FusionMLP.pre_activation` of a training batch, whose M items with an image are its
    first M rows: those rows add the image block, the others use the stand-in's layer."""
    m = image.shape[0]
    parts = []
    if m:
        parts.append(F.linear(text[:m], model.text_in.weight, model.text_in.bias)
                     .addmm_(image, model.image_in.weight.T).add_(model.mask_in))
    if m < text.shape[0]:
        parts.append(F.linear(text[m:], *model.standin_layer()))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _text_block_products(grad_pre: torch.Tensor, text: torch.Tensor, m: int
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The text block's weight-gradient products, ``grad_preᵀ · text``, of the rows without an
    image (the stand-in's gradient) and of the M rows with one; None for an empty part."""
    return (grad_pre[m:].T @ text[m:] if m < len(text) else None,
            grad_pre[:m].T @ text[:m] if m else None)


def _first_layer_gradients(model: FusionMLP, grad_pre: torch.Tensor, image: torch.Tensor,
                           text_products: Callable[[], tuple[torch.Tensor | None,
                                                             torch.Tensor | None]]) -> None:
    """Set the first layer's gradients from ``grad_pre`` (the loss's gradient with respect to
    the pre-activations, image rows first). ``text_products()`` gives
    :func:`_text_block_products` (the largest products of the backward pass, maybe computed on
    another thread): the rows without an image give the stand-in's weight gradient, and the
    text block's is the sum of both."""
    m = image.shape[0]
    model.text_in.bias.grad = grad_pre.sum(dim=0)
    if m:
        grad_image = grad_pre[:m]
        model.image_in.weight.grad = grad_image.T @ image
        model.mask_in.grad = grad_image.sum(dim=0)
    else:  # as autograd would: unused parameters get no gradient and Adam leaves them alone
        model.image_in.weight.grad = model.mask_in.grad = None
    standin, image_rows = text_products()
    if standin is not None:
        model.standin_in.weight.grad = standin
        model.standin_in.bias.grad = grad_pre[m:].sum(dim=0)
        model.text_in.weight.grad = standin + image_rows if m else standin.clone()
    else:
        model.standin_in.weight.grad = model.standin_in.bias.grad = None
        model.text_in.weight.grad = image_rows


def _run_aside(executor: Executor | None, fn: Callable[..., _T], *args: Any
               ) -> Callable[[], _T]:
    """Start ``fn(*args)`` on the executor's thread; the returned call gives its result.

    If the thread has not taken the task by then (it is still building a batch), the task is
    withdrawn and run by the caller: the caller never waits for a batch to be built.
    """
    if executor is None:
        result = fn(*args)
        return lambda: result
    future = executor.submit(fn, *args)
    return lambda: fn(*args) if future.cancel() else future.result()


def save_fusion_model(model: FusionMLP, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write the weights and the architecture (safetensors metadata) atomically."""
    from safetensors.torch import save_file

    meta = {"text_dim": model.text_dim, "img_dim": model.img_dim, "hidden_dim": model.hidden_dim,
            "output_dim": model.output_dim, "activation": "relu", "objective": OBJECTIVE,
            "input": "concat(l2norm(text), l2norm(image) or stand-in(text), has_image)"}
    meta.update(extra or {})
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # One metadata entry: safetensors writes a map's entries in an unspecified order, and the
    # file must be byte-identical for the same training run.
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def load_fusion_model(path: str | os.PathLike) -> FusionMLP:
    """Load a trained fusion model from the step's output directory or its ``.safetensors`` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / FUSION_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no fusion weights at {path}")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get(_META_KEY, "{}"))
    missing = [k for k in ("text_dim", "img_dim", "hidden_dim", "output_dim") if k not in meta]
    if missing:
        raise ValueError(f"{path} is not a fusion model: metadata lacks {missing}")
    model = FusionMLP(meta["text_dim"], meta["img_dim"], meta["hidden_dim"], meta["output_dim"])
    state = load_file(str(path))
    for name, tensor in model.state_dict().items():
        if name.startswith("standin_in.") and name not in state:
            # a model from before the stand-in: its missing image half was zero, as is this
            state[name] = torch.zeros_like(tensor)
    model.load_state_dict(state)
    model.metadata = meta  # what it was trained on (encoders' fingerprints, run id, seed)
    model.eval()
    return model
