"""``python compile.py ARGS`` is ``item-embeddings compile ARGS``."""

import sys

from item_embeddings.ops.cli import main

if __name__ == "__main__":
    sys.exit(main(["compile", *sys.argv[1:]]))
