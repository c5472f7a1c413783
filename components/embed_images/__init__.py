from .component import embed_images, make_component

__all__ = ["embed_images", "make_component"]
