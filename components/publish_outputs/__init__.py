from .component import make_component, publish_outputs

__all__ = ["make_component", "publish_outputs"]
