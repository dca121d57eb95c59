"""Benchmarks importable by the CLI (``tidegate bench ...``); bench/*.py run them too."""
