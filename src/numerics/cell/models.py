"""Tiny models with random weights, deterministic from the seed.

``llama``: a transformers Llama (RMSNorm, rotary, SDPA, untied head) small enough
for CPU, shaped so that ZeRO's partitioning has work to do: an odd MLP width with
MLP biases gives tensors of odd size, so every world size pads a partition, and
the vocabulary (61) is odd too. ``mlp``: a plain-torch bigram model for the fastest
checks. Both take ``input_ids``/``labels`` and return an HF-style output with the
loss inside, as fine-tuning scripts expect.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from numerics.cell.data import VOCAB

LLAMA_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=63,
    mlp_bias=True,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attention_dropout=0.0,
    tie_word_embeddings=False,
)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions (labels == -100 are masked)."""
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)


class BigramMLP(nn.Module):
    """Embedding -> MLP -> logits per position; a bigram model can reach a Markov chain's entropy rate."""

    def __init__(self, vocab: int = VOCAB, width: int = 33, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """No ``**kwargs``: the HF Trainer would take that as support for ``num_items_in_batch``."""
        logits = self.down(nn.functional.gelu(self.up(self.embed(input_ids))))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits)


def build_model(name: str, seed: int) -> nn.Module:
    """A freshly initialised fp32 model; the same (name, seed) gives the same weights bit for bit."""
    torch.manual_seed(seed)
    if name == "mlp":
        return BigramMLP()
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**LLAMA_SHAPE, attn_implementation="sdpa")
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown model {name!r}")


def tensor_checksum(tensors: list[torch.Tensor]) -> str:
    """A short hash of the tensors' bytes (as fp32), in order: equal iff bit-identical."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
