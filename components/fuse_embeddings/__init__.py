from .component import fuse_embeddings, make_component

__all__ = ["fuse_embeddings", "make_component"]
