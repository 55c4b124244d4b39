"""``python -m dim3``: the command line."""

import sys

from dim3.cli import main

sys.exit(main())
