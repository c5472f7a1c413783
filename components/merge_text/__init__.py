from .component import make_component, merge_text

__all__ = ["merge_text", "make_component"]
