"""``python -m smallthinker_lab.quality``."""

import sys

from .cli import main

sys.exit(main())
