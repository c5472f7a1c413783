"""Training the fusion MLP: the imputation of missing photos, the PCA start, shuffled batches with
targets built ahead on a second thread, a direct fused Adam and a warm-up + cosine learning-rate
schedule."""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..config import PipelineParams
from ..progress import Progress
from .inputs import FusionInputs, gather
from .model import FusionMLP, init_from_pca, loss_and_gradients
from .targets import Imputation, TrainingBatch, fit_imputation, training_batch

logger = logging.getLogger(__name__)

PCA_SAMPLE = 16384      # rows sampled for the principal directions of the initialisation
IMPUTATION_SAMPLE = 4096  # items with a photo sampled to fit the imputation
WARMUP_SHARE = 0.1      # share of all training steps with a linearly rising learning rate
PREFETCH_BATCHES = 2    # batches prepared ahead of the trainer (bounds the memory they hold)
# Below this many items one thread is used by default: on such small matrices thread hand-offs
# cost more than they save, and a busy second core makes OpenMP's spinning threads very slow
# (measured in docs/fusion.md).
SINGLE_THREAD_BELOW_ITEMS = 20_000
INITS = ("pca", "random")
EVAL_ITEMS = 8192       # the fixed sample the objective is measured on after each epoch
LOGGED_EPOCHS = 20      # at most about this many per-epoch log lines (a small catalogue runs many)


def _fit_imputation(inputs: FusionInputs, rng: np.random.Generator) -> Imputation:
    """The photo each text predicts, fitted on a sample of the items that have one."""
    with_image = np.flatnonzero(inputs.image_row >= 0)
    sample = np.sort(rng.choice(with_image, size=min(IMPUTATION_SAMPLE, len(with_image)),
                                replace=False))
    text, image, _ = gather(inputs, sample)
    return fit_imputation(text, image)


def _second_moment(inputs: FusionInputs, rng: np.random.Generator,
                   imputation: Imputation | None = None) -> np.ndarray:
    """E[x xᵀ] of the unit-row input x = [text, image] on a sample of rows; an item without an
    image has its imputed photo (or zero without ``imputation``)."""
    sample = np.sort(rng.choice(inputs.count, size=min(PCA_SAMPLE, inputs.count), replace=False))
    text, image, pos = gather(inputs, sample)
    td, idim = inputs.text.shape[1], inputs.image.shape[1]
    x = torch.zeros(len(sample), td + idim)
    x[:, :td] = text
    if imputation is not None:
        x[:, td:] = imputation.predict(text)
    x[pos, td:] = image
    return (x.T @ x / len(sample)).numpy()


def _batch_bounds(n: int, batch_size: int) -> list[int]:
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:  # a last batch of one item has no pair
        del bounds[-2]
    return bounds


