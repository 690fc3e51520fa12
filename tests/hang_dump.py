"""``python hang_dump.py SECONDS (-m MODULE | SCRIPT) ARGS...``: run MODULE as ``python -m`` would
(or SCRIPT), and if the process is still running after SECONDS, write every thread's Python
stack to stderr. tests/test_distributed.py launches its torchrun workers through it, so a
worker that hangs says where (a teardown hang seen about once in 20 runs under load left only
"still running" in the test's output)."""

from __future__ import annotations

import faulthandler
import runpy
import sys


def main() -> None:
    seconds, target = float(sys.argv[1]), sys.argv[2:]
    faulthandler.dump_traceback_later(seconds, exit=False)
    if target[0] == "-m":
        sys.argv = target[1:]  # run_module puts the module's file in sys.argv[0], as -m does
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = target
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()
