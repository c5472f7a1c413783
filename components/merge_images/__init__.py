from .component import merge_images, make_component

__all__ = ["merge_images", "make_component"]
