"""Transitional: the old top-level name of :mod:`mailedge_examples.imap_handler`.

Only for test modules not yet importing ``mailedge_examples.imap_handler``; delete with the
``examples/compat`` entries of ``pythonpath`` and ``mypy_path`` in pyproject.toml.
"""

from mailedge_examples.imap_handler import *  # noqa: F403
