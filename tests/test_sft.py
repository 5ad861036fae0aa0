"""Full fine-tuning (SFT) from a converted checkpoint: only response tokens train."""

import json

import pytest
import torch

from tests.helpers.launch import run_torchrun

pytestmark = pytest.mark.slow  # multi-process runs


@pytest.fixture
def sft(stories_sft):
    return stories_sft


def test_full_finetune_from_converted_checkpoint(sft, tmp_path):
    """A release checkpoint from the converter loads as weights only; the response loss falls."""
    out = run_torchrun("recipes.pretrain", "--load", sft / "base", "--data-path", sft / "sft",
                       "--is-instruction-dataset", "--train-iters", 10, "--seq-length", 256, "--micro-batch-size", 4,
                       "--global-batch-size", 8, "--lr", "1e-3", "--save", tmp_path / "ckpt",
                       "--eval-interval", 10, "--eval-iters", 2, nproc=1)
    assert f"loaded {sft / 'base'} (iteration 0) weights only" in out  # a release: no optimizer state
    recs = [json.loads(l) for l in open(tmp_path / "ckpt" / "metrics.jsonl")]
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3 and "val_loss" in recs[-1]
    assert (tmp_path / "ckpt" / "iter_0000010").is_dir()


def test_prompt_tokens_contribute_nothing(sft, single_process_group):
    """Changing what the prompt positions would predict changes neither the loss nor any
    gradient (bit for bit); changing one response target does."""
    from recipes.infer import inference
    from recipes.train import training
    from recipes.data.datasets import InstructionDataset

    lm = inference.load(sft / "base", 1, 1)
    model = lm.model
    model.train()
    ds = InstructionDataset(str(sft / "sft"), 256, 2)
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("tokens", "labels", "loss_mask")}
    mask = batch["loss_mask"]
    assert 0 < mask.sum() < mask.numel() and (mask[:, :5] == 0).all()  # prompts first, then responses

    def loss_and_grads(labels):
        model.zero_grad()
        pos = torch.arange(256).unsqueeze(0).expand(4, 256)
        out = model(batch["tokens"], pos, None, labels=labels)
        loss, _ = training.lm_loss(out, mask)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss0, g0 = loss_and_grads(batch["labels"])
    prompt_changed = batch["labels"].clone()
    gen = torch.Generator().manual_seed(0)
    prompt_changed[mask == 0] = torch.randint(3, 512, (int((mask == 0).sum()),), generator=gen)
    loss1, g1 = loss_and_grads(prompt_changed)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    response_changed = batch["labels"].clone()
    first_response = (mask[0] == 1).nonzero()[0, 0]
    response_changed[0, first_response] = (response_changed[0, first_response] + 7) % 512
    loss2, _ = loss_and_grads(response_changed)
    assert not torch.equal(loss0, loss2)
    # a microbatch with no response token at all gives loss 0, never NaN
    zero, _ = training.lm_loss(torch.ones(2, 8), torch.zeros(2, 8))
    assert zero.item() == 0.0
