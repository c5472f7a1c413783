from .component import make_component, plan_shards

__all__ = ["plan_shards", "make_component"]
