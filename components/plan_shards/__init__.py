from .component import plan_shards, make_component

__all__ = ["plan_shards", "make_component"]
