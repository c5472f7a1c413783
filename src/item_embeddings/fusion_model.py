"""The fusion MLP, its training objective, and its weights on disk.

Model: ``concat(text, image, has_image) -> Linear -> ReLU -> Linear -> L2-normalise``. The first
Linear is stored as three blocks (text columns + bias, image columns, the has-image column) so a
batch only multiplies the image block for the rows that have an image; the result is the same as
one Linear over the zero-padded concatenation, at a fraction of the cost when most items have no
image. Input rows are L2-normalised on the way in (:func:`unit_rows`, used by the step and by
:meth:`FusionMLP.fuse`), so new items are treated exactly like the training items.

Example::

    model = load_fusion_model("out/fused")          # the step's output dir (or the .safetensors)
    codes = model.fuse(text_vectors, image_vectors, has_image)   # [n, 128] float32, unit rows
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .outputs import FUSION_WEIGHTS
from .storage import atomic_path

WEIGHTS_FILE = FUSION_WEIGHTS
_META_KEY = "fusion_model"  # safetensors metadata entry holding the architecture (JSON)
OBJECTIVE = "neighbourhood-kl+norm"
TAU = 0.05              # softmax temperature of target and fused similarities
NORM_WEIGHT = 0.01      # weight of the pre-normalisation norm regulariser
_EPS = 1e-12
_HALF_SQRT2 = 0.5 ** 0.5  # 1 / |[text, image]| for unit text and image
_MASKED = -1e9          # logit of an item paired with itself


class FusionMLP(nn.Module):
    """``concat(text, image, has_image)`` -> hidden (ReLU) -> ``output_dim``, unit-length output."""

    def __init__(self, text_dim: int, img_dim: int, hidden_dim: int = 256, output_dim: int = 128):
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
        hidden = self.text_in(text)
        if image.shape[0]:
            image_part = F.linear(image, self.image_in.weight) + self.mask_in
            hidden = hidden.index_add(0, image_pos, image_part)
        h = self.out(F.relu(hidden))
        return F.normalize(h, dim=1, eps=_EPS), h

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
def init_from_pca(model: FusionMLP, second_moment: np.ndarray) -> int:
    """Start the MLP as the projection on the top principal directions of its input.

    ``second_moment`` is E[x xᵀ] of the (uncentred, unit-row) input ``x = [text, image]``.
    With k = min(output_dim, hidden_dim // 2) directions P, the hidden layer holds ReLU(Px) and
    ReLU(-Px) and the output layer subtracts them, so the initial code is exactly Px: training
    starts from the linear baseline (PCA) instead of a random projection and refines it. The
    other hidden units keep their random weights with zero outgoing weights.

    Returns:
        k, the number of principal directions used.
    """
    dim = model.text_dim + model.img_dim
    if second_moment.shape != (dim, dim):
        raise ValueError(f"second moment must be [{dim}, {dim}], got {list(second_moment.shape)}")
    k = min(model.output_dim, model.hidden_dim // 2, dim)
    if k == 0:
        return 0
    # torch's LAPACK honours torch's thread count; numpy's may spin on every core.
    eigvals, eigvecs = torch.linalg.eigh(torch.from_numpy(second_moment).double())
    top = eigvecs[:, torch.argsort(eigvals, descending=True, stable=True)[:k]].T  # [k, dim]
    signs = torch.sign(top[torch.arange(k), top.abs().argmax(dim=1)])  # a fixed sign per vector
    p = (top * signs.unsqueeze(1)).float()
    model.text_in.weight[:2 * k] = torch.cat([p[:, :model.text_dim], -p[:, :model.text_dim]])
    model.image_in.weight[:2 * k] = torch.cat([p[:, model.text_dim:], -p[:, model.text_dim:]])
    model.text_in.bias[:2 * k] = 0
    model.mask_in.zero_()
    model.out.weight.zero_()
    eye = torch.eye(k)
    model.out.weight[:k, :k] = eye
    model.out.weight[:k, k:2 * k] = -eye
    if k < model.output_dim:  # output dims beyond k read the random hidden units
        nn.init.normal_(model.out.weight[k:, 2 * k:], std=model.hidden_dim ** -0.5)
    model.out.bias.zero_()
    return k


def target_similarity(text: torch.Tensor, image: torch.Tensor, image_pos: torch.Tensor
                      ) -> torch.Tensor:
    """Cosine between the batch's items in the masked concatenated space, [B, B].

    The concatenation ``[text, image or 0]`` of unit vectors has norm sqrt(2) with an image and
    1 without, so the cosine is (text·text' + image·image') / 2 when both items have an image,
    text·text' when neither has, and text·text' / sqrt(2) for a mixed pair. Inputs are unit rows.
    """
    sim = text @ text.T
    if image.shape[0]:
        scale = torch.ones(text.shape[0])
        scale[image_pos] = _HALF_SQRT2  # 1 / |concat| per row
        sim *= scale.unsqueeze(1) * scale.unsqueeze(0)
        both = image @ image.T / 2
        sim[image_pos.unsqueeze(1), image_pos.unsqueeze(0)] += both
    return sim


def neighbourhood_kl(z: torch.Tensor, target: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Row mean of KL(softmax(target/tau) || softmax(z·zᵀ/tau)), each item's self excluded."""
    diag = torch.arange(z.shape[0])
    # A finite "minus infinity" keeps the 0 * log(0) terms at 0 instead of NaN.
    masked = torch.tensor(_MASKED)
    target_logp = F.log_softmax((target / tau).index_put((diag, diag), masked), dim=1)
    logq = F.log_softmax((z @ z.T / tau).index_put((diag, diag), masked), dim=1)
    return (target_logp.exp() * (target_logp - logq)).sum(dim=1).mean()


def fusion_loss(model: FusionMLP, text: torch.Tensor, image: torch.Tensor,
                image_pos: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective: neighbourhood KL + NORM_WEIGHT * mean((|h| - 1)²)."""
    z, h = model(text, image, image_pos)
    with torch.no_grad():
        target = target_similarity(text, image, image_pos)
    sim = neighbourhood_kl(z, target)
    norm = (h.norm(dim=1) - 1).pow(2).mean()
    loss = sim + NORM_WEIGHT * norm
    return loss, {"loss": loss.item(), "sim_loss": sim.item(), "norm_loss": norm.item()}


def save_fusion_model(model: FusionMLP, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write the weights and the architecture (safetensors metadata) atomically."""
    from safetensors.torch import save_file

    meta = {"text_dim": model.text_dim, "img_dim": model.img_dim, "hidden_dim": model.hidden_dim,
            "output_dim": model.output_dim, "activation": "relu", "objective": OBJECTIVE,
            "input": "concat(l2norm(text), l2norm(image) or 0, has_image)"}
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
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no fusion weights at {path}")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get(_META_KEY, "{}"))
    missing = [k for k in ("text_dim", "img_dim", "hidden_dim", "output_dim") if k not in meta]
    if missing:
        raise ValueError(f"{path} is not a fusion model: metadata lacks {missing}")
    model = FusionMLP(meta["text_dim"], meta["img_dim"], meta["hidden_dim"], meta["output_dim"])
    model.load_state_dict(load_file(str(path)))
    model.eval()
    return model
