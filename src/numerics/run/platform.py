"""What a rank needs to know about the machine: backend, device, and DeepSpeed's CPU fp16 gate."""
from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

TRACKED_PACKAGES = ("torch", "deepspeed", "transformers", "peft", "accelerate")


def choose_backend(world_size: int) -> str:
    """NCCL when there is a GPU for every rank, otherwise gloo on CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def rank_environment(rank: int, world_size: int, port: int, backend: str) -> dict[str, str]:
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        # Tokenizers and OpenMP threads would oversubscribe the 2-core baseline.
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if backend == "gloo":
        env["DS_ACCELERATOR"] = "cpu"
        # As DeepSpeed's own launcher does (launcher/launch.py): without it the CPU accelerator's
        # device_count() runs `numactl --hardware` on every call, once per gradient bucket at ZeRO-3.
        env["LOCAL_SIZE"] = str(world_size)
    return env


SHARED_MEMORY = Path("/dev/shm")  # where shm_open's names live on Linux


def release_shm_workspace() -> None:
    """Unlink this rank's DeepSpeed shared-memory workspace once every rank has mapped it.

    When every rank is local (``LOCAL_SIZE`` equals the world size), DeepSpeed's CPU comm op
    creates a 66 MB segment per rank, ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``,
    and never unlinks it: each process group left world size x 66 MB of RAM in /dev/shm
    (20 GB on this machine after a few days of test sessions, until memory ran out). After a
    barrier every rank has opened every other's segment, so the names can go: the mappings
    live until the processes end, however they end.
    """
    import torch.distributed as dist

    dist.barrier()
    port, rank = os.environ.get("MASTER_PORT", ""), dist.get_rank()
    for segment in SHARED_MEMORY.glob(f"deepspeed_allreduce_buffer*_{port}_{rank}"):
        segment.unlink(missing_ok=True)


def lift_cpu_fp16_check() -> bool:
    """Let DeepSpeed's CPU accelerator accept fp16 where oneDNN lacks native fp16.

    torch computes fp16 on any CPU; DeepSpeed refuses it unless the processor has
    AVX512-FP16/AMX. Lifting that one check runs DeepSpeed's whole fp16 path (loss
    scaling, overflow skips, master weights) everywhere; traces record that it was
    lifted. Returns True when it had to be lifted.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" or accelerator.is_fp16_supported():
        return False
    cls = type(accelerator)
    cls.is_fp16_supported = lambda self: True
    cls.supported_dtypes = lambda self: [torch.float32, torch.bfloat16, torch.float16]
    return True


def quiet_libraries() -> None:
    """Keep rank output to what matters: DeepSpeed's per-engine info and warnings and torch's
    deprecation notices repeat for every cell; errors still show, and verdicts say the rest."""
    import logging
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    for name in ("accelerate", "transformers"):  # e.g. accelerate's GA-plugin notice on every Trainer cell
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def run_metadata(backend: str, world_size: int, fp16_check_lifted: bool) -> dict[str, Any]:
    return {
        "versions": package_versions(),
        "backend": backend,
        "device": torch.cuda.get_device_name() if backend == "nccl" else "cpu",
        "world_size": world_size,
        "fp16_check_lifted": fp16_check_lifted,
        "torch_threads": torch.get_num_threads(),
        "host_pid": os.getpid(),
    }
