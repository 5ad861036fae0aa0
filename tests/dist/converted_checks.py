"""Run under torchrun: load converted checkpoints at the given TP/PP and compare with HF.

    converted_checks.py TP PP logits LOAD HF_DIR [LOAD HF_DIR ...]
    converted_checks.py TP PP greedy200 LOAD EXPECTED_TXT
    converted_checks.py TP PP hf_generate LOAD HF_DIR   (greedy and beam search vs HF generate)
    converted_checks.py TP PP logits_of LOAD SAVED.pt   (logits vs {"tokens", "logits"} saved elsewhere)
"""

import json
import sys

import torch
import torch.distributed as dist

from ascend_patches.ops import decode_compiled
from recipes.infer import decoding, inference

_steps = [0]
_model_step = decode_compiled.model_step


def _counting_model_step(*args):
    _steps[0] += 1
    return _model_step(*args)


decode_compiled.model_step = _counting_model_step  # the fused GPTModel forward calls it by module attribute


def compiled_steps() -> int:
    """How many decode steps ran through torch.compile (ASCEND_PATCHES_COMPILE_DECODE=1)."""
    return _steps[0]


tp, pp, what = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
pairs = list(zip(sys.argv[4::2], sys.argv[5::2]))
result = {}
for load, ref in pairs:
    lm = inference.load(load, tp, pp)
    if what == "logits":
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
        tokens = torch.randint(0, lm.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
        ours = inference.full_logits(lm, tokens)
        with torch.no_grad():
            theirs = hf(tokens).logits
        assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
        result[load] = [(ours - theirs).abs().max().item(), theirs.abs().max().item()]
    elif what == "logits_of":
        saved = torch.load(ref)
        ours = inference.full_logits(lm, saved["tokens"])
        v = min(ours.shape[-1], saved["logits"].shape[-1])
        result = {"max_abs": (ours[..., :v] - saved["logits"][..., :v]).abs().max().item()}
    elif what == "greedy200":
        from recipes.data.tokenizer import load_tokenizer

        tok = load_tokenizer(lm.args["tokenizer_name_or_path"])
        out = decoding.generate(lm, [[tok.bos_id]], 200, decoding.SamplingParams(), tok.eos_id)[0]
        text = tok.decode(out.tokens)
        expected = open(ref, encoding="utf-8").read()
        result[load] = {"equal": text.encode() == expected.encode(), "len": len(out.tokens), "text": text[:80],
                        "compiled_steps": compiled_steps()}
    elif what == "hf_generate":
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
        prompts = [[1], [1, 403, 407, 261, 378], [1, 67, 429, 270, 260, 392, 281, 449, 300], [1, 500, 7, 3]]
        rows = []

        def cut(seq, eos):  # HF pads finished beams after their EOS
            return seq[:seq.index(eos) + 1] if eos in seq else seq

        for p in prompts:
            ids = torch.tensor([p])
            mask = torch.ones(1, len(p), dtype=torch.long)
            g = decoding.generate(lm, [p], 40, decoding.SamplingParams(), 2)[0].tokens
            hg = hf.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, num_beams=1)
            rows.append({"prompt": p, "mode": "greedy", "equal": g == hg[0, len(p):].tolist(), "n": len(g)})
            # eos 426 is '.', so finished hypotheses and the stopping heuristics are exercised
            for nb, lp, early, n_new, eos in ((3, 1.0, False, 30, 2), (4, 0.6, True, 30, 426),
                                              (3, 1.0, False, 40, 426), (2, 1.3, "never", 40, 426)):
                ours = decoding.beam_search(lm, p, n_new, nb, eos, length_penalty=lp, early_stopping=early,
                                            num_return_sequences=2)
                theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, num_beams=nb,
                                     length_penalty=lp, early_stopping=early, num_return_sequences=2,
                                     eos_token_id=eos, pad_token_id=0)
                rows.append({"prompt": p, "mode": f"beam{nb}/{early}", "equal": [cut(o.tokens, eos) for o in ours] ==
                             [cut(t[len(p):].tolist(), eos) for t in theirs],
                             "eos": sum(eos in o.tokens for o in ours)})
        result[load] = rows
        result["compiled_steps"] = compiled_steps()
if dist.get_rank() == 0:
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")  # one write: ranks share the pipe (torchrun runs them -u)
