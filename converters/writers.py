"""Writers that stream canonical tensors out, one at a time.

``write_dist`` writes the ``dist_checkpointing`` torch_dist format that ``recipes.pretrain
--load`` (and generate/evaluate) read: Megatron-Core's global tensors, layers stacked on a
leading axis, one chunk per layer.  Megatron's own ``dist_checkpointing.save`` needs every
tensor in memory at once, so the chunks are appended to one ``.distcp`` file as they are
converted and torch's checkpoint metadata is written last.  Because the stored tensors are
global, megatron reshards them to whatever TP/PP loads them; the TP recorded only sets the
vocabulary padding (divisible-by x TP) and the defaults of later commands.

``write_hf`` writes HF safetensors shards (by size) with the index json and a config.json
that ``transformers`` loads directly.

Both write into a ``.tmp`` sibling and rename it into place when complete; an output folder
that already holds a checkpoint is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from converters.layout import DIST_KEYS, HF_GLOBAL, hf_config, HF_LAYER, LAYER_PARAMS, check_parallel, \
    pad_vocab, qkv_to_hf

TRACKER = "latest_checkpointed_iteration.txt"
EXTRA_STATE_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=os.environ.get("TQDM_DISABLE") == "1")


def refuse_existing(out: Path, what: str):
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{what} {out} already holds files; give an empty or new folder")


def _ordered_tensors(shape):
    yield "embedding", None
    for i in range(shape.num_layers):
        for name in LAYER_PARAMS:
            yield name, i
    yield "final_norm", None
    yield "output", None


def write_dist(source, out_root, tp: int, pp: int, divisible_by: int = 128, dtype: Optional[torch.dtype] = None,
               model_name: Optional[str] = None, extra_args: Optional[dict] = None) -> Path:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties, TensorStorageMetadata)

    from recipes.llama2 import padded_vocab_size

    shape = source.shape
    check_parallel(shape, tp, pp)
    out_root = Path(out_root)
    refuse_existing(out_root, "--output-model-dir")
    padded = padded_vocab_size(shape.vocab_size, divisible_by, tp)
    dtype = dtype or source.dtype
    tmp = out_root / "release.tmp"
    tmp.mkdir(parents=True)
    state_md, storage = {}, {}
    data_file = "__0_0.distcp"
    with open(tmp / data_file, "wb") as f, _progress(shape.num_layers * len(LAYER_PARAMS) + 3, "convert") as bar:
        for name, layer in _ordered_tensors(shape):
            t = source.get(name, layer).to(dtype)
            if name in ("embedding", "output"):
                t = pad_vocab(t, padded, name)
            key = DIST_KEYS[name]
            if layer is not None:
                offsets, t = (layer,) + (0,) * t.dim(), t.unsqueeze(0)
                global_size = (shape.num_layers,) + tuple(t.shape[1:])
            else:
                offsets, global_size = (0,) * t.dim(), tuple(t.shape)
            md = state_md.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(global_size), []))
            md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.shape))
            start = f.tell()
            torch.save(t.contiguous(), f)
            storage[MetadataIndex(key, torch.Size(offsets), len(md.chunks) - 1)] = _StorageInfo(
                data_file, start, f.tell() - start)
            bar.update(1)
        # the linear layers' (empty) extra states, as megatron saves them: torch.save([None])
        for linear in EXTRA_STATE_LINEARS:
            for layer in range(shape.num_layers):
                key = f"decoder.layers.{linear}._extra_state/shard_{layer}_{shape.num_layers}"
                state_md[key] = BytesStorageMetadata()
                start = f.tell()
                torch.save([None], f)
                storage[MetadataIndex(key)] = _StorageInfo(data_file, start, f.tell() - start)
    source.close()
    with open(tmp / ".metadata", "wb") as f:
        pickle.dump(Metadata(state_dict_metadata=state_md, storage_data=storage), f)
    torch.save({}, tmp / "common.pt")
    (tmp / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                   "common_backend": "torch", "common_backend_version": 1}))
    args = {"model": model_name, "shape": asdict(shape), "vocab_size": shape.vocab_size,
            "padded_vocab_size": padded, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
            "tokenizer_name_or_path": source.meta.get("tokenizer_name_or_path"),
            "make_vocab_size_divisible_by": divisible_by, **(extra_args or {})}
    (tmp / "args.json").write_text(json.dumps(args, indent=1, sort_keys=True))
    os.replace(tmp, out_root / "release")
    (out_root / (TRACKER + ".tmp")).write_text("release")
    os.replace(out_root / (TRACKER + ".tmp"), out_root / TRACKER)
    return out_root / "release"


def _hf_tensors(source):
    """(HF name, tensor) in HF order, vocabulary trimmed to the true size."""
    shape = source.shape
    yield HF_GLOBAL["embedding"], pad_vocab(source.get("embedding"), shape.vocab_size, "embedding")
    for i in range(shape.num_layers):
        pre = f"model.layers.{i}."
        for name in LAYER_PARAMS:
            t = source.get(name, i)
            if name == "qkv":
                parts = qkv_to_hf(t, shape)
            elif name == "fc1":
                parts = t.chunk(2, dim=0)
            else:
                parts = (t,)
            for hf_name, part in zip(HF_LAYER[name], parts):
                yield pre + hf_name, part.contiguous()
    yield HF_GLOBAL["final_norm"], source.get("final_norm")
    yield HF_GLOBAL["output"], pad_vocab(source.get("output"), shape.vocab_size, "output")


def parse_size(text) -> int:
    text = str(text).strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * mult)
    return int(text)


def write_hf(source, out_dir, max_shard_size="5GB", dtype: Optional[torch.dtype] = None,
             tokenizer_dir: Optional[str] = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    refuse_existing(out, "--output-model-dir")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    limit = parse_size(max_shard_size)
    dtype = dtype or source.dtype
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"part-{len(shards):05d}.safetensors"
            save_file(current, str(tmp / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    n = source.shape.num_layers * 9 + 3
    with _progress(n, "export") as bar:
        for name, t in _hf_tensors(source):
            t = t.to(dtype).contiguous()
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > limit:
                flush()
            current[name] = t
            size += nbytes
            total += nbytes
            bar.update(1)
        flush()
    source.close()
    weight_map = {}
    for i, (name, names) in enumerate(shards):
        final = (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors")
        os.replace(tmp / name, tmp / final)
        weight_map.update({n: final for n in names})
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    bos, eos = 1, 2
    if tokenizer_dir:
        bos, eos = _copy_tokenizer(tokenizer_dir, tmp)
    (tmp / "config.json").write_text(json.dumps(hf_config(source.shape, dtype, bos, eos), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _copy_tokenizer(src, dst: Path):
    """Copy a HF tokenizer folder's files, or a bare sentencepiece model as tokenizer.model."""
    src = Path(src)
    if src.is_file():
        shutil.copyfile(src, dst / "tokenizer.model")
    elif src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
    else:
        return 1, 2
    if (dst / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(dst / "tokenizer.model"))
        if not (dst / "tokenizer_config.json").is_file():
            (dst / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                 "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, indent=2))
        return sp.bos_id(), sp.eos_id()
    return 1, 2
