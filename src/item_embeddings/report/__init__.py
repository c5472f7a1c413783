"""The QA report of a run: one self-contained HTML page (``qa_report.html``, docs/report.md).

Every plot is a PNG drawn with matplotlib and inlined as a base64 ``data:`` URI, the CSS is
inline, and there is no script, font or link to anything outside the page, so it can be opened
from disk or shown by the Vertex AI UI as an ``HTML`` artifact. Each array is read once in
chunks and everything drawn comes from fixed-size samples, so memory, time after the pass and
the page's size stay bounded at any catalogue size. Item data (ids, titles, categories, URLs)
is untrusted and HTML-escaped everywhere.
"""

from .inputs import ReportInputError
from .page import SECTIONS
from .step import write_qa_report

__all__ = ["SECTIONS", "ReportInputError", "write_qa_report"]
