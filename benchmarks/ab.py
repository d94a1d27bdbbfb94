"""A/B runs of engine internals: set module constants, then run any `martlet` command.

    PYTHONPATH=$PWD python3 benchmarks/ab.py martlet.kernels.linear.MAX_TOKENS=0 [NAME=VALUE ...] bench latency ...

Each NAME=VALUE is set before the command runs; VALUE is a Python expression evaluated in the
module's namespace, e.g. `martlet.kernels.linear.MAX_TOKENS=0` sends every matmul to cuBLAS and
`martlet.kernels.decode.HALF_CONFIG="DecodeConfig(64,4,2)"` swaps the decode tile.
"""

import importlib
import sys

from martlet.cli import main

while len(sys.argv) > 1 and "=" in sys.argv[1] and not sys.argv[1].startswith("-"):
    name, value = sys.argv.pop(1).split("=", 1)
    module, attr = name.rsplit(".", 1)
    mod = importlib.import_module(module)
    setattr(mod, attr, eval(value, vars(mod)))
main()
