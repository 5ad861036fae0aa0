"""Text generation from a Megatron checkpoint at any TP/PP: greedy, sampling, beam search,
and an interactive chat in the LLaMA-2 chat template.

    torchrun --nproc-per-node 2 -m recipes.generate --load ./llama2-7b-tp8pp1 \\
        --tokenizer-name-or-path ./llama-2-7b-hf --max-new-tokens 256 \\
        [--prompt "how are you?" ... | --interactive] \\
        [--greedy | --temperature 0.7 --top-k 50 --top-p 0.95 --seed 42] \\
        [--num-beams 4 [--do-sample]] [--num-return-sequences N] [--return-log-probs]

Mode: greedy unless ``--do-sample`` or a sampling flag (temperature / top-k / top-p) is given
(``--greedy`` forces greedy).  Prompts get BOS prepended, as HF tokenizers do.  In the chat,
``q``/``quit``/``exit`` quits, ``clear`` clears the screen and starts a new conversation
(``new`` only the latter).  When a turn would not fit the model's positions, the oldest
turns are dropped (the system prompt stays), with a notice.  Ctrl-C during a reply stops it
and keeps the conversation; Ctrl-C at the prompt quits.  Under torchrun rank 0 reads the
terminal and the other ranks follow; torchrun, not the ranks, receives the terminal's Ctrl-C
and stops every rank (each exits quietly).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from recipes.errors import ArgumentParser, BadInput
from recipes.model import parallel
from recipes.infer import decoding, dynamic, inference, settings

QUIT_WORDS = {"q", "quit", "exit"}
CLEAR_WORDS = {"clear", "new"}
CLEAR_SCREEN = "\033[H\033[2J"


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    inference.add_checkpoint_flags(p)
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=None, help="repeat for a batch of prompts (default: BOS alone)")
    g.add_argument("--prompt-file", default=None, help="one prompt per line")
    g.add_argument("--interactive", action="store_true", help="chat in the LLaMA-2-chat template")
    g.add_argument("--system-prompt", default=None, help="chat: the <<SYS>> block of the first turn")
    g.add_argument("--show-prompt", action="store_true", help="chat: print the full templated prompt each turn")
    g.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    g.add_argument("--greedy", action="store_true", help="argmax even if sampling flags are given")
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy unless a sampling flag is given)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (default: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (default 1: off)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length**this (default 1.0)")
    g.add_argument("--early-stopping", default="false", choices=("true", "false", "never"),
                   help="beam search stopping rule, as HF generate's (default false)")
    g.add_argument("--num-return-sequences", type=int, default=1, help="outputs per prompt (default 1)")
    g.add_argument("--return-log-probs", action="store_true", help="print and save each token's log-probability")
    g.add_argument("--output-json", default=None, help="write prompts, outputs (and log-probs) here")
    g.add_argument("--engine", choices=("auto", "static", "dynamic"), default="auto",
                   help="dynamic: megatron-core's dynamic engine (MegatronLLM: mixed prompt lengths prefill together; "
                        "megatron-core 0.19+, TP only, one sequence per prompt, no beams; on the NPU a 16-bit model); "
                        "static: this recipe's batch decoding (beam search, PP, --interactive, --compile-decode); "
                        "auto (default): dynamic where it can run, else static")
    g.add_argument("--compile-decode", action="store_true",
                   help="run the cached decode step through torch.compile (TP=1, CPU/CUDA): it compiles once per "
                        "batch size, then steps faster; pays off over long generations")
    return p


def chat_tokens(tokenizer, history, user: str, system: Optional[str]) -> List[int]:
    """LLaMA-2-chat: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s> per turn."""
    ids: List[int] = []
    turns = history + [(user, None)]
    for i, (u, a) in enumerate(turns):
        if i == 0 and system:
            u = f"<<SYS>>\n{system}\n<</SYS>>\n\n{u}"
        ids += [tokenizer.bos_id] + tokenizer.encode(f"[INST] {u.strip()} [/INST]")
        if a is not None:
            ids += tokenizer.encode(f" {a.strip()} ") + [tokenizer.eos_id]
    return ids


class Streamer:
    """Prints a sequence's text as its tokens arrive (decoding the whole tail keeps
    sentencepiece's spaces right)."""

    def __init__(self, tokenizer, enabled: bool):
        self.tok, self.enabled, self.ids, self.printed = tokenizer, enabled, [], ""

    def __call__(self, _row: int, token: int):
        if token == self.tok.eos_id:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if self.enabled and text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def continuation(tokenizer, prompt_ids, tokens) -> str:
    """The generated text as it continues the prompt (sentencepiece drops a leading space
    when a piece is decoded on its own, so decode prompt + output and cut the prompt off)."""
    body = [t for t in prompt_ids if t != tokenizer.bos_id]
    out = [t for t in tokens if t != tokenizer.eos_id]
    full, head = tokenizer.decode(body + out), tokenizer.decode(body)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(out)


