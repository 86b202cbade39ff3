"""The MELO streaming editor service: settings, event sources, worker, record and snapshot stores, metrics, API.

Imports `melo_runtime` (the algorithm) and `schemas` (the contracts); neither imports this package.
"""
