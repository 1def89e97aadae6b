"""``python -m mailedge``: the same as the ``mailedge`` console script."""

from mailedge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
