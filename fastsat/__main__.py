"""``python -m fastsat`` runs the ``fastsat`` command line."""

import sys

from fastsat.cli import main

sys.exit(main())
