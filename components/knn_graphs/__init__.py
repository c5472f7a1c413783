from .component import knn_graphs, make_component

__all__ = ["knn_graphs", "make_component"]
