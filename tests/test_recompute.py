"""Activation recomputation in the built-in engine (recipes.train.recompute): Megatron-LM's
flags and MindSpeed's two names resolve to megatron-core's TransformerConfig fields, a flag that
would be ignored is refused, and a run with recomputation repeats the run without it (dropout
0.1, fp32): the recomputed forward draws the same dropout masks from the restored RNG states."""

import argparse
import json

import pytest

from recipes.errors import BadInput
from recipes.train import recompute
from tests.helpers.launch import run_torchrun


def _resolve(*argv):
    p = argparse.ArgumentParser()
    recompute.add_flags(p)
    return recompute.resolve(p.parse_args([str(a) for a in argv]))


def test_flags_resolve_to_megatron_cores_fields():
    assert _resolve().config() == {} and _resolve().argv() == []
    full = _resolve("--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", 2)
    assert full.config() == {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}
    assert full.argv() == ["--recompute-granularity", "full", "--recompute-method", "block",
                           "--recompute-num-layers", 2]
    # Megatron-LM's alias, megatron-core's default module
    assert _resolve("--recompute-activations").config() == {"recompute_granularity": "selective"}
    # MindSpeed's names are megatron-core's layernorm and mlp modules, beside those given
    ms = _resolve("--recompute-modules", "core_attn", "--recompute-norm", "--recompute-activation-function")
    assert ms.config() == {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "layernorm", "mlp"]}
    assert ms.argv() == ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "layernorm", "mlp"]


@pytest.mark.parametrize("argv, says", [
    (["--recompute-granularity", "full"], "needs --recompute-method uniform|block and --recompute-num-layers"),
    (["--recompute-method", "uniform", "--recompute-num-layers", 1], "apply to --recompute-granularity full only"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", 1], "apply to --recompute-granularity full"),
    (["--recompute-modules", "mlp"], "--recompute-modules needs --recompute-granularity selective"),
    (["--recompute-granularity", "selective", "--recompute-modules", "moe"], "a dense LLaMA-2 layer has"),
    (["--recompute-activations", "--recompute-granularity", "full"], "contradicts --recompute-granularity full"),
    (["--recompute-norm", "--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", 1], "--recompute-norm recomputes part of each layer"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 0], "give 1 or more"),
])
def test_a_flag_that_would_be_ignored_or_contradicts_is_refused(argv, says):
    with pytest.raises(BadInput, match=says.replace("|", r"\|")):
        _resolve(*argv)


def _losses(alpaca_pretrain_data, tmp_path, name, *flags):
    prefix, tok = alpaca_pretrain_data
    metrics = tmp_path / f"{name}.jsonl"
    out = run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", prefix, "--tokenizer-name-or-path",
                       tok, "--train-iters", 6, "--seq-length", 64, "--hidden-dropout", 0.1, "--attention-dropout",
                       0.1, "--metrics-file", metrics, *flags)
    return out, [(r["loss"], r["grad_norm"]) for r in map(json.loads, open(metrics))]


FULL_UNIFORM = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1]
FULL_BLOCK = ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", 1]
SELECTIVE = ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"]
NORM = ["--recompute-modules", "core_attn", "--recompute-norm", "--recompute-activation-function"]


@pytest.mark.slow
@pytest.mark.parametrize("layout, exact, near", [
    (["--tensor-model-parallel-size", 2], [FULL_UNIFORM], [NORM]),
    pytest.param(["--pipeline-model-parallel-size", 2], [FULL_BLOCK, SELECTIVE], [], marks=pytest.mark.full),
], ids=["tp2", "pp2"])
def test_recomputation_repeats_the_losses_and_gradient_norms(alpaca_pretrain_data, tmp_path, layout, exact, near):
    """6 iterations, dropout 0.1, fp32.  Full recomputation (uniform at TP=2, block at PP=2) and
    selective core attention and MLP: every loss and gradient norm equal bit for bit.  With the
    norms recomputed (megatron-core's layernorm module, under MindSpeed's names): the first loss
    bit for bit, then losses and gradient norms within 1e-6 relative.  Its gradients differ from
    the plain run's in the last bits, through megatron-core's CheckpointWithoutOutput, which
    recomputes the norm inside the backward of what follows it; the updated weights then carry the
    difference into later losses (measured: 3e-8 in one grad norm of 6 at TP=2, and 8e-8 in the
    third loss with this image's packages, bit-equal with an earlier one's)."""
    _, plain = _losses(alpaca_pretrain_data, tmp_path, "plain", *layout)
    assert len(plain) == 6
    for i, flags in enumerate(exact + near):
        out, got = _losses(alpaca_pretrain_data, tmp_path, f"recompute{i}", *layout, *flags)
        assert "; recompute " in out
        if flags in exact:
            assert got == plain, (flags, got, plain)
        else:
            assert got[0][0] == plain[0][0], (flags, got, plain)  # the first forward is the same computation
            assert all(abs(a - b) <= 1e-6 * b for x, y in zip(got, plain) for a, b in zip(x, y)), (flags, got, plain)


