"""`python -m kdsearch.cli`: the `kdsearch` command."""

from kdsearch.cli import main

if __name__ == "__main__":
    main()
