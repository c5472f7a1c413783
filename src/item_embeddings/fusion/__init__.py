"""The fusion step and its model.

=================  =====================================================================
:mod:`.inputs`     both steps' outputs, memory-mapped, checked and joined by id
:mod:`.targets`    the photo a text predicts (imputation) and the training targets
:mod:`.model`      the fusion MLP with its stand-in, the loss and its hand-written gradient
:mod:`.training`   imputation fit, PCA start, batches with targets built ahead, fused Adam
:mod:`.step`       the step: train, write ``fused.npy`` and its companions
:mod:`.synthetic`  a generated catalogue with known clusters (tests and benchmarks)
=================  =====================================================================

Example::

    from item_embeddings.fusion import fuse_item_embeddings, load_fusion_model
    meta = fuse_item_embeddings("out/text", "out/images", "out/fused")
    model = load_fusion_model("out/fused")
    codes = model.fuse(new_text_vectors, new_image_vectors, has_image)
"""

from .inputs import FusionInputError, FusionInputs, load_fusion_inputs
from .model import FusionMLP, load_fusion_model
from .step import fuse_item_embeddings
from .training import FusedAdam, lr_at, train_fusion_model

__all__ = ["FusedAdam", "FusionInputError", "FusionInputs", "FusionMLP", "fuse_item_embeddings",
           "load_fusion_inputs", "load_fusion_model", "lr_at", "train_fusion_model"]
