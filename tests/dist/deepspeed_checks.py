"""The DeepSpeed engine's references, for tests/test_deepspeed.py.

    deepspeed_checks.py reference OUT.json -- PRETRAIN_ARGS   one process: a plain torch AdamW loop, its
        own loss, parameter groups and lr schedule, over the same model init and data; losses
    deepspeed_checks.py grads OUT.pt -- PRETRAIN_ARGS         under torchrun: the DeepSpeed engine's
        gradients after one global batch (ZeRO 0), every parameter, saved by rank 0
    deepspeed_checks.py trained_logits OUT.pt -- PRETRAIN_ARGS   under torchrun: train with the DeepSpeed
        engine, then the trained engine's logits on fixed tokens, saved by rank 0
"""

import json
import sys

import torch
import torch.distributed as dist

from recipes.model import llama2, parallel
from recipes.train import pretrain, run_settings, training
from recipes.train.deepspeed_engine import DeepSpeedEngine, _loss

what, out = sys.argv[1], sys.argv[2]
argv = sys.argv[sys.argv.index("--") + 1:]
TOKENS = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(7))


def settings(world=None):
    return run_settings.resolve(pretrain.build_parser().parse_args(argv), world=world)


if what == "reference":
    # Built from plain torch and megatron only: none of the engine's loss, parameter grouping,
    # optimizer settings or scheduler.  Its hyperparameters are read here from the flags the
    # test passes (OPTIM in tests/test_deepspeed.py), not through the recipe's settings.
    import argparse
    import math

    import torch.nn.functional as F

    p = argparse.ArgumentParser()
    for flag in ("--lr", "--min-lr", "--weight-decay", "--clip-grad", "--adam-beta1", "--adam-beta2", "--adam-eps"):
        p.add_argument(flag, type=float, required=True)
    p.add_argument("--lr-warmup-iters", type=int, required=True)
    p.add_argument("--lr-decay-style", choices=["cosine"], required=True)
    p.add_argument("--train-iters", type=int, required=True)
    hp, _ = p.parse_known_args(argv)
    s = settings(world=1)  # the model's shape, the data and the batch sizes: what the engine is fed
    parallel.init_distributed(1, 1, seed=s.seed)
    config = llama2.transformer_config(s.shape, hidden_dropout=s.hidden_dropout, attention_dropout=s.attention_dropout)
    model = llama2.build_model(s.shape, config=config, vocab_size=s.padded_vocab)
    params = [q for q in model.parameters() if q.requires_grad]
    # Megatron-LM's rule: weight decay on matrices; none on biases and norms (every 1-D tensor)
    opt = torch.optim.AdamW([{"params": [q for q in params if q.dim() > 1], "weight_decay": hp.weight_decay},
                             {"params": [q for q in params if q.dim() == 1], "weight_decay": 0.0}],
                            lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps)

    def lr_at(done: int) -> float:
        """Megatron-LM's schedule after ``done`` iterations: linear warm-up from 0 (so the first
        iteration steps at lr 0), then cosine from lr to min-lr over the rest of the run."""
        if done <= hp.lr_warmup_iters:
            return hp.lr * done / hp.lr_warmup_iters
        ratio = (done - hp.lr_warmup_iters) / (hp.train_iters - hp.lr_warmup_iters)
        return hp.min_lr + (hp.lr - hp.min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1.0)

    data, _ = training.build_data(s, 0, 1, 0, 1)
    losses = []
    for it in range(hp.train_iters):
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        opt.zero_grad()
        nmb = s.batches.global_batch // s.batches.micro
        step = []
        for _ in range(nmb):
            batch = next(data)
            tokens, labels = batch["tokens"], batch["labels"]
            pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            logits = model(tokens, pos, None)  # no labels: megatron returns [b, s, vocab] logits
            mask = batch.get("loss_mask")
            mask = torch.ones_like(labels, dtype=torch.float) if mask is None else mask.float()
            per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            loss = (per_token * mask.reshape(-1)).sum() / mask.sum()
            (loss / nmb).backward()
            step.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, hp.clip_grad)
        opt.step()
        losses.append(sum(step) / nmb)
    json.dump(losses, open(out, "w"))
    parallel.destroy()
elif what == "grads":
    engine = DeepSpeedEngine(settings())
    engine.setup()
    engine.resume()
    for _ in range(engine.s.batches.num_microbatches):
        loss = _loss(engine.engine, next(engine.data))
        engine.engine.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in engine.engine.module.named_parameters() if p.grad is not None}
    if dist.get_rank() == 0:
        torch.save(grads, out)
elif what == "trained_logits":
    engine = DeepSpeedEngine(settings())
    engine.setup()
    engine.resume()
    engine.train()
    engine.engine.eval()
    pos = torch.arange(TOKENS.shape[1]).unsqueeze(0).expand_as(TOKENS)
    with torch.no_grad():
        logits = engine.engine(TOKENS, pos, None)
    if dist.get_rank() == 0:
        torch.save({"tokens": TOKENS, "logits": logits.float()}, out)
