"""tidegate: hybrid edge-cloud routing for language models.

This package is the small shared kernel: the wire contract (``tidegate.v1``),
domain types, errors that carry a gRPC status, server bootstrap and the CLI.
It imports no torch; model code lives in ``tidegate.inference``, ``edge_node``
and ``cloud_node`` and is imported only where a model is served.
"""

__version__ = "0.1.0"
