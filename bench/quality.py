"""``python -m bench.quality ...``: the quality benchmark, i.e. ``melo eval ...`` (melo_eval/cli.py).

Kept as a module of bench/ so the commands recorded in bench/RESULTS.md run as
written; the evaluation itself lives in the melo_eval package.
"""

from melo_eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
