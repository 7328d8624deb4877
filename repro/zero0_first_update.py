"""Plain-DeepSpeed reproducer: ZeRO-0 bf16's updates are not the ones plain PyTorch takes.

Two bugs of the optimizer wrappers that run ZeRO-0 in 16 bits, each against the same update of
the same model in plain fp32 PyTorch (``torch.optim.AdamW`` / ``SGD``, same lr):

* AdamW (FusedAdam, ``FP16_Optimizer``; bf16 from 0.17.6, ``BF16_Optimizer`` before; fp16 too):
  ``FP16_Optimizer`` calls ``initialize_optimizer_states()`` when it is built, and that runs a real
  ``optimizer.step()`` on zero gradients, so Adam's step count is 1 before training starts. The
  first real update then uses the bias corrections of step 2: m/(1 - b1^2) / sqrt(v/(1 - b2^2)) =
  0.744 x the true one with the default betas; later steps keep the off-by-one.
* SGD (any optimizer but Adam, ``FP16_UnfusedOptimizer``) in bf16 on deepspeed 0.17.6-0.18.5
  (fixed in 0.18.6): the wrapper takes no low-precision dtype and runs bf16 as fp16, with a
  dynamic loss scale of 2^16 (the engine reports the grad norm x 65536), and the gradients are
  not cleared after a step, so step k applies the sum of all gradients so far.

One process (gloo, CPU), a small MLP, weight decay 0; prints, per ZeRO stage, Adam's step count
after ``deepspeed.initialize``, the norm of each of the first 3 updates of the fp32 master weights
and the engine's first reported grad norm, each in units of plain PyTorch's on the same batch,
and exits 1 if any departs from 1.0 by more than bf16 rounding (2 %):

    DS_ACCELERATOR=cpu python repro/zero0_first_update.py [--stages 0 1] [--dtype bf16] [--optimizer adamw]

On torch 2.13 CPU (2026-12-02): deepspeed 0.19.8 and 0.17.6, AdamW bf16: ZeRO-0 step count 1,
updates 0.744, 0.859, 0.911; ZeRO-1 step count 0, 1.000 each (fp16, ``--dtype fp16``, needs a
processor DeepSpeed allows fp16 on). SGD bf16: 0.19.8 1.001, 1.003, 1.001 at ZeRO-0 and 1;
0.17.6 ZeRO-0 1.001, 1.414, 2.047 (the gradients are never cleared) with the reported grad norm
6.562e+04 x; ZeRO-1 1.000 each.
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import sys

import torch

LR = 1e-3
STEPS = 3
TOLERANCE = 0.02  # bf16 rounding of the forward moves the gradient's norm by well under 1 %
OPTIMIZERS = {"adamw": ("AdamW", torch.optim.AdamW), "sgd": ("SGD", torch.optim.SGD)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config(stage: int, dtype: str, optimizer: str) -> dict:
    return {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0: plain PyTorch does not
            "optimizer": {"type": OPTIMIZERS[optimizer][0], "params": {"lr": LR, "weight_decay": 0.0}},
            # fp16: a loss scale the first step does not overflow at (the default 2^16 would skip it)
            dtype: {"enabled": True, **({"initial_scale_power": 8} if dtype == "fp16" else {})},
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}  # SGD at ZeRO 1-3


def step_count(optimizer: torch.optim.Optimizer) -> int:
    """The Adam step count the optimizer will bias-correct its next update from (0 for SGD)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    counts = [int(state["step"]) for state in inner.state.values() if "step" in state]
    counts += [int(group["step"]) for group in inner.param_groups if "step" in group]
    return max(counts, default=0)


def fp32_master(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The optimizer's fp32 master weights, flat (one rank: ZeRO-1's partition is all of them).
    DeepSpeed's accessor (``safe_get_full_fp32_param``) returns None below ZeRO-1."""
    groups = (getattr(optimizer, "fp32_groups_flat", None) or getattr(optimizer, "single_partition_of_fp32_groups", None)
              or [p for group in optimizer.fp32_groups for p in group])  # FP16_UnfusedOptimizer: one tensor a weight
    return torch.cat([group.detach().reshape(-1).float() for group in groups]).clone()


def loss_of(output: torch.Tensor) -> torch.Tensor:
    return output.float().pow(2).mean() * 100  # gradients far above Adam's eps (1e-8)


def flat(parameters) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in parameters]).clone()


def updates(stage: int, dtype: str, optimizer: str) -> tuple[int, list[float], float]:
    """Adam's step count before training; each step's update norm over plain PyTorch's on the
    same batch; and the first reported grad norm over plain PyTorch's."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    plain = copy.deepcopy(model)
    plain_step = OPTIMIZERS[optimizer][1](plain.parameters(), lr=LR, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config(stage, dtype, optimizer))
    count, ratios, reported = step_count(engine.optimizer), [], None
    for _ in range(STEPS):
        inputs = torch.randn(8, 32)
        before, plain_before = fp32_master(engine.optimizer), flat(plain.parameters())
        engine.backward(loss_of(engine(inputs.to(engine.device, {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]))))
        engine.step()
        plain_step.zero_grad()
        loss_of(plain(inputs)).backward()
        if reported is None:
            true_norm = float(torch.cat([p.grad.reshape(-1) for p in plain.parameters()]).norm())
            norm = engine.get_global_grad_norm()
            reported = float("nan") if norm is None else float(norm) / true_norm
        plain_step.step()
        ratios.append(float((fp32_master(engine.optimizer) - before).norm() / (flat(plain.parameters()) - plain_before).norm()))
    engine.destroy()
    return count, ratios, reported


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")  # no LOCAL_SIZE: with it DeepSpeed maps a 66 MB /dev/shm segment it never unlinks
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    wrong = []
    for stage in args.stages:
        count, ratios, reported = updates(stage, args.dtype, args.optimizer)
        print(f"deepspeed {deepspeed.__version__} ZeRO-{stage} {args.dtype} {args.optimizer}: step count after initialize "
              f"{count}; updates " + ", ".join(f"{r:.3f}" for r in ratios) + " x plain PyTorch's; first reported grad "
              f"norm {reported:.4g} x (expected 1)", flush=True)
        # ZeRO-0 fp32 and some wrappers report no norm (nan): only the updates are then checked
        if any(abs(r - 1.0) > TOLERANCE for r in ratios) or abs(reported - 1.0) > TOLERANCE:
            wrong.append(stage)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