def lr_at(step: int, total_steps: int, lr: float) -> float:
    """Learning rate of ``step``: linear warm-up over the first WARMUP_SHARE, then cosine to 0.

    Adam's first updates move every weight by about ``lr`` whatever its gradient; warming up
    keeps them from scrambling the PCA start, and the decay lets the last epoch settle.
    """
    warmup = max(1, round(WARMUP_SHARE * total_steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One epoch's shuffled batches; a last batch of one item joins the previous one."""
    perm = rng.permutation(n)
    bounds = _batch_bounds(n, batch_size)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        yield perm[start:stop]




@contextlib.contextmanager
def torch_threads(num_threads: int | None, count: int) -> Iterator[int]:
    """A fixed torch thread count for the step (results depend on it), restored afterwards.

    Every op used is deterministic on CPU for a fixed thread count (no atomics, no scatter
    races), so ``torch.use_deterministic_algorithms`` (and its slow import) is not needed.
    """
    old_threads = torch.get_num_threads()
    if num_threads is None and count < SINGLE_THREAD_BELOW_ITEMS:
        num_threads = 1
    torch.set_num_threads(num_threads or old_threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)


@contextlib.contextmanager
def _target_thread(threads: int) -> Iterator[ThreadPoolExecutor | None]:
    """A second thread (one torch thread) for work off the trainer; None with one thread.

    The trainer keeps the other ``threads - 1`` torch threads meanwhile. On two cores this is
    faster than splitting every op over both threads: most ops here are too small to share well.
    """
    if threads < 2:
        yield None
        return
    trainer_threads = torch.get_num_threads()
    torch.set_num_threads(threads - 1)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="fusion-targets",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(trainer_threads)


def _training_batches(inputs: FusionInputs, imputation: Imputation,
                      batches: Iterator[np.ndarray], pool: ThreadPoolExecutor | None
                      ) -> Iterator[TrainingBatch]:
    """Gathered batches with their targets; with a pool, built ahead on its thread.

    The targets do not depend on the model, so the pool's thread gathers rows and computes them
    for the next batches while the trainer runs the current one.
    """
    def prepare(idx: np.ndarray) -> TrainingBatch:
        # The loss ignores the order of a batch: items with an image go first (training_batch's
        # layout), each part in row order so that the memmaps are read front to back.
        idx = np.sort(idx)
        has_image = inputs.image_row[idx] >= 0
        text, image, _ = gather(inputs, np.concatenate([idx[has_image], idx[~has_image]]))
        return training_batch(text, image, imputation)

    if pool is None:
        yield from map(prepare, batches)
        return
    pending: collections.deque = collections.deque()
    for idx in batches:
        pending.append(pool.submit(prepare, idx))
        if len(pending) > PREFETCH_BATCHES:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class FusedAdam:
    """Adam, as ``torch.optim.Adam(params, fused=True)`` with default betas and eps.

    The same per-parameter state and the same fused kernel, called directly: constructing
    ``torch.optim.Adam`` imports ``torch._dynamo`` and its ``step`` adds Python overhead per
    call, both measurable at this model's size (docs/fusion.md). tests/test_fusion.py checks
    that both give byte-identical weights. As there, a parameter whose ``.grad`` is None is left
    alone and its step count does not advance.
    """

    def __init__(self, params: Iterator[torch.nn.Parameter],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.betas, self.eps = betas, eps
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def step(self, lr: float) -> None:
        """One update of every parameter that has a gradient, with learning rate ``lr``."""
        params, grads, avgs, avg_squares, steps = [], [], [], [], []
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            if i not in self.state:  # float32 step count, as torch's fused Adam keeps it
                self.state[i] = (torch.zeros_like(param), torch.zeros_like(param),
                                 torch.zeros((), dtype=torch.float32))
            avg, avg_sq, count = self.state[i]
            params.append(param)
            grads.append(param.grad)
            avgs.append(avg)
            avg_squares.append(avg_sq)
            steps.append(count)
        if not params:
            return
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, avgs, avg_squares, [], steps, lr=lr,
                           beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0,
                           eps=self.eps, amsgrad=False, maximize=False)


def check_init(init: str) -> None:
    """The training parameters are checked with the others (PipelineParams); this is the one
    setting that is not a pipeline parameter."""
    if init not in INITS:
        raise ValueError(f"init must be 'pca' or 'random', got {init!r}")


@dataclass
class TrainedModel:
    """A trained fusion model and how it got there."""

    model: FusionMLP
    history: list[dict[str, float]]   # per epoch: mean training losses and ``eval_loss``
    initial_eval_loss: float          # the objective of the start (PCA or random), same sample
    best_epoch: int                   # the epoch whose weights were kept; 0 = the start
    imputation: Imputation            # the photo each text predicts (targets and stand-in start)

    @property
    def eval_loss(self) -> float:
        """The objective of the kept model on the evaluation sample."""
        return (self.initial_eval_loss if self.best_epoch == 0
                else self.history[self.best_epoch - 1]["eval_loss"])


def evaluation_sample(count: int, seed: int) -> np.ndarray:
    """The fixed sample of at most EVAL_ITEMS items the objective (and, after training, the
    modality mix) is measured on, in random order; its own random stream, so training's is
    left untouched."""
    return np.random.default_rng([seed, 1]).permutation(count)[:EVAL_ITEMS]


def _evaluation_batches(inputs: FusionInputs, imputation: Imputation, batch_size: int,
                        seed: int) -> list[TrainingBatch]:
    """A fixed sample of at most EVAL_ITEMS items in batches, with their targets."""
    idx = evaluation_sample(inputs.count, seed)
    bounds = _batch_bounds(len(idx), batch_size)
    return list(_training_batches(inputs, imputation,
                                  (idx[a:b] for a, b in zip(bounds[:-1], bounds[1:])), None))


def _evaluate(model: FusionMLP, batches: list[TrainingBatch]) -> float:
    """Mean objective over the evaluation batches (the gradients it computes are discarded:
    the next training step replaces every parameter's gradient)."""
    total = sum(loss_and_gradients(model, b)["loss"] * b.text.shape[0] for b in batches)
    return total / sum(b.text.shape[0] for b in batches)


def train_fusion_model(inputs: FusionInputs, params: PipelineParams = PipelineParams(),
                       init: str = "pca") -> TrainedModel:
    """Train the MLP on every item for ``fusion_epochs`` full passes (more on a catalogue too
    small for ``fusion_min_steps`` steps in those) and keep the best weights.

    Each batch is a random set of items, gathered from the memmaps in row order. ``params``
    gives the ``fusion_*`` settings and the ``seed``; ``init`` is 'pca' (start from the linear
    PCA projection) or 'random'. After each epoch the objective is measured on a fixed sample;
    the weights with the lowest value are kept, the start's included, so the step never ends
    worse than it started (docs/fusion.md).
    """
    check_init(init)
    lr, batch_size = params.fusion_lr, params.fusion_batch_size
    per_epoch = params.fusion_batches_per_epoch(inputs.count)
    epochs = params.fusion_epochs_for(inputs.count)
    total_steps = epochs * per_epoch
    if epochs > params.fusion_epochs:
        logger.info("fusion: %d items make %d step%s an epoch; training %d epochs instead of %d "
                    "for fusion_min_steps=%d", inputs.count, per_epoch, "s"[:per_epoch != 1],
                    epochs, params.fusion_epochs, params.fusion_min_steps)
    rng = np.random.default_rng(params.seed)
    torch.manual_seed(params.seed)
    model = FusionMLP(inputs.text.shape[1], inputs.image.shape[1], params.fusion_hidden_dim,
                      params.fusion_output_dim)
    imputation = _fit_imputation(inputs, np.random.default_rng([params.seed, 2]))
    if init == "pca":
        init_from_pca(model, _second_moment(inputs, rng, imputation), imputation)
    optimizer = FusedAdam(model.parameters())
    step = 0
    history: list[dict[str, float]] = []
    evaluation = _evaluation_batches(inputs, imputation, batch_size, params.seed)
    initial = best = _evaluate(model, evaluation)
    best_state, best_epoch = copy.deepcopy(model.state_dict()), 0
    model.train()
    threads = torch.get_num_threads()
    with _target_thread(threads) as pool, Progress(epochs * inputs.count, "fuse-train") as progress:
        # The trainer hands a product to the pool's thread only when both run one torch thread:
        # the result must not depend on which thread computed it (determinism).
        helper = pool if threads == 2 else None
        for epoch in range(1, epochs + 1):
            sums = {"loss": 0.0, "sim_loss": 0.0, "norm_loss": 0.0}
            batches = _batches(inputs.count, batch_size, rng)
            for batch in _training_batches(inputs, imputation, batches, pool):
                parts = loss_and_gradients(model, batch, helper=helper)
                optimizer.step(lr_at(step, total_steps, lr))
                step += 1
                size = batch.text.shape[0]
                for key in sums:
                    sums[key] += parts[key] * size
                progress.update(size)
            history.append({k: v / inputs.count for k, v in sums.items()})
            history[-1]["eval_loss"] = current = _evaluate(model, evaluation)
            if current < best:
                best, best_epoch = current, epoch
                best_state = copy.deepcopy(model.state_dict())
            if epoch % -(-epochs // LOGGED_EPOCHS) == 0 or epoch == epochs:
                logger.info("fusion epoch %d/%d: loss %.5f, objective on the evaluation sample "
                            "%.5f", epoch, epochs, history[-1]["loss"], current)
    if best_epoch != epochs:
        logger.warning("fusion: epoch %d had the lowest objective (%.5f, start %.5f, last "
                       "%.5f); keeping its weights", best_epoch, best, initial,
                       history[-1]["eval_loss"])
    model.load_state_dict(best_state)
    model.eval()
    return TrainedModel(model, history, initial, best_epoch, imputation)