def fit_turn(tokenizer, history, user: str, system: Optional[str], positions: int, max_new_tokens: int):
    """(prompt ids, new-token budget, turns dropped): the oldest turns go first; a single turn
    that still does not fit gets the positions left (None when none are)."""
    dropped = 0
    ids = chat_tokens(tokenizer, history, user, system)
    while len(ids) + max_new_tokens > positions and dropped < len(history):
        dropped += 1
        ids = chat_tokens(tokenizer, history[dropped:], user, system)
    budget = min(max_new_tokens, positions - len(ids))
    return ids, (budget if budget > 0 else None), dropped


def _broadcast_text(text: Optional[str]) -> Optional[str]:
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_generation(lm, tokenizer, d: settings.Decoding, prompts_ids, on_token=None,
                   max_new_tokens: Optional[int] = None):
    params = d.sampling
    max_new = d.max_new_tokens if max_new_tokens is None else max_new_tokens
    gen = torch.Generator().manual_seed(d.seed)
    eos = tokenizer.eos_id
    if d.num_beams > 1:
        return [decoding.beam_search(lm, ids, max_new, d.num_beams, eos, d.length_penalty, d.early_stopping,
                                     d.do_sample, None if params.greedy else params, d.num_return_sequences, gen)
                for ids in prompts_ids]
    if d.num_return_sequences > 1:
        if params.greedy:
            raise BadInput("--num-return-sequences > 1 needs sampling or --num-beams")
        prompts_ids = [ids for ids in prompts_ids for _ in range(d.num_return_sequences)]
    out = decoding.generate(lm, prompts_ids, max_new, params, eos, gen, on_token, log_probs=d.return_log_probs)
    n = d.num_return_sequences
    return [out[i:i + n] for i in range(0, len(out), n)]


def _read_prompt(rank: int, alone: bool) -> Optional[str]:
    if rank != 0:
        return None
    try:
        return input("\nYou: ")
    except EOFError:
        return "quit"
    except KeyboardInterrupt:  # Ctrl-C at the prompt: quit (single process; under torchrun it stops all)
        print(flush=True)
        return "quit"


