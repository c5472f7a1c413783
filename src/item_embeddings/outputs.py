"""The names of every file the pipeline produces, in one place (see docs/outputs.md).

Each step writes one group: an array, an id file aligned with it, a meta file written last (its
presence means the group is complete) and some extra files.
"""

from __future__ import annotations

TXT_ARRAY = "txt.npy"
TXT_ITEMS = "txt_items.parquet"
TXT_META = "txt_meta.json"

IMG_ARRAY = "img.npy"
IMG_ITEMS = "img_items.parquet"
IMG_FAILURES = "img_failures.parquet"
IMG_META = "img_meta.json"

FUSED_ARRAY = "fused.npy"
FUSED_ITEMS = "fused_items.parquet"
FUSION_CONFIG = "fusion_config.json"
FUSION_EXCLUSIONS = "fusion_exclusions.parquet"
FUSION_WEIGHTS = "fusion_model.safetensors"

# kNN graphs (rows and neighbour indices follow txt_items.parquet; no id file of their own)
KNN_TEXT = "knn_text.npy"
KNN_TEXT_SCORES = "knn_text_scores.npy"
KNN_FUSED = "knn_fused.npy"
KNN_FUSED_SCORES = "knn_fused_scores.npy"
KNN_META = "knn_meta.json"
# what the next run's incremental update starts from: the ids the rows were made for, and per
# space the row digests, the reserve neighbours and the IVF lists (knn/state.py)
KNN_ITEMS = "knn_items.parquet"
KNN_TEXT_STATE = "knn_text_state.npz"
KNN_FUSED_STATE = "knn_fused_state.npz"
KNN_GROUP = (KNN_TEXT, KNN_TEXT_SCORES, KNN_FUSED, KNN_FUSED_SCORES, KNN_ITEMS, KNN_TEXT_STATE,
             KNN_FUSED_STATE)

QA_REPORT = "qa_report.html"
# The report's record: its size and sha256 and the run ids of the groups it was made from
REPORT_META = "report_meta.json"

# A published set's list of its files with their size and sha256, written last (publish.py)
MANIFEST = "manifest.json"

# group -> (array, id file, meta file, other files)
GROUPS = {
    "text": (TXT_ARRAY, TXT_ITEMS, TXT_META, ()),
    "image": (IMG_ARRAY, IMG_ITEMS, IMG_META, (IMG_FAILURES,)),
    "fusion": (FUSED_ARRAY, FUSED_ITEMS, FUSION_CONFIG, (FUSION_WEIGHTS, FUSION_EXCLUSIONS)),
}
# every meta file, placed last when a group is copied (its presence = the group is complete)
META_FILES = frozenset([*(meta for _, _, meta, _ in GROUPS.values()), KNN_META, REPORT_META])
