"""``python -m melo_eval ...`` is ``melo eval ...``."""

from melo_eval.cli import main

raise SystemExit(main())
