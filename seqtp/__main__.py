"""``python -m seqtp``: the command line (see :mod:`seqtp.cli`)."""

import sys

from .cli import main

sys.exit(main())
