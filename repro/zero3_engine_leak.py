"""Plain-DeepSpeed reproducer: a ZeRO-3 engine is never freed after ``destroy()``.

Builds a small MLP's ZeRO-3 engine, takes one step, calls ``engine.destroy()``, drops every
reference and collects; then counts the torch modules still alive. Three things hold them:

* ``parameter_offload.FWD_MODULE_STACK``: every engine pushes its model, nothing pops it
  (every release from 0.14.5 to 0.19.8);
* the unbounded ``functools.lru_cache`` on ``PartitionedParameterCoordinator.__params_to_release``,
  keyed by (coordinator, module, step), under the nvtx decorator (the same releases);
* up to 0.16.2 (fixed in 0.16.3), the optimizer's ``grad_accs`` list of AccumulateGrad nodes: each node
  holds its parameter from C++, the parameter's attributes lead back to the optimizer, and the
  collector cannot see the edge, so the cycle is never collected. 0.16.3 registers
  post-accumulate-grad hooks instead.

``--release`` drops the first two (as Numerics' ranks do, ``drivers.release_zero3_leftovers``), so
what is left is the third. One process (gloo, CPU); prints the modules left per engine over
``--engines`` builds and exits 1 if any are left:

    DS_ACCELERATOR=cpu LOCAL_SIZE=1 python repro/zero3_engine_leak.py [--engines 3] [--release]

On torch 2.13 CPU (2026-12-02): deepspeed 0.19.8 and 0.16.9: 5 modules left per engine (the
engine, itself a module, and the MLP's 4), 0 with ``--release``; 0.15.4 and 0.14.5: 4 per engine
(the MLP) with or without it.
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import sys

import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CONFIG = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True}


def train_and_destroy() -> None:
    import deepspeed

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=CONFIG)
    loss = engine(torch.randn(4, 16)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    engine.destroy()


def release_global_holders() -> None:
    """Drop the two holders every release shares (the forward module stack, the coordinator's cache)."""
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    getattr(parameter_offload, "FWD_MODULE_STACK", []).clear()
    method = getattr(partitioned_param_coordinator.PartitionedParameterCoordinator,
                     "_PartitionedParameterCoordinator__params_to_release", None)
    for candidate in (method, *(cell.cell_contents for cell in getattr(method, "__closure__", None) or ())):
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()


def modules_alive() -> int:
    gc.collect()
    return sum(isinstance(obj, torch.nn.Module) for obj in gc.get_objects())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--release", action="store_true", help="drop the two holders every release shares")
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    before = modules_alive()
    for built in range(1, args.engines + 1):
        train_and_destroy()
        if args.release:
            release_global_holders()
        left = modules_alive() - before
        print(f"deepspeed {deepspeed.__version__}: after {built} engine(s) destroyed, {left} modules alive "
              f"({left / built:g} per engine{', global holders dropped' if args.release else ''})", flush=True)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
