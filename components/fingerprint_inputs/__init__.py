from .component import fingerprint_inputs, make_component

__all__ = ["fingerprint_inputs", "make_component"]
