from .component import qa_report, make_component

__all__ = ["qa_report", "make_component"]
