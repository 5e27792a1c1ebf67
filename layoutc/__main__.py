"""``python -m layoutc``: the command line."""

import sys

from layoutc.cli import main

sys.exit(main())
