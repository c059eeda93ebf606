"""`python -m impasto` runs the command line, as `impasto` does."""

import sys

from .cli import main

sys.exit(main())
