"""Run under torchrun: megatron-core's dynamic inference engine (MegatronLLM, direct mode, through
recipes.infer.dynamic) on a converted checkpoint at TP ranks, against HF ``generate``.

    dynamic_engine_checks.py TP LOAD HF_DIR
    dynamic_engine_checks.py TP LOAD - bf16 BLOCK   (the prompts and tokens, in bf16 with BLOCK-token blocks)

Greedy, 40 new tokens, prompts of 1 to 45 tokens, twice: with eos 2 (every request runs its 40
tokens) and with eos 426 ("." in stories260K's vocabulary, so requests finish at different
steps).  2 requests a step (the rest queue) and 16-token KV blocks, so prompts and continuations
cross block boundaries and requests prefill while others decode.  HF runs each prompt alone
(no padding).  Then prefix caching: prompts sharing two whole blocks, twice.  Then the engine under
megatron's coordinator, as recipes.serve runs it.
"""

import dataclasses
import json
import sys
import threading
import time

import torch
import torch.distributed as dist

from recipes.data.tokenizer import load_tokenizer
from recipes.infer import dynamic, inference


def main():
    from ascend_patches.engine_threads import hand_to_engine_thread

    torch.set_num_threads(2)  # a process with two intra-op threads (the tests' torchrun gives each rank one)
    handed = hand_to_engine_thread()  # as recipes.serve does: this thread keeps one from here on
    tp, load, hf_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dtype, block = (torch.bfloat16, int(sys.argv[5])) if len(sys.argv) > 4 else (None, 16)
    lm = inference.load(load, tp, 1, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    lengths = (4, 44, 9, 17, 30) if block < 128 else (4, 100, 9, 130, 30)  # across a block either way
    prompts = [[1]] + [[1] + torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    settings = dynamic.EngineSettings(max_requests=2, block_size_tokens=block, buffer_size_gb=0.02,
                                      max_sequence_length=256)
    llm = dynamic.build_llm(lm.model, load_tokenizer(lm.args["tokenizer_name_or_path"]), settings)
    if dtype is not None:
        rows = [{"eos": eos, "prompts": prompts, "tokens": dynamic.greedy(llm, prompts, 40, eos_id=eos)}
                for eos in (2, 426)]
        if dist.get_rank() == 0:
            sys.stdout.write("RESULT " + json.dumps(rows) + "\n")
        return
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows = []
    for eos in (2, 426):
        ours = dynamic.greedy(llm, prompts, 40, eos_id=eos)
        for p, o in zip(prompts, ours):
            ids = torch.tensor([p])
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                 num_beams=1, eos_token_id=eos, pad_token_id=0)[0, len(p):].tolist()
            rows.append({"eos": eos, "prompt_len": len(p), "equal": o == theirs, "n": len(o), "ours": o, "hf": theirs})
    # prefix caching (LRU: blocks kept after their requests finish): prompts sharing a 41-token prefix (two
    # whole 16-token blocks), run twice; the second pass takes the prefix from the cache, so fewer tokens go
    # through the embedding (measured: 250 on the first pass, 188 on the second), and the tokens stay HF's
    shared = [1] + torch.randint(3, 512, (40,), generator=g).tolist()
    cached = [shared + torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 20, 7)]
    del llm
    llm = dynamic.build_llm(lm.model, load_tokenizer(lm.args["tokenizer_name_or_path"]),
                            dataclasses.replace(settings, prefix_caching=True, prefix_eviction="lru"))
    run = []
    hook = lm.model.embedding.register_forward_pre_hook(
        lambda _, args, kwargs: run.append((args[0] if args else kwargs["input_ids"]).numel()), with_kwargs=True)
    passes = []
    for _ in range(2):
        run.clear()
        passes.append({"tokens": dynamic.greedy(llm, cached, 16, eos_id=None), "embedded": sum(run)})
    hook.remove()
    theirs = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=16,
                          do_sample=False, num_beams=1, pad_token_id=0)[0, len(p):].tolist() for p in cached]
    prefix = {"equal": [p["tokens"] == theirs for p in passes], "embedded": [p["embedded"] for p in passes]}
    # under megatron's coordinator (as recipes.serve runs the engine): HF's tokens again, and no dummy forward
    # (megatron runs one when its expert-parallel consensus, kept for ep_consensus_interval steps, says another
    # rank has work; with no experts there is none, and with its default of 20 it ran up to 19 full forwards
    # after the last request finished), counted through the work and for half a second after it
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    del llm
    dummies = []
    real_dummy = TextGenerationController.dummy_forward
    TextGenerationController.dummy_forward = lambda self: (dummies.append(1), real_dummy(self))[1]
    # and the engine's thread computes with the intra-op threads this (main) thread handed it
    threads = set()
    hook = lm.model.register_forward_pre_hook(
        lambda *_: threads.add((threading.current_thread() is threading.main_thread(), torch.get_num_threads())))
    llm = dynamic.build_llm(lm.model, load_tokenizer(lm.args["tokenizer_name_or_path"]), settings, use_coordinator=True)
    if dist.get_rank() == 0:
        served = dynamic.greedy(llm, prompts, 40, eos_id=426)
        time.sleep(0.5)
        coordinator = {"equal": served == [r["hf"] for r in rows if r["eos"] == 426], "dummy_forwards": len(dummies),
                       "forward_threads": sorted(threads), "handed": handed, "main_thread": torch.get_num_threads()}
    hook.remove()
    llm.shutdown()
    if dist.get_rank() == 0:
        sys.stdout.write("RESULT " + json.dumps(rows) + "\n")
        sys.stdout.write("PREFIX " + json.dumps(prefix) + "\n")
        sys.stdout.write("COORDINATOR " + json.dumps(coordinator) + "\n")


if __name__ == "__main__":  # megatron's coordinator is a spawned process, which imports this file
    main()
