"""The edge node: a small local model, a confidence estimator, a ModelNode server."""
