"""The DeepSpeed engine's references, for tests/test_deepspeed.py.

    deepspeed_checks.py reference OUT.json -- PRETRAIN_ARGS   one process: a plain torch AdamW loop over
        the same model init, data, schedule and clipping as recipes.pretrain with these flags; losses
    deepspeed_checks.py grads OUT.pt -- PRETRAIN_ARGS         under torchrun: the DeepSpeed engine's
        gradients after one global batch (ZeRO 0), every parameter, saved by rank 0
    deepspeed_checks.py trained_logits OUT.pt -- PRETRAIN_ARGS   under torchrun: train with the DeepSpeed
        engine, then the trained engine's logits on fixed tokens, saved by rank 0
"""

import json
import sys

import torch
import torch.distributed as dist

from recipes import llama2, parallel
from recipes.train import pretrain, run_settings, training
from recipes.train.deepspeed_engine import DeepSpeedEngine, _loss, param_groups

what, out = sys.argv[1], sys.argv[2]
argv = sys.argv[sys.argv.index("--") + 1:]
TOKENS = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(7))


def settings(world=None):
    return run_settings.resolve(pretrain.build_parser().parse_args(argv), world=world)


if what == "reference":
    s = settings(world=1)
    parallel.init_distributed(1, 1, seed=s.seed)
    config = llama2.transformer_config(s.shape, hidden_dropout=s.hidden_dropout, attention_dropout=s.attention_dropout)
    model = llama2.build_model(s.shape, config=config, vocab_size=s.padded_vocab)
    o = s.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    sched = training.build_scheduler(opt, o, s.train_iters, s.batches.global_batch)
    data, _ = training.build_data(s, 0, 1, 0, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for it in range(s.train_iters):
        opt.zero_grad()
        nmb = s.batches.global_batch // s.batches.micro
        step = []
        for _ in range(nmb):
            loss = _loss(model, next(data))
            (loss / nmb).backward()
            step.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
        opt.step()
        sched.step(increment=s.batches.global_batch)
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
