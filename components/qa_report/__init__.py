from .component import make_component, qa_report

__all__ = ["qa_report", "make_component"]
