"""Item-to-item kNN graphs of the text and fused vectors (docs/knn.md).

=================  =====================================================================
:mod:`.vectors`    the input vectors checked (named bad rows) and L2-normalised in one pass
:mod:`.graph`      exact blocked top-k (torch, GPU when present), the faiss IVF path,
                   recall@k against exact search, :func:`build_knn_graph`
:mod:`.step`       the step: both spaces of a run, five files, an experiment run
:mod:`.synthetic`  clustered unit vectors with a low local dimension (tests, benchmark)
=================  =====================================================================

Example::

    from item_embeddings.knn import build_knn_graphs
    meta = build_knn_graphs("out/text", "out/fused", "out/knn")
    print(meta["spaces"]["text"]["recall_at_k"])
"""

from .graph import KnnGraph, build_knn_graph, exact_knn, recall_at_k
from .step import build_knn_graphs
from .vectors import KnnInputError, check_vectors, unit_rows

__all__ = ["KnnGraph", "KnnInputError", "build_knn_graph", "build_knn_graphs", "check_vectors",
           "exact_knn", "recall_at_k", "unit_rows"]
