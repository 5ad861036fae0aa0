"""Run under torchrun.

    lora_checks.py train BASE_CKPT -- PRETRAIN_ARGS...   LoRA-train via recipes.pretrain, then check
        that every base tensor on this rank equals the base checkpoint's slice bit for bit
    lora_checks.py merged TP BASE LORA MERGED OUT.pt     logits of base+adapter vs the merged checkpoint
        (base+adapter logits and the tokens saved to OUT.pt for a comparison with transformers)
"""

import json
import sys

import torch
import torch.distributed as dist

from converters.layout import tp_split
from converters.sources import open_megatron
from recipes.infer import inference
from recipes.model import checkpointing

CANON = {"embedding.word_embeddings.weight": "embedding", "decoder.final_layernorm.weight": "final_norm",
         "output_layer.weight": "output", "input_layernorm.weight": "input_norm",
         "self_attention.linear_qkv.base.weight": "qkv", "self_attention.linear_proj.base.weight": "proj",
         "pre_mlp_layernorm.weight": "mlp_norm", "mlp.linear_fc1.base.weight": "fc1",
         "mlp.linear_fc2.base.weight": "fc2"}

what = sys.argv[1]
result = {}
if what == "train":
    from recipes.train import pretrain

    base = sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1:]
    tp = int(argv[argv.index("--tensor-model-parallel-size") + 1]) if "--tensor-model-parallel-size" in argv else 1
    models = pretrain.main(argv)
    model = checkpointing.unwrap(models[0])
    src = open_megatron(base)
    tp_rank = int(__import__("os").environ.get("RANK", "0")) % tp
    checked, trainable = 0, []
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable.append(name)
            continue
        if name.startswith("decoder.layers."):
            _, _, idx, rest = name.split(".", 3)
            canon, layer = CANON[rest], int(idx)
        else:
            canon, layer = CANON[name], None
        expected = tp_split(canon, src.get(canon, layer), tp)[tp_rank]
        assert torch.equal(p.detach(), expected.to(p.dtype)), name
        checked += 1
    result = {"base_tensors_equal": checked, "trainable": sorted(set(n.rsplit(".", 1)[-1] for n in trainable)),
              "n_trainable": len(trainable)}
    sys.stdout.write(f"RESULT{tp_rank} " + json.dumps(result) + "\n")  # one write: ranks share the pipe (torchrun runs them -u)
elif what == "merged":
    tp, base, lora_dir, merged = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    lm = inference.load(base, tp, 1, lora_load=lora_dir)
    with_adapter = inference.full_logits(lm, tokens)
    lm0 = inference.load(base, tp, 1)
    plain = inference.full_logits(lm0, tokens)
    lm2 = inference.load(merged, tp, 1)
    folded = inference.full_logits(lm2, tokens)
    result = {"merged_vs_adapter": (folded - with_adapter).abs().max().item(),
              "adapter_effect": (with_adapter - plain).abs().max().item()}
    if dist.get_rank() == 0:
        torch.save({"tokens": tokens, "logits": with_adapter}, sys.argv[6])
        sys.stdout.write("RESULT " + json.dumps(result) + "\n")  # one write: ranks share the pipe (torchrun runs them -u)
