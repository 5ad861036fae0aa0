"""Shared pieces of the parity tests: a tiny LLaMA-2, a batch, forward+backward, and the
patched-vs-unpatched switch."""

from __future__ import annotations

import torch

import ascend_patches
from recipes.model import llama2



def ops_disabled():
    """Only the device layer (and collectives): stock megatron modules run."""
    return ascend_patches.disabled("ops")


def tiny_shape(**kw):
    base = llama2.shape("llama2-tiny")
    from dataclasses import replace

    return replace(base, **kw)


def batch(seed=0, b=2, s=32, vocab=512):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def forward_backward(model, data, dtype=torch.float32):
    model.zero_grad()
    tokens, labels = data["tokens"], data["labels"]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, pos, None)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), loss.detach().float(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
