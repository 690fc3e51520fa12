"""Step time of L2O with fp32 vs bf16 recurrent state on the CPU, one and all threads.

    python benchmarks/state_dtype_speed.py

1M parameters, l2o-dm, both optimizers stepped alternately (best of 10 each).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatl2o import L2O, make_rule


def main() -> None:
    threads = torch.get_num_threads()
    for th in sorted({1, threads}):
        torch.set_num_threads(th)
        opts = {}
        for sdt in (torch.float32, torch.bfloat16):
            p = torch.nn.Parameter(torch.randn(1_000_000))
            p.grad = torch.randn_like(p)
            opts[str(sdt).replace("torch.", "")] = L2O(
                [p], make_rule("l2o-dm"), lr=1e-9, state_dtype=sdt
            )
        best = dict.fromkeys(opts, float("inf"))
        for opt in opts.values():
            opt.step()
        for _ in range(10):
            for name, opt in opts.items():
                t = time.perf_counter()
                opt.step()
                best[name] = min(best[name], time.perf_counter() - t)
        times = ", ".join(f"{k} state {v * 1e3:.1f} ms" for k, v in best.items())
        print(f"{th} thread(s): {times}")


if __name__ == "__main__":
    main()
