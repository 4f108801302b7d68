"""``python -m adapterkit``: the command line (see ``adapterkit.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
