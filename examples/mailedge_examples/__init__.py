"""mailedge's example protocol handlers and the example mail server built from them.

The project installs this package (``pip install -e .`` in the repository), so tests and
your own code import it as ``mailedge_examples``; ``examples/mailserver.py`` runs the server.
"""
