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

from recipes.errors import Exists
from recipes.model import checkpointing, llama2
from converters.layout import DIST_KEYS, HF_GLOBAL, hf_config, HF_LAYER, LAYER_PARAMS, \
    pad_vocab, qkv_to_hf

EXTRA_STATE_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=os.environ.get("TQDM_DISABLE") == "1")


def refuse_existing(out: Path, what: str):
    if out.exists() and any(out.iterdir()):
        raise Exists(f"{what} {out} already holds files; give an empty or new folder")


def _ordered_tensors(shape):
    yield "embedding", None
    for i in range(shape.num_layers):
        for name in LAYER_PARAMS:
            yield name, i
    yield "final_norm", None
    yield "output", None


class _DistcpFile:
    """One ``.distcp`` file that tensors are appended to, and the torch.distributed.checkpoint
    metadata that indexes them, written last."""

    NAME = "__0_0.distcp"

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint.metadata import Metadata  # noqa: F401  (fail early if absent)

        self.folder, self.state_md, self.storage = folder, {}, {}
        self.f = open(folder / self.NAME, "wb")

    def _append(self, obj, index):
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        start = self.f.tell()
        torch.save(obj, self.f)
        self.storage[index] = _StorageInfo(self.NAME, start, self.f.tell() - start)

    def add_tensor(self, key: str, t: torch.Tensor, layer: Optional[int], num_layers: int):
        """A global tensor, or one layer of a layer-stacked one."""
        from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                           TensorStorageMetadata)

        if layer is not None:
            offsets, t = (layer,) + (0,) * t.dim(), t.unsqueeze(0)
            global_size = (num_layers,) + tuple(t.shape[1:])
        else:
            offsets, global_size = (0,) * t.dim(), tuple(t.shape)
        md = self.state_md.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=t.dtype),
                                                                  torch.Size(global_size), []))
        md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.shape))
        self._append(t.contiguous(), MetadataIndex(key, torch.Size(offsets), len(md.chunks) - 1))

    def add_bytes(self, key: str, obj):
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

        self.state_md[key] = BytesStorageMetadata()
        self._append(obj, MetadataIndex(key))

    def close(self):
        from torch.distributed.checkpoint.metadata import Metadata

        self.f.close()
        with open(self.folder / ".metadata", "wb") as f:
            pickle.dump(Metadata(state_dict_metadata=self.state_md, storage_data=self.storage), f)


def _stream_model(source, out: _DistcpFile, dtype, padded: int):
    shape = source.shape
    with _progress(shape.num_layers * len(LAYER_PARAMS) + 3, "convert") as bar:
        for name, layer in _ordered_tensors(shape):
            t = source.get(name, layer).to(dtype)
            if name in ("embedding", "output"):
                t = pad_vocab(t, padded, name)
            out.add_tensor(DIST_KEYS[name], t, layer, shape.num_layers)
            bar.update(1)
    # the linear layers' (empty) extra states, as megatron saves them: torch.save([None])
    for linear in EXTRA_STATE_LINEARS:
        for layer in range(shape.num_layers):
            out.add_bytes(f"decoder.layers.{linear}._extra_state/shard_{layer}_{shape.num_layers}", [None])
    source.close()


def write_dist(source, out_root, tp: int, pp: int, divisible_by: int = 128, dtype: Optional[torch.dtype] = None,
               model_name: Optional[str] = None, extra_args: Optional[dict] = None, flag_prefix: str = "") -> Path:
    shape = source.shape
    padded = llama2.padded_vocab_size(shape.vocab_size, divisible_by, tp)
    llama2.check_layout(shape, tp, pp, padded_vocab=padded, flag_prefix=flag_prefix)
    out_root = Path(out_root)
    refuse_existing(out_root, "--output-model-dir")
    dtype = dtype or source.dtype
    tmp = out_root / "release.tmp"
    tmp.mkdir(parents=True)
    out = _DistcpFile(tmp)
    _stream_model(source, out, dtype, padded)
    out.close()
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
    checkpointing.write_tracker(out_root, "release")
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


def _write_shards(source, folder: Path, limit: int, dtype) -> dict:
    """The HF tensors as safetensors shards of at most ``limit`` bytes; {tensor: file} and total bytes."""
    from safetensors.torch import save_file

    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"part-{len(shards):05d}.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    with _progress(source.shape.num_layers * 9 + 3, "export") as bar:
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
        os.replace(folder / name, folder / final)
        weight_map.update({n: final for n in names})
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return weight_map


def write_hf(source, out_dir, max_shard_size="5GB", dtype: Optional[torch.dtype] = None,
             tokenizer_dir: Optional[str] = None) -> Path:
    out = Path(out_dir)
    refuse_existing(out, "--output-model-dir")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dtype = dtype or source.dtype
    _write_shards(source, tmp, parse_size(max_shard_size), dtype)
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
