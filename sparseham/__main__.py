"""``python -m sparseham COMMAND ...`` is the ``sparseham`` command (see :mod:`sparseham.cli`)."""

import signal
import sys

try:
    from sparseham.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command itself is being imported
    print("interrupted", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)

sys.exit(main())
