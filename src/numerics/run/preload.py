"""What every rank imports before it is given a cell, loaded once in the pool's fork server.

Each rank used to be a fresh interpreter that imported torch, transformers, PEFT and the
drivers itself: 4.5-5.5 s of a pool's start on 2 cores, paid again whenever a pool is rebuilt
after a failed cell. Importing this module in `RankPool`'s fork server makes every rank a
fork of an interpreter that holds them already. DeepSpeed is left out on purpose: it picks its
accelerator when imported, from the environment a rank sets (``DS_ACCELERATOR=cpu`` for a gloo
pool on a machine with too few GPUs), so each rank imports it after setting that.

A module that fails to import here (a release it does not support) is skipped: the rank
imports it again where a cell needs it, and that cell reports the error.

Every rank imports it before its first cell (`launcher.start_rank`), spawned ones (NCCL) and
those a cluster's launcher starts (`numerics.run.launched`) included: what these imports create
and keep (transformers' nine activation modules, the Llama code's rotary function module) must predate the first cell, or
``engine_released`` counts it as that cell's.
"""
from importlib import import_module

RANK_MODULES = ("torch", "transformers", "peft",
                # transformers imports a model's code on its first use; from 5.25 (with the kernels
                # package) modeling_llama makes a module at import (apply_rotary_pos_emb as an
                # nn.Module) that engine_released would count as the first llama cell's
                "transformers.models.llama.modeling_llama",
                "numerics.run.drivers", "numerics.run.train",
                "numerics.run.trainer_driver", "numerics.run.lora",
                # DeepSpeed's Muon optimizer, imported by every engine's optimizer check (0.17.6 on),
                # wraps a function in torch.compile at import, which loads inductor: 0.9 s a rank
                "torch._inductor.compile_fx")

for _name in RANK_MODULES:
    try:
        import_module(_name)
    except Exception:  # noqa: BLE001, S112 - see the module docstring: the cell that needs it reports it
        continue
