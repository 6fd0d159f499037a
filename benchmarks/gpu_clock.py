"""``timed(fn)``: what ``fn()`` returns and the seconds it took, the GPU's queued work included (synchronised on both
sides), for the benchmarks that time whole phases on one GPU."""

import time

import torch


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0