def interactive(lm, tokenizer, s: settings.Generate, rank: int):
    history = []
    alone = dist.get_world_size() == 1
    if rank == 0:
        print("chat: q/quit/exit to quit, clear to clear the screen and start over, new for a new conversation"
              + ("; Ctrl-C stops a reply" if alone else ""), flush=True)
    while True:
        text = _broadcast_text(_read_prompt(rank, alone)).strip()
        if text.lower() in QUIT_WORDS:
            break
        if text.lower() in CLEAR_WORDS:
            history = []
            if rank == 0:
                if text.lower() == "clear" and sys.stdout.isatty():
                    sys.stdout.write(CLEAR_SCREEN)
                print("(new conversation)", flush=True)
            continue
        if not text:
            continue
        ids, budget, dropped = fit_turn(tokenizer, history, text, s.system_prompt, lm.shape.seq_length,
                                        s.decoding.max_new_tokens)
        if rank == 0 and dropped:
            print(f"(dropped the oldest {dropped} turn{'s' * (dropped > 1)} to fit the model's "
                  f"{lm.shape.seq_length} positions)", flush=True)
        if budget is None:
            if rank == 0:
                print(f"(that message is {len(ids)} tokens, the model holds {lm.shape.seq_length}: shorten it)",
                      flush=True)
            continue
        history = history[dropped:]
        if rank == 0 and budget < s.decoding.max_new_tokens:
            print(f"(this reply gets at most {budget} tokens: the model's positions are nearly full)", flush=True)
        if rank == 0 and s.show_prompt:
            print(f"[prompt, {len(ids)} tokens] {tokenizer.decode(ids)!r}", flush=True)
        t0 = time.time()
        streamer = Streamer(tokenizer, rank == 0)
        try:  # from the reply's first character: a Ctrl-C once "Assistant: " shows stops the reply
            if rank == 0:
                sys.stdout.write("Assistant: ")
                sys.stdout.flush()
            out = run_generation(lm, tokenizer, s.decoding, [ids],
                                 on_token=streamer if s.decoding.num_beams == 1 else None, max_new_tokens=budget)[0][0]
            tokens = out.tokens
        except KeyboardInterrupt:
            if not alone:
                raise
            tokens = streamer.ids  # what was shown; the conversation keeps it
            print("\n(reply stopped)", end="", flush=True)
        answer = tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])
        if rank == 0:
            if s.decoding.num_beams > 1:
                sys.stdout.write(answer)
            print(f"\n[{len(tokens)} tokens in {time.time() - t0:.2f} s]", flush=True)
        history.append((text, answer))


def _enable_compiled_decode(lm) -> None:
    import ascend_patches

    why_not = ascend_patches.compiled_decode_unavailable(lm.model)
    if why_not:
        raise BadInput(f"--compile-decode: {why_not}")
    ascend_patches.configure(compile_decode=True)


def choose_engine(s: settings.Generate, lm) -> str:
    """"dynamic" or "static" for the flags given (``--engine``), refused in one line where the
    asked-for engine cannot run them."""
    from ascend_patches.versions import megatron_core_matches

    import ascend_patches

    d = s.decoding
    why_not = []
    if not megatron_core_matches(dynamic.SERVED):
        why_not.append("megatron-core 0.19 or later")
    if d.num_beams > 1:
        why_not.append("no --num-beams (beam search runs on the static path)")
    if d.num_return_sequences > 1:
        why_not.append("one sequence per prompt (--num-return-sequences 1)")
    if s.interactive:
        why_not.append("no --interactive")
    if s.compile_decode:
        why_not.append("no --compile-decode")
    if s.checkpoint.pp > 1:
        why_not.append("no pipeline stages")
    if not d.sampling.greedy and d.sampling.top_k > 0 and d.sampling.top_p < 1.0:
        why_not.append("--top-k or --top-p, not both (megatron's sampler takes one)")
    if ascend_patches.settings().backend == "npu" and lm.dtype not in (torch.float16, torch.bfloat16):
        why_not.append("on the NPU a 16-bit model (--params-dtype bf16)")
    if s.engine == "dynamic" and why_not:
        raise BadInput("--engine dynamic needs " + "; ".join(why_not))
    if s.engine == "static" or why_not:
        return "static"
    return "dynamic"


