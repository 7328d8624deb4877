"""Plain-DeepSpeed reproducer: ZeRO-3 full parameters read with `GatheredParameters`
inside a training loop, against DeepSpeed's own fp32 accessor.

Two ranks (gloo, CPU or one GPU each) train a small embedding + MLP model for a
few steps under ZeRO-3 fp32. Around every step it reads the full parameters the
way a user who logs, clips or saves weights mid-training does:

- after backward, before ``engine.step()``: ``with GatheredParameters(params)``;
- after ``engine.step()``: ``with GatheredParameters(params)``, then checksums
  compared across ranks and with ``safe_get_full_fp32_param`` (the optimizer's
  fp32 master, gathered by DeepSpeed's public accessor).

Prints one line per finding and exits 1 if any, 0 if the release behaves:

    DS_ACCELERATOR=cpu python repro/zero3_gathered_parameters.py [--steps 8] [--read backward|step|both]

Findings on torch 2.13 CPU, two ranks, 60 steps (see README, "Known deviations"):
- ``--read backward``: entering/leaving GatheredParameters between backward and
  step raises in ``free_param`` (the embedding is left in ``ds_active_sub_modules``
  by backward) on 0.17.6, 0.18.0, 0.18.5 and 0.19.0, on every step; 0.19.5, 0.19.7
  and 0.19.8 read cleanly.
- ``--read step``: GatheredParameters after step returns, on one rank at random,
  values that differ from the other rank's and from the fp32 master (up to 3e38,
  NaN at times) on 0.17.6, 0.18.0, 0.18.5, 0.19.0, 0.19.5 and 0.19.7 (3 to 17 of
  60 steps); none on 0.19.8 in 120 steps.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

READS = {"backward": ("backward",), "step": ("step",), "both": ("backward", "step")}
VOCAB, WIDTH, HIDDEN, SEQ, BATCH = 61, 32, 63, 16, 4


def checksum(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, WIDTH), torch.nn.Linear(WIDTH, HIDDEN), torch.nn.GELU(),
                               torch.nn.Linear(HIDDEN, VOCAB))


def config() -> dict:
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
            "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 1000,
                                  "stage3_param_persistence_threshold": 100, "stage3_max_live_parameters": 1000,
                                  "stage3_max_reuse_distance": 1000},
            "zero_allow_untested_optimizer": True}


def agree(text: str) -> bool:
    """True on every rank iff every rank passed the same ``text``."""
    texts = [None] * dist.get_world_size()
    dist.all_gather_object(texts, text)
    return len(set(texts)) == 1


def gathered(engine, params) -> tuple[list[torch.Tensor] | None, str]:
    import deepspeed

    try:
        with deepspeed.zero.GatheredParameters(params):
            values = [p.detach().float().cpu().clone() for p in params]
    except (AssertionError, RuntimeError) as err:
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return values, ""


def rank_main(rank: int, world_size: int, port: int, steps: int, reads: tuple[str, ...], findings) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    net = model()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config())
    params = list(engine.module.parameters())
    generator = torch.Generator().manual_seed(1 + rank)
    found = []
    for step in range(steps):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator).to(engine.device)
        logits = engine(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))
        engine.backward(loss)
        active = sorted({name for name, p in engine.module.named_parameters() if p.ds_active_sub_modules})
        _, error = gathered(engine, params) if "backward" in reads else (None, "")
        if error:
            found.append(f"step {step}: GatheredParameters between backward and step: {error} "
                         f"(parameters still active after backward: {active})")
        engine.step()
        if "step" not in reads:
            continue
        values, error = gathered(engine, params)
        if error:
            found.append(f"step {step}: GatheredParameters after step: {error}")
            continue
        master = [safe_get_full_fp32_param(p).float().cpu() for p in params]
        if not agree(checksum(values)):
            found.append(f"step {step}: GatheredParameters after step differs across ranks "
                         f"(rank {rank}: {checksum(values)}, nan: {any(v.isnan().any().item() for v in values)})")
        if checksum(values) != checksum(master):
            worst = max((v - m).abs().max().item() for v, m in zip(values, master))
            found.append(f"step {step}: GatheredParameters after step differs from safe_get_full_fp32_param "
                         f"by up to {worst:.3g}")
    if rank == 0 or found:
        findings.put((rank, deepspeed.__version__, found))
    engine.destroy()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--read", choices=["backward", "step", "both"], default="both",
                        help="where to read: after backward (before step), after step, or both")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    context = mp.get_context("spawn")
    findings = context.SimpleQueue()
    mp.start_processes(rank_main, args=(2, free_port(), args.steps, READS[args.read], findings), nprocs=2, start_method="spawn")
    found, version = [], "?"
    while not findings.empty():
        rank, version, lines = findings.get()
        found += [f"rank {rank}: {line}" for line in lines]
    print(f"deepspeed {version}: {len(found)} finding(s)")
    print("\n".join(found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
