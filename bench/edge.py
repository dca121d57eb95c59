"""The edge model vs llama.cpp, side by side: see tidegate/benchmarks/edge.py.

    python bench/edge.py [--json] [--model smollm2-135m] [--threads 2]

The same as ``tidegate bench edge``; the code lives in the package so the CLI
can import it.
"""

import sys

from tidegate.benchmarks.edge import main

if __name__ == "__main__":
    sys.exit(main())
