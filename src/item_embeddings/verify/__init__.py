"""Check a finished (local or published) output set: completeness, alignment, shapes, norms, hashes.

``item-embeddings verify DIR_OR_URI`` prints what the set holds and every violated invariant;
the exit status is non-zero when there is one. The files and the rules are described in
docs/outputs.md ("What `verify` guarantees" lists the damage it refuses); a ``gs://`` prefix is
copied to a temporary directory first (only the files of the manifest when there is one).

Alignment is proven, not assumed: every meta file lists the size and sha256 of each file its step
wrote (``step.StepRun.finish``), so a moved array row or id is a hash mismatch; the fusion meta
names the text and image runs it was made from; kNN scores must be the cosine of the rows they
link. Damaged files of any kind (wrong dtypes, truncated, not JSON) are reported, never raised.

* :mod:`.checks`: the pass over a set (groups, meta files, records, ids, counts);
* :mod:`.graphs`: the kNN graph files;
* :mod:`.report`: the report, and readers that turn damage into violations.
"""

from .checks import verify_outputs
from .graphs import KNN_FILES, KNN_SPACES, SCORE_TOLERANCE
from .report import NORM_TOLERANCE, Report

__all__ = ["KNN_FILES", "KNN_SPACES", "NORM_TOLERANCE", "SCORE_TOLERANCE", "Report",
           "verify_outputs"]
