"""Evaluation of edit quality, the library behind ``melo eval``.

Real datasets as sequential edit streams (``datasets``), the methods compared (``methods``: MELO
through ``melo_runtime``; GRACE, LoRA fine-tuning and replay under ``baselines``), the metrics and
the replay that scores them (``quality``), the same replay through the whole daemon pipeline
(``quality_daemon`` on ``daemon_run``), and the command line (``cli``).

Layering: this package sits above ``daemon`` and ``melo_testkit`` (the daemon-pipeline replay runs
the real writer on local services) and below ``bench``, whose benchmark scripts import it.
``daemon.cli`` calls ``melo_eval.cli`` for ``melo eval``, the one import up the layers (the
command line is the composition root); nothing here imports ``bench`` or ``tests``.
"""
