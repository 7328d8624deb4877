"""Plain-DeepSpeed reproducer: ZeRO-0 bf16's first AdamW update is 0.744x the true one.

``FP16_Optimizer``, which runs ZeRO-0 bf16 (from 0.17.6; ``BF16_Optimizer`` before) and ZeRO-0
fp16, calls ``initialize_optimizer_states()`` when it is built, and that runs a real
``optimizer.step()`` on zero gradients: Adam's step count is 1 before training starts (and
AdamW's decoupled weight decay has been applied once). The first real update then uses the
bias corrections of step 2: m/(1 - b1^2) / sqrt(v/(1 - b2^2)) = 0.744 x sign(g) with the
default betas, where a first Adam step moves every weight by lr x sign(g). Later steps keep
the off-by-one, so the run drifts from every other stage (Numerics' ZeRO-0 bf16 AdamW cells,
a known deviation). SGD has no step count and is unaffected.

One process (gloo, CPU), a small MLP, weight decay 0; prints, per ZeRO stage, the optimizer's
step count after ``deepspeed.initialize`` and the first update of the fp32 master weights in
units of lr (median over weights whose gradient is far above eps), and exits 1 if any stage
departs from 1.0:

    DS_ACCELERATOR=cpu python repro/zero0_bf16_adam_first_step.py [--stages 0 1] [--dtype bf16]

On torch 2.13 CPU, deepspeed 0.19.8: bf16 ZeRO-0 step count 1, first update 0.744 x lr, ZeRO-1
step count 0, 1.000 x lr; fp16 (``--dtype fp16``) the same, 0.744 and 1.000.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

import torch

LR = 1e-3
EXPECTED = 1.0  # a first Adam step moves each weight by lr x sign(g)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config(stage: int, dtype: str) -> dict:
    return {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
            # fp16: a loss scale the first step does not overflow at (the default 2^16 would skip it)
            dtype: {"enabled": True, **({"initial_scale_power": 8} if dtype == "fp16" else {})},
            "zero_optimization": {"stage": stage}}


def step_count(optimizer: torch.optim.Optimizer) -> int:
    """The Adam step count the optimizer will bias-correct its next update from."""
    inner = getattr(optimizer, "optimizer", optimizer)
    counts = [int(state["step"]) for state in inner.state.values() if "step" in state]
    counts += [int(group["step"]) for group in inner.param_groups if "step" in group]
    return max(counts, default=0)


def fp32_master(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The optimizer's fp32 master weights, flat (one rank: ZeRO-1's partition is all of them).
    DeepSpeed's accessor (``safe_get_full_fp32_param``) returns None below ZeRO-1."""
    groups = getattr(optimizer, "fp32_groups_flat", None) or optimizer.single_partition_of_fp32_groups
    return torch.cat([group.detach().reshape(-1).float() for group in groups]).clone()


def first_update_in_lr(stage: int, dtype: str) -> tuple[int, float]:
    """The optimizer's step count before training, and the median |first update| / lr."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config(stage, dtype))
    count, before = step_count(engine.optimizer), fp32_master(engine.optimizer)
    inputs = torch.randn(8, 32).to(engine.device, {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    engine.backward(engine(inputs).float().pow(2).mean() * 100)  # gradients far above Adam's eps (1e-8)
    engine.step()
    moved = (fp32_master(engine.optimizer) - before).abs() / LR
    engine.destroy()
    return count, float(moved.median())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")  # no LOCAL_SIZE: with it DeepSpeed maps a 66 MB /dev/shm segment it never unlinks
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    wrong = []
    for stage in args.stages:
        count, update = first_update_in_lr(stage, args.dtype)
        print(f"deepspeed {deepspeed.__version__} ZeRO-{stage} {args.dtype}: step count after initialize {count}, "
              f"first update {update:.3f} x lr (expected {EXPECTED:.3f})", flush=True)
        if abs(update - EXPECTED) > 0.01:
            wrong.append(stage)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
