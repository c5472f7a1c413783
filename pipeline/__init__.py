"""The KFP pipeline: wires the components into a DAG and compiles it."""

from .pipeline import PIPELINE_NAME, build_pipeline, compile_pipeline

__all__ = ["PIPELINE_NAME", "build_pipeline", "compile_pipeline"]
