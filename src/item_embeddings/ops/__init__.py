"""The top layer: the ``item-embeddings`` command line and the operations behind it.

:mod:`.cli` (parser and exit statuses), :mod:`.local_commands` / :mod:`.vertex_commands` (the
commands), :mod:`.local_run` (the whole pipeline with ``kfp.local``), :mod:`.vertex` (submit,
schedules, template uploads). This layer may import everything below it: the pipeline, the
components and the core; nothing below imports it.
"""
