"""KFP components: one folder each, thin wrappers over the plain-Python core in ``item_embeddings``.

Each folder exposes the component's Python function (unit-testable through ``python_func``) and a
``make_component(base_image)`` factory, because the image is a compile-time option.
"""

DEFAULT_IMAGE = "us-docker.pkg.dev/YOUR_PROJECT/item-embeddings/item-embeddings:0.1.0"
