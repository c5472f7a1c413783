"""``python submit.py ARGS`` is ``item-embeddings submit ARGS``."""

import sys

from item_embeddings.ops.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
