"""Installs the test network guard (``tests/network_guard.py``) in every Python subprocess that
a test starts: conftest puts this folder on ``PYTHONPATH`` and sets the refusal log."""

import importlib.util
import os

if os.environ.get("ITEM_EMBEDDINGS_TEST_NETWORK_LOG"):
    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "network_guard.py")
    _spec = importlib.util.spec_from_file_location("_item_embeddings_network_guard", _path)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.install()
