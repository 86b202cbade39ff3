"""``python -m daemon ...`` is ``melo ...`` (see daemon/cli.py)."""

import sys

from daemon.cli import main

sys.exit(main())
