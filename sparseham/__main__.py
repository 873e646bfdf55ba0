"""``python -m sparseham COMMAND ...`` is the ``sparseham`` command (see :mod:`sparseham.cli`)."""

import sys

from sparseham.cli import main

sys.exit(main())
