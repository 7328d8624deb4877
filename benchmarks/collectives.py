"""Latency of the gloo collectives ZeRO issues, between 2 CPU ranks: the floor under a cell's steps.

The matrix's buckets are scaled to the tiny model (1500 elements), so a ZeRO-1/2 step issues tens
of small all-reduces and a ZeRO-3 step tens of all-gathers and reduce-scatters; at these sizes a
collective costs its latency, not its bytes. Prints microseconds per call for a few sizes.
Usage:
    .venv/bin/python benchmarks/collectives.py [--calls 300]
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from numerics.run.launcher import free_port

SIZES = (2, 1500, 100_000)  # a scalar, one scaled bucket, a default-sized bucket's worth of a tiny model


def per_call_us(operation, calls: int) -> float:
    for _ in range(10):
        operation()
    started = time.perf_counter()
    for _ in range(calls):
        operation()
    return (time.perf_counter() - started) / calls * 1e6


def rank_main(rank: int, port: int, calls: int) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13 renames the *_tensor collectives DeepSpeed calls
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for size in SIZES:
        tensor = torch.ones(size)
        figures = {
            "all_reduce": per_call_us(lambda: dist.all_reduce(tensor), calls),
            "all_gather": per_call_us(lambda: dist.all_gather_into_tensor(torch.empty(2 * size), tensor), calls),
            "reduce_scatter": per_call_us(lambda: dist.reduce_scatter_tensor(torch.empty(size // 2), tensor), calls),
        }
        if rank == 0:
            print(f"{size:>7} fp32 elements: " + ", ".join(f"{name} {us:,.0f} us" for name, us in figures.items()), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    mp.spawn(rank_main, args=(free_port(), args.calls), nprocs=2)


if __name__ == "__main__":
    main()
