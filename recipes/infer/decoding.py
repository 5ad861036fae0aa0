"""KV-cached decoding on a Megatron GPTModel: greedy, sampling, beam search (with or without
sampling).  Megatron-Core keeps K/V in ``StaticInferenceContext``; the search logic is ours
because megatron-core no longer ships beam search.

Beam search follows HuggingFace ``generate``'s definition so the two agree token for token:
the top 2 x beams candidates each step; a candidate ending in EOS (or at the length limit)
among the top ``num_beams`` is finished with score sum-logprob / generated_len**length_penalty;
the search stops when no running beam can beat the worst kept finished one (or, with
``early_stopping=True``, once ``num_beams`` are finished).

Prompts of different lengths share one cache without padding: the batch is prefilled up to
the shortest prompt, and longer prompts' remaining tokens are fed (forced) one step at a
time, so every sequence sees exactly its own tokens at their own positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

import ascend_patches

from recipes.errors import BadInput
from recipes.infer import inference


@dataclass
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k, then top-p (HF's order and definitions); removed -> -inf."""
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cum <= (1 - self.top_p)
            remove[..., -1] = False  # keep at least the most likely token
            scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
        return scores


@dataclass
class Generated:
    tokens: List[int]                      # generated tokens only (prompt excluded)
    log_probs: List[float] = field(default_factory=list)  # model log-prob of each generated token
    score: Optional[float] = None          # beam score (length-penalised)


