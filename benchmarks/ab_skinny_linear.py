"""A/B of the few-token matmul inside the engine: any `martlet` command, with the Triton kernel
taking up to MAX_TOKENS rows (16 is the default; 0 sends every product to cuBLAS).

    python3 benchmarks/ab_skinny_linear.py MAX_TOKENS bench latency --config-dir ... --batch-size 1 ...
"""

import sys

import martlet.kernels.linear as linear
from martlet.cli import main

linear.MAX_TOKENS = int(sys.argv.pop(1))
main()
