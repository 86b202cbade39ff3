"""Launchers that tests and benchmarks share: real Redis and Kafka-protocol broker processes on
loopback (``services``) and daemon deployments run in-process or as killable subprocesses
(``daemon_harness``).

This package sits above ``daemon`` (it may import ``daemon``, ``melo_runtime`` and ``schemas``) and
beside ``tests`` and ``bench``, which both import it; nothing in ``daemon``, ``melo_runtime`` or
``schemas`` imports it.
"""