def dynamic_generation(lm, tokenizer, d: settings.Decoding, prompts_ids):
    """The prompts through megatron-core's dynamic engine (``MegatronLLM``, direct mode, every
    rank in lockstep), sized to hold them all at full length: ``run_generation``'s results.  A
    sampled run is seeded with ``--seed`` (megatron's ``inference_sampling_seed``, which seeds its
    sampler's generator): the same seed repeats it.  With prompts of several lengths it draws in
    another order than the static path, so its tokens differ from that path's."""
    from megatron.core.inference.apis import SamplingParams

    from megatron.core import parallel_state as ps

    longest = max(len(p) for p in prompts_ids) + d.max_new_tokens
    if longest > lm.shape.seq_length:
        raise BadInput(f"a prompt and --max-new-tokens {d.max_new_tokens} need {longest} positions; the model has "
                       f"{lm.shape.seq_length}")
    n = len(prompts_ids)
    tp = ps.get_tensor_model_parallel_world_size()
    block = dynamic.default_block_size()
    blocks = n * -(-longest // block) + 1  # each request at full length, and megatron's dummy block
    slots = -(-min(n, 64) // tp) * tp  # megatron's context takes a multiple of the TP size
    engine = dynamic.EngineSettings(max_requests=slots, block_size_tokens=block,
                                    buffer_size_gb=blocks * block * dynamic.kv_bytes_per_token(lm.shape, lm.dtype, tp)
                                    / 2 ** 30, max_sequence_length=longest)
    lm.model.config.inference_sampling_seed = d.seed  # megatron's controller seeds its sampler from it
    llm = dynamic.build_llm(lm.model, tokenizer, engine)
    sp = d.sampling
    params = SamplingParams(num_tokens_to_generate=d.max_new_tokens, termination_id=tokenizer.eos_id,
                            return_log_probs=d.return_log_probs, skip_prompt_log_probs=True,
                            **({"top_k": 1} if sp.greedy else {"temperature": sp.temperature, "top_k": sp.top_k,
                                                                "top_p": 0.0 if sp.top_p >= 1.0 else sp.top_p}))
    out = []
    for r in llm.generate([list(p) for p in prompts_ids], params):
        tokens = [int(t) for t in r.generated_tokens]
        log_probs = [float(x) for x in (r.generated_log_probs or [])] if d.return_log_probs else []
        out.append([decoding.Generated(tokens, log_probs)])
    return out


def _records(log_probs: bool, tokenizer, prompts, prompts_ids, results, rank: int) -> List[dict]:
    records = []
    for prompt, ids, group in zip(prompts, prompts_ids, results):
        for g in group:
            text = continuation(tokenizer, ids, g.tokens)
            rec = {"prompt": prompt, "text": text, "tokens": g.tokens}
            if log_probs:
                rec["log_probs"] = g.log_probs
            if g.score is not None:
                rec["score"] = g.score
            records.append(rec)
            if rank == 0:
                print(f"\n=== prompt: {prompt!r}\n{prompt}{text}", flush=True)
                if log_probs:
                    print(f"log-probs: {[round(x, 4) for x in g.log_probs]}", flush=True)
    return records


def main(argv=None):
    s = settings.generate(build_parser().parse_args(argv))
    lm, tokenizer = inference.open_checkpoint(s.checkpoint)
    if s.compile_decode:
        _enable_compiled_decode(lm)
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    if rank == 0:
        print(f"loaded {s.checkpoint.load}: {lm.shape.num_layers} layers, TP={ps.get_tensor_model_parallel_world_size()} "
              f"PP={ps.get_pipeline_model_parallel_world_size()}, {lm.dtype}", flush=True)
    if s.interactive:
        try:
            interactive(lm, tokenizer, s, rank)
        except KeyboardInterrupt:
            if dist.get_world_size() == 1:  # Ctrl-C between a reply and the prompt: quit, as at the prompt
                print(flush=True)
            else:  # under torchrun its Ctrl-C reaches every rank: leave without a traceback
                if rank == 0:
                    print("\n(interrupted)", flush=True)
                sys.stdout.flush()
                os._exit(130)
        parallel.destroy()
        return None
    prompts = list(s.prompts)
    bos = [tokenizer.bos_id] if s.bos else []
    prompts_ids = [bos + tokenizer.encode(p) for p in prompts]
    engine = choose_engine(s, lm)
    if rank == 0:
        print(f"engine: {engine}" + (" (megatron-core's MegatronLLM)" if engine == "dynamic" else ""), flush=True)
    t0 = time.time()
    if engine == "dynamic":
        results = dynamic_generation(lm, tokenizer, s.decoding, prompts_ids)
    else:
        results = run_generation(lm, tokenizer, s.decoding, prompts_ids)
    elapsed = time.time() - t0
    records = _records(s.decoding.return_log_probs, tokenizer, prompts, prompts_ids, results, rank)
    if rank == 0:
        n_tokens = sum(len(r["tokens"]) for r in records)
        print(f"\n{n_tokens} tokens in {elapsed:.2f} s ({n_tokens / max(elapsed, 1e-9):.1f} tokens/s)", flush=True)
        if s.output_json:
            with open(s.output_json, "w") as f:
                json.dump(records, f, indent=1)
    parallel.destroy()
    return records


if __name__ == "__main__":
    main()
