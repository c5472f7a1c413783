from .component import merge_text, make_component

__all__ = ["merge_text", "make_component"]
