from .component import embed_text, make_component

__all__ = ["embed_text", "make_component"]
