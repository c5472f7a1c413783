from .component import fingerprint_items, make_component

__all__ = ["fingerprint_items", "make_component"]
