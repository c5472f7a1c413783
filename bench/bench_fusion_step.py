"""CPU time of one fusion training step on one thread: the target build (the target thread's
work) and the trainer's loss and gradients, batch 512 with 154 items with an image.

Run it in this tree and, for another revision, with that revision's ``src/`` first on the path;
alternate the two so both see the same load::

    git archive f52d438 src | tar -x -C /tmp/f52d438
    python bench/bench_fusion_step.py now
    PYTHONPATH=/tmp/f52d438/src python bench/bench_fusion_step.py f52d438
"""

from __future__ import annotations

import sys
import time

import torch

from item_embeddings.fusion import model as fusion_model


def _per_call_ms(fn, calls: int = 150) -> float:
    fn()
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls * 1e3


def main(label: str) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(512, 384, generator=gen), dim=1)
    image = torch.nn.functional.normalize(torch.randn(154, 512, generator=gen), dim=1)
    try:
        from item_embeddings.fusion import targets
    except ImportError:  # before issue 20 the targets lived in model.py
        def build():
            return fusion_model.training_batch(text, image)
    else:
        imputation = targets.Imputation.from_weight(0.05 * torch.randn(384, 512, generator=gen),
                                                    0.01 * torch.randn(512, generator=gen))

        def build():
            return targets.training_batch(text, image, imputation)
    model = fusion_model.FusionMLP(384, 512)
    batch = build()
    runs = [(_per_call_ms(build), _per_call_ms(lambda: fusion_model.loss_and_gradients(model,
                                                                                         batch)))
            for _ in range(3)]
    built, trained = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"{label}: targets {built:.2f} ms, trainer {trained:.2f} ms, "
          f"sum {built + trained:.2f} ms (CPU time, min of 3 x 150)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this tree")
