"""``python -m smallthinker_lab``: the ``smallthinker-lab`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