# one layer's shape for the saved-bytes arithmetic: GQA with K and V at half Q's width
S, B, H, F, A, G = 128, 2, 256, 704, 8, 4


def _saved_bytes(num_layers: int, **recompute) -> int:
    """The bytes of the non-parameter tensors autograd holds once a TransformerBlock's forward is
    done (each storage once, at its size then: CheckpointWithoutOutput frees an output it will
    recompute)."""
    import dataclasses

    import torch

    from recipes.model import llama2

    shape = dataclasses.replace(llama2.shape("llama2-tiny"), num_layers=num_layers, hidden_size=H,
                                ffn_hidden_size=F, num_attention_heads=A, num_query_groups=G)
    torch.manual_seed(0)
    model = llama2.build_model(shape, vocab_size=512, seq_length=S, **recompute)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept = {}  # by the storage itself (held here, so no other takes its place), not its address: a freed
    # output's memory is reused by the next allocation

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            kept.setdefault(storage._cdata, storage)
        return t

    x = torch.randn(S, B, H, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model.decoder(x, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(S))
    held = sum(s.nbytes() for s in kept.values())
    y.sum().backward()  # the recomputation runs
    return held


def test_saved_bytes_per_layer_fall_as_the_arithmetic_says(single_process_group):
    """Per layer (a 2-layer block less a 1-layer one: the RoPE table and the final norm cancel),
    fp32, TP=1, in units of s*b*h floats, with kv = G/A (K's and V's width against Q's) and
    f = F/H (docs/memory.md):
      none:      9 + 3kv + 3f + (2 + A)/H   each RMSNorm keeps its input, x*rstd and its output
                 (3, + rstd 1/H); attention the QKV GEMM's output (1 + 2kv), Q and K after RoPE
                 (1 + kv), the flash kernel's output (1; linear_proj reads a view of it) and its
                 log-sum-exp (A/H); the MLP fc1's output (2f) and SwiGLU's (f)
      full:      1                          the layer's input, all the checkpoint keeps
      mlp:       none - 3f                  fc1's and SwiGLU's outputs
      layernorm: none - (4 + 2/H)           each norm's x*rstd, output and rstd
      core_attn: none - A/H + 4 bytes       only the log-sum-exp (and the checkpoint keeps the
                                            mask type as a one-int tensor): flash attention keeps
                                            no [s, s] scores, which is what Megatron-LM's default
                                            selective module was made to drop
    Exact: the bytes are counted, not sampled."""
    unit = S * B * H * 4
    kv, f = G / A, F / H
    none = 9 + 3 * kv + 3 * f + (2 + A) / H
    want = {
        "none": ({}, none),
        "full": ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}, 1),
        "mlp": ({"recompute_granularity": "selective", "recompute_modules": ["mlp"]}, none - 3 * f),
        "layernorm": ({"recompute_granularity": "selective", "recompute_modules": ["layernorm"]}, none - 4 - 2 / H),
        "core_attn": ({"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
                      none - A / H + 4 / unit),
    }
    got = {name: (_saved_bytes(2, **kw) - _saved_bytes(1, **kw)) / unit for name, (kw, _) in want.items()}
    print({name: round(v, 4) for name, v in got.items()})
    assert got == {name: units for name, (_, units) in want.items()}, got
