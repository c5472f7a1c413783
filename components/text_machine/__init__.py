from .component import make_component, text_machine

__all__ = ["make_component", "text_machine"]
