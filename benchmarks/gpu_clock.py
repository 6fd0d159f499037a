"""``timed(fn)``: what ``fn()`` returns and the seconds it took, the GPU's queued work included (synchronised on both
sides where there is a GPU), for the benchmarks that time a call or a whole phase."""

import time

import torch


def timed(fn):
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if gpu:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0
