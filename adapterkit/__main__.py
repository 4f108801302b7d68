"""``python -m adapterkit``: the command line (see ``adapterkit.apps.cli``)."""

import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