class Session:
    """One KV cache for a batch; every rank calls ``feed`` in lockstep."""

    def __init__(self, lm: inference.Loaded, batch: int, max_len: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        if max_len > lm.shape.seq_length:
            raise BadInput(f"prompt + new tokens = {max_len} exceeds the model's {lm.shape.seq_length} positions")
        self.lm, self.batch = lm, batch
        self.ctx = StaticInferenceContext(batch, max_len)
        self.stage = inference.stage_info()

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [b, s] to the cache (on the accelerator, with the model); return
        next-token logits [b, vocab] (fp32) in host memory, where the decode loop chooses: one
        device-to-host copy per step."""
        b, s = tokens.shape
        offset = self.ctx.sequence_len_offset
        pos = torch.arange(offset, offset + s).unsqueeze(0).expand(b, s)
        logits = inference.forward(self.lm, tokens, pos, self.ctx, self.stage)
        if logits is not None:
            logits = logits[:, -1].contiguous()
        self.ctx.sequence_len_offset += s
        self.ctx.enable_decode_mode()
        return inference.broadcast_from_last_stage(logits, (b, self.lm.vocab_size), torch.float32, self.stage).cpu()

    def reorder(self, index: torch.Tensor):
        self.ctx.swap_key_value_dict(index.to(ascend_patches.device()))  # the KV cache is on the accelerator


def generate(lm, prompts: List[List[int]], max_new_tokens: int, params: SamplingParams, eos_id: Optional[int],
             generator: Optional[torch.Generator] = None,
             on_token: Optional[Callable[[int, int], None]] = None, log_probs: bool = True) -> List[Generated]:
    """Greedy or sampled continuation of each prompt; stops at EOS or ``max_new_tokens``.
    ``log_probs=False`` skips the chosen tokens' log-probs (a log-softmax per step)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BadInput("every prompt needs at least one token (add BOS)")
    lengths = [len(p) for p in prompts]
    b, total = len(prompts), max(lengths) + max_new_tokens
    buf = torch.zeros(b, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = torch.tensor(p)
    out = [Generated([]) for _ in prompts]
    done = [False] * b
    session = Session(lm, b, total)
    pos = min(lengths)
    logits = session.feed(buf[:, :pos])
    while not all(done) and pos < total:
        if params.greedy:
            chosen = logits.argmax(dim=-1)
        else:
            probs = params.warp(logits).softmax(dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        # the chosen tokens' model log-probs, for all rows at once (one pass, then plain Python)
        chosen_lp = ((logits.gather(1, chosen[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)).tolist()
                     if log_probs else None)
        chosen_list = chosen.tolist()
        for i in range(b):
            if done[i] or pos < lengths[i]:
                continue  # finished, or still inside its prompt (forced token already in buf)
            tok = chosen_list[i]
            buf[i, pos] = tok
            out[i].tokens.append(tok)
            if log_probs:
                out[i].log_probs.append(chosen_lp[i])
            if on_token:
                on_token(i, tok)
            if tok == eos_id or len(out[i].tokens) >= max_new_tokens:
                done[i] = True
        pos += 1
        if all(done) or pos >= total:
            break
        logits = session.feed(buf[:, pos - 1:pos])
    return out


def _candidates(acc: torch.Tensor, keep: int, do_sample: bool, generator) -> tuple:
    """The ``keep`` best (or, sampling, drawn) flat beam x token candidates, best first."""
    if not do_sample:
        return torch.topk(acc, keep)
    idx = torch.multinomial(acc.softmax(-1), keep, generator=generator)
    top, order = acc[idx].sort(descending=True)
    return top, idx[order]


def beam_search(lm, prompt: List[int], max_new_tokens: int, num_beams: int, eos_id: Optional[int],
                length_penalty: float = 1.0, early_stopping=False, do_sample: bool = False,
                params: Optional[SamplingParams] = None, num_return_sequences: int = 1,
                generator: Optional[torch.Generator] = None) -> List[Generated]:
    if num_return_sequences > num_beams:
        raise BadInput(f"--num-return-sequences {num_return_sequences} exceeds --num-beams {num_beams}")
    nb, plen = num_beams, len(prompt)
    max_len = plen + max_new_tokens
    keep = max(2, 1 + (eos_id is not None)) * nb
    session = Session(lm, nb, max_len)
    logits = session.feed(torch.tensor([prompt] * nb))
    running = [list() for _ in range(nb)]           # generated tokens per running beam
    running_lp = [list() for _ in range(nb)]        # per-token model log-probs
    running_score = torch.full((nb,), -1e9)
    running_score[0] = 0.0
    finished: List[Generated] = []                  # best nb, sorted by score desc
    heuristic_open = True
    cur = plen
    while True:
        logp = torch.log_softmax(logits, dim=-1)
        scores = logp if params is None else params.warp(logp)
        acc = (scores + running_score[:, None]).reshape(-1)
        vocab = logits.shape[-1]
        top, idx = _candidates(acc, keep, do_sample, generator)
        beams, toks = (idx // vocab).tolist(), (idx % vocab).tolist()
        hits = [t == eos_id or cur + 1 >= max_len for t in toks]
        # finished candidates: only among the top nb, and only while improvement is possible
        full = len(finished) == nb and early_stopping is True
        if heuristic_open and not full:
            for rank in range(nb):
                if hits[rank]:
                    b_, t_ = beams[rank], toks[rank]
                    gen = Generated(running[b_] + [t_], running_lp[b_] + [float(logp[b_, t_])],
                                    float(top[rank]) / ((cur + 1 - plen) ** length_penalty))
                    finished.append(gen)
            finished.sort(key=lambda g: -g.score)
            del finished[nb:]
        # next running beams: the best nb candidates that did not stop
        alive = top + torch.tensor(hits, dtype=torch.float32) * -1e9
        nxt = torch.topk(alive, nb).indices.tolist()
        src = [beams[k] for k in nxt]
        running = [running[beams[k]] + [toks[k]] for k in nxt]
        running_lp = [running_lp[beams[k]] + [float(logp[beams[k], toks[k]])] for k in nxt]
        running_score = alive[nxt]
        cur += 1
        # HF's stopping heuristic (early_stopping False/True: current length; "never": max length)
        best_len = (max_len - plen) if (early_stopping == "never" and length_penalty > 0) else (cur - plen)
        best_possible = float(running_score[0]) / (best_len ** length_penalty)
        worst = min(g.score for g in finished) if len(finished) == nb else -1e9
        heuristic_open = heuristic_open and best_possible > worst
        all_done = len(finished) == nb and early_stopping is True
        if not heuristic_open or all_done or all(hits) or cur >= max_len:
            break
        session.reorder(torch.tensor(src))
        logits = session.feed(torch.tensor([[r[-1]] for r in running]))
    return finished[:num_return_sequences]
