"""The QA report component: one self-contained HTML page of the run, shown in the Vertex UI."""

from kfp.dsl import HTML, Dataset, Input, Output

from item_embeddings.components.shared import as_component, pipeline_inputs


@pipeline_inputs
def qa_report(
    items: Input[Dataset],
    text_embeddings: Input[Dataset],
    image_embeddings: Input[Dataset],
    fused_embeddings: Input[Dataset],
    knn_graphs: Input[Dataset],
    report: Output[Dataset],
    html: Output[HTML],
    id_column: str,
    title_column: str,
    category_column: str,
    seed: int,
    publish_uri: str,
    run_id: str,
) -> str:
    """Renders the QA report: counts and coverage per step, image failures by reason, norm and
    similarity distributions, 2-D maps coloured by `category_column`, sample items with their
    nearest neighbours in the text and fused spaces, the fusion training curve, kNN recall (and,
    with a previous set, the night-over-night drift of the neighbours), the run's parameters
    and versions. Plots are inlined, so the page shows on the run page
    ("View HTML") and opens offline.

    Then, when `publish_uri` is set, publishes the text, image, fused and kNN outputs and the
    report to that prefix for the next stage (here, not in a task of its own: no machine starts
    just to copy files). The files are uploaded into a new, immutable set folder
    `sets/<time>-<run id>-<random>/` under the prefix (with its manifest: files, sizes, sha256,
    run id, counts), then the prefix's `manifest.json` is swapped to name it, in one request
    that fails if another run published meanwhile (this task then fails and removes its set;
    the other set stays current). Readers read `manifest.json` once and the set it names
    (docs/operations.md). This task is never served from the cache: a publish is not a result
    to reuse.

    Args:
        items: The items table (titles and categories of the sample items).
        text_embeddings: Text step output.
        image_embeddings: Image step output.
        fused_embeddings: Fusion step output.
        knn_graphs: kNN step output.
        report: Output directory with qa_report.html (published with the other files).
        html: The same page as an HTML artifact (the Vertex AI UI shows it).

    Returns:
        The URI of the publish prefix's pointer, manifest.json ("" when nothing was published).
    """
    import shutil

    from item_embeddings.components.shared import component_step
    from item_embeddings.outputs import QA_REPORT
    from item_embeddings.publish import manifest_uri, publish_outputs
    from item_embeddings.report import write_qa_report

    with component_step(locals(), report) as step:
        summary = write_qa_report(items.uri, text_embeddings.path, image_embeddings.path,
                                  fused_embeddings.path, knn_graphs.path,
                                  step.out_dir / QA_REPORT, step.params, run_id=run_id)
        shutil.copyfile(step.out_dir / QA_REPORT, html.path)
        for space, drift in summary["drift"].items():  # night-over-night, with previous_uri
            if drift.get("mean_overlap") is not None:
                report.metadata[f"{space}_drift_top{drift['top']}_overlap"] = \
                    drift["mean_overlap"]
    if not publish_uri:
        return ""
    sources = {"text": text_embeddings, "image": image_embeddings, "fused": fused_embeddings,
               "knn": knn_graphs, "report": report}
    publish_outputs([a.path for a in sources.values()], publish_uri, run_id=run_id,
                    extra_meta={"sources": {name: a.uri for name, a in sources.items()}})
    return manifest_uri(publish_uri)


def make_component(base_image: str):
    """The component, to run in ``base_image``."""
    return as_component(qa_report, base_image)
