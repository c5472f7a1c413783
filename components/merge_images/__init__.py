from .component import make_component, merge_images

__all__ = ["merge_images", "make_component"]
