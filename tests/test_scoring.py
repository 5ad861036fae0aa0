"""recipes.evaluate's scoring (one context's work once: nested continuations off one forward,
diverging ones as KV-cached branches of a left-padded prefill) against the plain rule it
replaces: each request alone, one forward over its window, log-softmax, the continuation's
log-probs summed.  fp32 on a random model; agreement to 2e-5 (the same math in different
batch shapes and padding, so only summation order differs)."""

import random

import pytest
import torch

from recipes.model import llama2
from recipes.infer import evaluate, inference

SHAPE = llama2.LlamaShape(2, 64, 160, 8, 4, vocab_size=97, seq_length=48)


@pytest.fixture(scope="module")
def lm():
    from tests.conftest import free_port
    import os

    os.environ["MASTER_PORT"] = str(free_port())
    from recipes.model import parallel

    parallel.init_distributed(tp=1, pp=1)
    torch.manual_seed(0)
    model = llama2.build_model(SHAPE).eval()
    for p in model.parameters():  # a spread of logits, so ties cannot hide a wrong position
        p.data.normal_(0, 0.2)
    yield inference.Loaded(model, SHAPE, SHAPE.vocab_size, SHAPE.vocab_size, torch.float32, {})
    parallel.destroy()


def reference(lm, requests, max_len):
    out = []
    for ctx, cont in requests:
        whole = (ctx + cont)[-(max_len + 1):]
        logp = torch.log_softmax(inference.full_logits(lm, torch.tensor([whole[:-1]])), -1)[0]
        tail = logp[len(whole) - 1 - len(cont):]
        out.append(float(tail.gather(1, torch.tensor(cont)[:, None]).sum()))
    return out


def requests_of_every_kind():
    rng = random.Random(0)

    def toks(n):
        return [rng.randrange(1, SHAPE.vocab_size) for _ in range(n)]

    reqs = []
    for n in (5, 9, 17, 30):  # nested: one-token answers, and " B" beside " " + "A"
        ctx = toks(n)
        reqs += [(ctx, [11]), (ctx, [12]), (ctx, [7, 13]), (ctx, [7, 14])]
    for n in (3, 8, 8, 21, 40):  # diverging after the first token, of different lengths
        ctx = toks(n)
        reqs += [(ctx, [20, 21]), (ctx, [30, 31, 32]), (ctx, [40])]
    for n in (6, 12):  # one token per branch: the fused one-token decode step where nothing is padded
        ctx = toks(n)
        reqs += [(ctx, [20, 21]), (ctx, [30, 31])]
    long_ctx = toks(70)  # past the window: the last max_len + 1 tokens are kept
    reqs += [(long_ctx, [50, 51]), (long_ctx, [60, 61])]
    return reqs


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_scores_match_one_forward_per_request(lm, batch):
    reqs = requests_of_every_kind()
    ours = evaluate.score(lm, reqs, SHAPE.seq_length, batch)
    theirs = reference(lm, reqs, SHAPE.seq_length)
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    assert worst < 2e-5, worst


def test_each_context_runs_once(lm, monkeypatch):
    """4 nested groups -> one forward each at batch 1; 8 diverging groups (the long one
    included) -> a prefill and a branch step each."""
    calls = []
    real = inference.forward

    def counted(lm_, tokens, *a, **k):
        calls.append(tuple(tokens.shape))
        return real(lm_, tokens, *a, **k)

    monkeypatch.setattr(inference, "forward", counted)
    evaluate.score(lm, requests_of_every_kind(), SHAPE.seq_length, 1)
    assert len(calls) == 4 + 2 * 8, calls


def test_padded_prefill_equals_unpadded(lm):
    """The same diverging group scored alone and beside a longer one (so left-padded)."""
    short = [([5, 6, 7], [20, 21]), ([5, 6, 7], [30, 31])]
    longer = [(list(range(1, 30)), [20, 21]), (list(range(1, 30)), [30, 31])]
    alone = evaluate.score(lm, short, SHAPE.seq_length, 8)
    beside = evaluate.score(lm, longer + short, SHAPE.seq_length, 8)[2:]
    assert max(abs(a - b) for a, b in zip(alone, beside)) < 2e-5
