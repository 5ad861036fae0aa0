"""LoRA and full fine-tuning on the real stories260K model (converted to Megatron) with the
Alpaca sample as instruction data.

Checked: loss falls; every frozen base tensor is bit-identical to the base checkpoint's slice
after training (TP=1 and TP=2); checkpoints hold adapters (and modules to save) only; a run
interrupted and resumed with --lora-load repeats the uninterrupted losses exactly (fp32);
the merged model's logits equal base+adapter's within 1e-4 (fp32, W + BA vs Wx + B(Ax)
summation order), and the HF export of the merged model does too in transformers.
"""

import json

import pytest
import torch

from converters import merge_lora
from tests.helpers.launch import run_torchrun

pytestmark = pytest.mark.slow  # multi-process runs


@pytest.fixture
def setup(stories_sft):
    return stories_sft


def _args(root, save, tp, iters=8, extra=()):
    return ["--load", root / "base", "--data-path", root / "sft", "--is-instruction-dataset",
            "--train-iters", iters, "--seq-length", 256, "--tensor-model-parallel-size", tp,
            "--micro-batch-size", 4, "--global-batch-size", 8, "--lr", "5e-3", "--lr-warmup-iters", 1,
            "--lora-target-modules", "query_key_value", "dense", "gate_proj", "up_proj", "down_proj",
            "--lora-r", 8, "--lora-alpha", 16, "--save", save, "--save-interval", 4,
            "--metrics-file", save / "metrics.jsonl", *extra]


def _train(root, save, tp, extra=()):
    out = run_torchrun("lora_checks.py", "train", root / "base", "--", *_args(root, save, tp, extra=extra), nproc=tp)
    results = [json.loads(l.split(" ", 1)[1]) for l in out.splitlines() if l.startswith("RESULT")]
    assert len(results) == tp
    return results


def _losses(path):
    return [json.loads(l)["loss"] for l in open(path)]


def _adapter_keys(ckpt_iter):
    keys = set()
    for f in ckpt_iter.glob("adapter_mp_rank_*.pt"):
        keys |= set(torch.load(f, weights_only=False)["adapters"])
    return keys


def _merged_check(setup, lora_dir, tp, tmp):
    merged = tmp / "merged"
    merge_lora.main(["--base", str(setup / "base"), "--lora", str(lora_dir), "--output-model-dir", str(merged)])
    out = run_torchrun("lora_checks.py", "merged", tp, setup / "base", lora_dir, merged, tmp / "adapter_logits.pt",
                       nproc=tp)
    r = json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])
    print(f"TP={tp}: merged vs base+adapter max |logit diff| {r['merged_vs_adapter']:.2e}; "
          f"adapter changes logits by up to {r['adapter_effect']:.2f}")
    assert r["adapter_effect"] > 0.1  # the adapter does something, so the comparison means something
    assert r["merged_vs_adapter"] < 1e-4
    return merged


@pytest.mark.full  # CI time: ~100 s; the demo trains and merges a LoRA by default, test_lora_tp2_* resumes one
def test_lora_tp1_trains_adapters_only_and_merges(setup, tmp_path):
    save = tmp_path / "lora"
    (res,) = _train(setup, save, 1)
    assert res["base_tensors_equal"] == 3 + 5 * 6  # embedding, final norm, output + 6 per layer
    assert res["trainable"] == ["lora_A", "lora_B"] and res["n_trainable"] == 2 * 4 * 5
    losses = _losses(save / "metrics.jsonl")
    assert losses[-1] < losses[0] - 0.3, losses
    keys = _adapter_keys(save / "iter_0000008")
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    assert len(keys) == 40
    merged = _merged_check(setup, save, 1, tmp_path)
    # the HF export of the merged model loads in transformers and gives the same logits
    merge_lora.main(["--base", str(setup / "base"), "--lora", str(save), "--output-model-dir", str(tmp_path / "hf"),
                     "--to-hf"])
    from transformers import LlamaForCausalLM

    ref = torch.load(tmp_path / "adapter_logits.pt")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ref["tokens"]).logits
    err = (got - ref["logits"]).abs().max().item()
    print(f"HF export of the merged model vs base+adapter: max |logit diff| {err:.2e}")
    assert err < 1e-4
    assert merged.exists()


def test_lora_tp2_modules_to_save_and_resume(setup, tmp_path):
    to_save = ("--lora-modules-to-save", "word_embeddings", "lm_head.lm_head")
    full = tmp_path / "full"
    results = _train(setup, full, 2, extra=to_save)
    for r in results:  # each TP rank: every frozen tensor equals its slice of the base
        assert r["base_tensors_equal"] == 1 + 5 * 6
        assert r["trainable"] == ["lora_A", "lora_B", "weight"]
    keys = _adapter_keys(full / "iter_0000008")
    assert "embedding.word_embeddings.weight" in keys and "output_layer.weight" in keys and len(keys) == 42
    # interrupted at 4, resumed from the LoRA checkpoint: the same losses as uninterrupted
    part = tmp_path / "part"
    run_torchrun("recipes.pretrain", *_args(setup, part, 2, extra=(*to_save, "--exit-after-iters", 4)), nproc=2)
    out = run_torchrun("recipes.pretrain", *_args(setup, part, 2, extra=(*to_save, "--lora-load", part)), nproc=2)
    assert "resumed LoRA from" in out and "(iteration 4)" in out
    a, b = _losses(full / "metrics.jsonl"), _losses(part / "metrics.jsonl")
    assert len(a) == len(b) == 8 and a == b, (a, b)
    assert a[-1] < a[0]
    _merged_check(setup, full, 2, tmp_path)
    # resuming at another TP is refused, naming the sizes
    bad = run_torchrun("recipes.pretrain", *_args(setup, tmp_path / "x", 1, extra=(*to_save, "--lora-load", full)),
                       nproc=1, check=False)
    assert bad.returncode != 0 and "was saved at TP=2 PP=1" in bad.stderr


def test_bad_lora_targets_are_named():
    from recipes.model import lora

    with pytest.raises(ValueError, match="--lora-target-modules 'qkv_proj'"):
        lora.resolve_targets(["query_key_value", "qkv_proj"])
    assert lora.resolve_targets(["gate_proj", "up_proj", "dense"]) == ["linear_fc1", "linear_proj"]
    with pytest.raises(ValueError, match="--lora-modules-to-save 'head'"):
        lora.resolve_modules_to_save(["head"])
