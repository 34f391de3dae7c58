"""``python -m fastdeeplab``: the same command line as ``fastdeeplab``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
