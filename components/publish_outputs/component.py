"""The publish component: copy the final outputs to a stable prefix with a manifest."""

from kfp.dsl import Dataset, Input

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def publish_outputs(
    text_embeddings: Input[Dataset],
    image_embeddings: Input[Dataset],
    fused_embeddings: Input[Dataset],
    knn_graphs: Input[Dataset],
    report: Input[Dataset],
    publish_uri: str,
    run_id: str,
) -> str:
    """Publishes the text, image, fused and kNN outputs and the QA report to a stable prefix
    for the next stage.

    The files are uploaded into a new, immutable set folder `sets/<time>-<run id>-<random>/`
    under the prefix (with its manifest: files, sizes, sha256, run id, counts), then the
    prefix's `manifest.json` is swapped to name it, in one request that fails if another run
    published meanwhile (this task then fails and removes its set; the other set stays current).
    Readers read `manifest.json` once and the set it names (docs/operations.md). An empty
    `publish_uri` publishes nothing. Returns the URI of the pointer, manifest.json ("" when
    nothing was published).

    Args:
        text_embeddings: Directory with txt.npy, txt_items.parquet and txt_meta.json.
        image_embeddings: Directory with img.npy, img_items.parquet, img_failures.parquet and
            img_meta.json.
        fused_embeddings: Directory with fused.npy, fused_items.parquet, fusion_config.json and
            fusion_model.safetensors.
        knn_graphs: Directory with the kNN graph files and knn_meta.json.
        report: Directory with qa_report.html.
    """
    from item_embeddings.progress import setup_logging
    from item_embeddings.publish import manifest_uri
    from item_embeddings.publish import publish_outputs as publish

    setup_logging()
    if not publish_uri:
        return ""
    sources = {"text": text_embeddings, "image": image_embeddings, "fused": fused_embeddings,
               "knn": knn_graphs, "report": report}
    publish([a.path for a in sources.values()], publish_uri, run_id=run_id,
            extra_meta={"sources": {name: a.uri for name, a in sources.items()}})
    return manifest_uri(publish_uri)


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(publish_outputs, base_image)
