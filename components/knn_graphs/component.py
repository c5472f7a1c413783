"""The kNN-graph component: item-to-item neighbours in the text and fused spaces."""

from kfp.dsl import Dataset, Input, Metrics, Output

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def knn_graphs(
    text_embeddings: Input[Dataset],
    fused_embeddings: Input[Dataset],
    graphs: Output[Dataset],
    metrics: Output[Metrics],
    knn_k: int,
    knn_exact_max_items: int,
    knn_recall_queries: int,
    seed: int,
    previous_uri: str,
    inputs_fingerprint: str,
    experiment: str,
    tracking_backend: str,
    tracking_dir: str,
    project: str,
    location: str,
):
    """Finds the `knn_k` nearest other items of every item by cosine, in the text space and in
    the fused space: exact search up to `knn_exact_max_items` items, a faiss IVF index above,
    with its recall@k against exact search measured on a sample on every run.

    Writes `knn_text.npy` / `knn_fused.npy` (int32 [N, k] row indices in `txt_items.parquet`
    order, most similar first, self excluded), `knn_text_scores.npy` / `knn_fused_scores.npy`
    (float32 [N, k]), the state a later incremental run starts from (`knn_items.parquet`,
    `knn_*_state.npz`) and `knn_meta.json` (method, index parameters, times, recall, rows
    recomputed and reused, drift). With `previous_uri`, updates the previous set's graphs
    instead of searching every item again where that is cheaper (docs/knn.md).

    Args:
        text_embeddings: Text step output (txt.npy, txt_items.parquet).
        fused_embeddings: Fusion step output (fused.npy, fused_items.parquet).
        graphs: Output directory with the graphs and knn_meta.json.
        metrics: Recall@k and search times per space, and the modality mix (photo share
            of each space's neighbours by group).
    """
    from item_embeddings.components.shared import component_step
    from item_embeddings.knn import build_knn_graphs
    from item_embeddings.knn.step import KNN_STEP
    from item_embeddings.storage import local_input_dir

    # Exact search reads rows in blocks: on Vertex the inputs are copied off gcsfuse first.
    with component_step(locals(), graphs, metrics, "knn") as step, \
            local_input_dir(text_embeddings.path) as text_dir, \
            local_input_dir(fused_embeddings.path) as fused_dir:
        meta = build_knn_graphs(text_dir, fused_dir, step.out_dir, step.params,
                                run_id=step.run_id, tracker=step.tracker,
                                artifact_uri=step.artifact_uri)
        step.report(meta, KNN_STEP, metadata=("count", "k"))


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(knn_graphs, base_image)
