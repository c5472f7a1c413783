"""Multimodal item embeddings for recommender systems, as a Kubeflow / Vertex AI pipeline.

The plain-Python core lives in this package (``items``, ``text``, ``tracking``, ...); the KFP
components (``item_embeddings.components``) and the pipeline (``item_embeddings.pipeline``) are
thin layers over it, so the same functions run under ``kfp.local``, in tests and on Vertex AI.
"""

__version__ = "0.1.0"
