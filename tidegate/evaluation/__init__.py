"""Evaluating confidence estimators and calibrating routing thresholds.

- ``dataset``: the labelled JSONL items ``tidegate eval`` reads.
- ``scoring``: is an answer right? (documented, robust normalisation).
- ``metrics``: AUROC, PRR, ECE and the routing curve — pure functions.
- ``gencache``: per-item model outputs cached on disk, keyed by model identity.
- ``runner``: runs edge (+ estimators) and cloud over the items, writes the results.
- ``plot``: the routing-curve picture.
- ``calibrate``: picks a threshold from an evaluation; ``policy_yaml`` writes it.

Nothing here imports torch at import time; the runner loads models when asked.
"""
