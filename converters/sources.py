"""Readers that turn a checkpoint into canonical tensors (``converters.layout``) on demand.

Each reader answers ``get(name, layer)`` for one tensor at a time and keeps at most one
input file open, so a conversion holds one layer's tensors plus one file's mapping, never
the whole model.  Formats:

- ``HFSource``: a HuggingFace LLaMA folder (``model*.safetensors`` or legacy
  ``pytorch_model*.bin``, loaded with ``weights_only=True`` and memory-mapped).
- ``DistSource``: a ``dist_checkpointing`` torch_dist folder (what ``recipes.pretrain``
  saves and ``hf_to_megatron`` writes); chunks are read straight from the ``.distcp`` files.
- ``DeepSpeedSource``: a DeepSpeed (ZeRO 0-3) checkpoint of ``recipes.pretrain --deepspeed``,
  consolidated to fp32 by DeepSpeed's own ``zero_to_fp32``.
- ``LegacySource``: AscendSpeed's (2023) ``mp_rank_XX[_YYY]/model_optim_rng.pt``.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Dict, Optional

import torch

from dataclasses import replace

from recipes.errors import BadInput, MissingInput
from recipes.model.llama2 import LlamaShape
from converters.layout import (DIST_KEYS, GLOBAL_PARAMS, HF_GLOBAL, HF_LAYER, LAYER_PARAMS, expected,
                               hf_to_qkv, tp_merge)


class ConversionError(BadInput):
    pass


def _open_weights(path: Path):
    """A safetensors handle or a torch state dict; a truncated or corrupt file is named."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            return safe_open(str(path), framework="pt")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # safetensors' SafetensorError, torch's RuntimeError / UnpicklingError
        raise ConversionError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e)[:120]}); "
                              "it may be truncated (an interrupted download?): fetch or save it again") from None


def _check(t: torch.Tensor, expected, where: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(expected):
        raise ConversionError(f"{where}: shape {tuple(t.shape)} disagrees with the config's {tuple(expected)}")
    return t


class HFSource:
    IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

    def __init__(self, folder, shape_overrides: Optional[dict] = None):
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise MissingInput(f"{cfg_path} not found: --input-model-dir must be a HuggingFace model folder")
        self.config = json.loads(cfg_path.read_text())
        self.shape = replace(LlamaShape.from_hf_config(self.config), **(shape_overrides or {}))
        self.weight_map = self._weight_map()
        self._open_name, self._open = None, None
        self._check_names()
        emb = self._raw(HF_GLOBAL["embedding"])
        self.dtype = emb.dtype
        self.padded_vocab = emb.shape[0]
        if self.padded_vocab < self.shape.vocab_size:
            raise ConversionError(f"{HF_GLOBAL['embedding']}: {emb.shape[0]} rows, fewer than vocab_size "
                                  f"{self.shape.vocab_size} in config.json")
        self.meta = {"tokenizer_name_or_path": str(self.folder.resolve())
                     if (self.folder / "tokenizer.model").exists() or (self.folder / "tokenizer.json").exists()
                     else None}

    def _weight_map(self) -> Dict[str, str]:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            p = self.folder / index
            if p.is_file():
                return json.loads(p.read_text())["weight_map"]
        files = sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("pytorch_model*.bin"))
        if not files:
            raise MissingInput(f"{self.folder}: no *.safetensors or pytorch_model*.bin weights")
        out = {}
        for f in files:
            for name in self._names_in(f):
                out[name] = f.name
        return out

    @staticmethod
    def _names_in(path: Path):
        weights = _open_weights(path)
        return list(weights.keys())

    def _expected_names(self):
        names = {HF_GLOBAL["embedding"], HF_GLOBAL["final_norm"]}
        if not self.config.get("tie_word_embeddings", False):
            names.add(HF_GLOBAL["output"])
        for i in range(self.shape.num_layers):
            for parts in HF_LAYER.values():
                names.update(f"model.layers.{i}.{p}" for p in parts)
        return names

    def _check_names(self):
        have = {n for n in self.weight_map if not self.IGNORED.match(n)}
        want = self._expected_names()
        missing, unexpected = sorted(want - have), sorted(have - want - {HF_GLOBAL["output"]})
        if missing:
            raise ConversionError(f"{self.folder}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            raise ConversionError(f"{self.folder}: unexpected tensors {unexpected[:5]}"
                                  f"{' ...' if len(unexpected) > 5 else ''} (not a LLaMA with "
                                  f"{self.shape.num_layers} layers?)")

    def _raw(self, name: str) -> torch.Tensor:
        fname = self.weight_map[name]
        if fname != self._open_name:
            self.close()
            path = self.folder / fname
            if not path.is_file():
                raise MissingInput(f"{path} (holds {name}) not found")
            self._open = _open_weights(path)
            self._open_name = fname
        if isinstance(self._open, dict):
            return self._open[name].clone()
        return self._open.get_tensor(name)

    def close(self):
        self._open_name, self._open = None, None

    def get(self, name: str, layer: Optional[int] = None) -> torch.Tensor:
        s = self.shape
        if name in GLOBAL_PARAMS:
            hf = HF_GLOBAL[name]
            if name == "output" and hf not in self.weight_map:  # tied embeddings
                hf = HF_GLOBAL["embedding"]
            rows = self.padded_vocab if name != "final_norm" else None
            return _check(self._raw(hf), expected(s, name, rows), hf)
        names = [f"model.layers.{layer}.{p}" for p in HF_LAYER[name]]
        ts = [self._raw(n) for n in names]
        d, h = s.kv_channels, s.hidden_size
        if name == "qkv":
            _check(ts[0], (s.num_attention_heads * d, h), names[0])
            _check(ts[1], (s.num_query_groups * d, h), names[1])
            _check(ts[2], (s.num_query_groups * d, h), names[2])
            return hf_to_qkv(*ts, s)
        if name == "fc1":
            _check(ts[0], (s.ffn_hidden_size, h), names[0])
            _check(ts[1], (s.ffn_hidden_size, h), names[1])
            return torch.cat(ts, dim=0)
        return _check(ts[0], expected(s, name, None), names[0])


def _tokenizer_vocab(args: dict, where: Path, padded_rows: int) -> int:
    """The true vocabulary of a checkpoint that records only its padded rows (Megatron-LM's):
    its tokenizer's.  Where that tokenizer is gone the size is refused, not guessed: the padded
    row count would give the HF model rows no token has (and a wrong ``vocab_size``)."""
    path = args.get("tokenizer_name_or_path")
    if not path or not Path(path).exists():
        missing = f"its tokenizer {path} is gone" if path else "it records no tokenizer"
        raise MissingInput(f"{where}: the checkpoint records only its padded vocabulary ({padded_rows} rows) and "
                           f"{missing}, so the true vocabulary size is unknown: give --vocab-size N (the "
                           "tokenizer's size), or restore the tokenizer at that path")
    from recipes.data.tokenizer import load_tokenizer

    return load_tokenizer(path).vocab_size


class DistSource:
    """Reads chunks of a torch_dist checkpoint without building a model or a process group."""

    def __init__(self, ckpt_dir, args: dict, vocab_size: Optional[int] = None):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = Path(ckpt_dir)
        if not (self.dir / ".metadata").is_file():
            raise MissingInput(f"{self.dir}: no .metadata (not a torch_dist checkpoint)")
        self.md = FileSystemReader(str(self.dir)).read_metadata()
        self.args = args
        self._chunks = {}
        for idx, info in self.md.storage_data.items():
            if idx.offset is not None:
                self._chunks.setdefault(idx.fqn, []).append((tuple(idx.offset), info))
        for name, key in DIST_KEYS.items():
            if key not in self.md.state_dict_metadata:
                raise ConversionError(f"{self.dir}: tensor {key} ({name}) missing from the checkpoint")
        emb = self.md.state_dict_metadata[DIST_KEYS["embedding"]]
        self.padded_vocab = emb.size[0]
        shape = LlamaShape(**{k: v for k, v in args["shape"].items() if k in LlamaShape.__dataclass_fields__})
        self.shape = replace(shape, vocab_size=vocab_size or args.get("vocab_size")
                             or _tokenizer_vocab(args, self.dir, self.padded_vocab))
        self.dtype = emb.properties.dtype
        self.meta = {"tokenizer_name_or_path": args.get("tokenizer_name_or_path")}
        self._file_name, self._file = None, None

    def _read(self, info) -> torch.Tensor:
        if info.relative_path != self._file_name:
            self.close()
            self._file = open(self.dir / info.relative_path, "rb")
            self._file_name = info.relative_path
        self._file.seek(info.offset)
        return torch.load(io.BytesIO(self._file.read(info.length)), map_location="cpu", weights_only=True)

    def close(self):
        if self._file:
            self._file.close()
        self._file_name, self._file = None, None

    def get(self, name: str, layer: Optional[int] = None) -> torch.Tensor:
        key = DIST_KEYS[name]
        meta = self.md.state_dict_metadata[key]
        size = list(meta.size)
        stacked = name in LAYER_PARAMS
        if stacked:
            if size[0] != self.shape.num_layers:
                raise ConversionError(f"{self.dir}: {key} stacks {size[0]} layers, args.json says "
                                      f"{self.shape.num_layers}")
            size = size[1:]
        out = torch.empty(size, dtype=meta.properties.dtype)
        filled = 0
        for chunk_meta in meta.chunks:
            offsets, sizes = list(chunk_meta.offsets), list(chunk_meta.sizes)
            if stacked:
                if offsets[0] > layer or offsets[0] + sizes[0] <= layer:
                    continue
                first = layer - offsets[0]
                offsets, sizes = offsets[1:], sizes[1:]
            info = dict(self._chunks[key])[tuple(chunk_meta.offsets)]
            data = self._read(info)
            if stacked:
                data = data[first]
            view = out
            for dim, (o, n) in enumerate(zip(offsets, sizes)):
                view = view.narrow(dim, o, n)
            view.copy_(data.reshape(sizes))
            filled += view.numel()
        if filled < out.numel():
            raise ConversionError(f"{self.dir}: {key} layer {layer}: chunks cover {filled} of {out.numel()} elements")
        return _check(out, expected(self.shape, name, self.padded_vocab), f"{self.dir}: {key}" + ("" if layer is None else f" layer {layer}"))


class LegacySource:
    """AscendSpeed's per-rank files; TP/PP sizes are read off the folder names."""

    PATTERN = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")

    def __init__(self, ckpt_dir, shape: LlamaShape, vocab_size: Optional[int] = None):
        self.dir = Path(ckpt_dir)
        ranks = {}
        for d in self.dir.iterdir():
            m = self.PATTERN.match(d.name)
            if m and d.is_dir():
                ranks[(int(m.group(1)), int(m.group(2) or 0))] = d
        if not ranks:
            raise MissingInput(f"{self.dir}: no mp_rank_XX folders (not a legacy Megatron checkpoint)")
        self.tp = max(t for t, _ in ranks) + 1
        self.pp = max(p for _, p in ranks) + 1
        for t in range(self.tp):
            for p in range(self.pp):
                if (t, p) not in ranks:
                    raise MissingInput(f"{self.dir}: mp_rank_{t:02d}" + (f"_{p:03d}" if self.pp > 1 else "")
                                            + f" missing (TP={self.tp}, PP={self.pp})")
        self.ranks = ranks
        self.shape = shape
        if shape.num_layers % self.pp:
            raise ConversionError(f"{self.dir}: PP={self.pp} folders do not divide {shape.num_layers} layers")
        self.per_stage = shape.num_layers // self.pp
        self._stage, self._stage_sd = None, None
        self.meta = {"tokenizer_name_or_path": None}
        emb = self._stage_tensors(0)[0]["embedding"]["word_embeddings"]["weight"]
        self.dtype = emb.dtype
        self.padded_vocab = emb.shape[0] * self.tp
        if vocab_size:
            self.shape = replace(self.shape, vocab_size=vocab_size)

    def _load_file(self, d: Path):
        for fname, key in (("model_optim_rng.pt", "model"), ("mp_rank_00_model_states.pt", "module")):
            p = d / fname
            if p.is_file():
                sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                if key not in sd:
                    raise ConversionError(f"{p}: no '{key}' entry")
                return sd[key]["language_model"] if "language_model" in sd[key] else sd[key]
        files = list(d.glob("*_model_states.pt"))
        if files:
            return torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)["module"]["language_model"]
        raise MissingInput(f"{d}: no model_optim_rng.pt")

    def _stage_tensors(self, stage: int):
        if self._stage != stage:
            self._stage_sd = [self._load_file(self.ranks[(t, stage)]) for t in range(self.tp)]
            self._stage = stage
        return self._stage_sd

    def close(self):
        self._stage, self._stage_sd = None, None

    def _encoder(self, rank_sd, where):
        for key in ("encoder", "transformer"):
            if key in rank_sd:
                return rank_sd[key]
        raise ConversionError(f"{where}: no 'encoder' in language_model")

    def get(self, name: str, layer: Optional[int] = None) -> torch.Tensor:
        s = self.shape
        if name == "embedding":
            sds = self._stage_tensors(0)
            return tp_merge(name, [sd["embedding"]["word_embeddings"]["weight"] for sd in sds])
        if name in ("output", "final_norm"):
            stage = self.pp - 1
            sds = self._stage_tensors(stage)
            if name == "output":
                pieces = [sd["output_layer"]["weight"] for sd in sds]
            else:
                pieces = [self._encoder(sd, self.dir)["final_layernorm.weight"] for sd in sds]
            return tp_merge(name, pieces, f"{self.dir} stage {stage}: ")
        stage, local = divmod(layer, self.per_stage)
        encs = [self._encoder(sd, self.dir) for sd in self._stage_tensors(stage)]
        pre = f"layers.{local}."
        where = f"{self.dir} stage {stage} layer {local}: "

        def pieces(suffix):
            try:
                return [e[pre + suffix] for e in encs]
            except KeyError:
                raise ConversionError(f"{where}tensor {pre + suffix} missing") from None

        if name == "fc1":
            if pre + "mlp.proj.weight" in encs[0]:
                t = tp_merge("fc1", pieces("mlp.proj.weight"), where)
            else:
                gate = torch.cat(pieces("mlp.gate_proj.weight"), dim=0)
                up = torch.cat(pieces("mlp.dense_h_to_4h.weight"), dim=0)
                t = torch.cat([gate, up], dim=0)
        else:
            suffix = {"input_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
                      "qkv": "self_attention.query_key_value.weight", "proj": "self_attention.dense.weight",
                      "fc2": "mlp.dense_4h_to_h.weight"}[name]
            t = tp_merge(name, pieces(suffix), where)
        return _check(t, expected(s, name, None), where + name)


class DeepSpeedSource:
    """A DeepSpeed checkpoint's weights, gathered from every ZeRO partition by DeepSpeed's
    ``zero_to_fp32`` (one fp32 state dict of the module, in megatron's parameter names)."""

    NAMES = {"embedding": "embedding.word_embeddings.weight", "final_norm": "decoder.final_layernorm.weight",
             "output": "output_layer.weight", "input_norm": "decoder.layers.{}.input_layernorm.weight",
             "qkv": "decoder.layers.{}.self_attention.linear_qkv.weight",
             "proj": "decoder.layers.{}.self_attention.linear_proj.weight",
             "mlp_norm": "decoder.layers.{}.pre_mlp_layernorm.weight", "fc1": "decoder.layers.{}.mlp.linear_fc1.weight",
             "fc2": "decoder.layers.{}.mlp.linear_fc2.weight"}

    def __init__(self, root, tag: Optional[str] = None):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from recipes.model import checkpointing

        self.dir = Path(root)
        it = checkpointing.latest_iteration(self.dir)
        tag = tag or (checkpointing.iter_dir(self.dir, it).name if it is not None else None)
        if tag is None or not (self.dir / tag).is_dir():
            raise ConversionError(f"{self.dir}: no DeepSpeed checkpoint (no {checkpointing.TRACKER}; give --tag)")
        self.args = checkpointing.args_of(self.dir / tag)
        if self.args.get("tensor_model_parallel_size", 1) != 1:
            raise ConversionError(f"{self.dir / tag}: saved at TP={self.args['tensor_model_parallel_size']}; "
                                  "zero_to_fp32 gathers data-parallel partitions only, so TP=1 checkpoints convert")
        self.sd = get_fp32_state_dict_from_zero_checkpoint(str(self.dir), tag=tag)
        self.shape = LlamaShape(**self.args["shape"])
        if self.args.get("vocab_size"):
            self.shape = replace(self.shape, vocab_size=self.args["vocab_size"])
        self.padded_vocab = self.sd[self.NAMES["embedding"]].shape[0]
        self.dtype = torch.float32
        self.meta = {"tokenizer_name_or_path": self.args.get("tokenizer_name_or_path")}

    def get(self, name: str, layer: Optional[int] = None) -> torch.Tensor:
        key = self.NAMES[name].format(layer)
        if key not in self.sd:
            raise ConversionError(f"{self.dir}: {key} missing from the DeepSpeed checkpoint")
        return _check(self.sd[key], expected(self.shape, name, self.padded_vocab), f"{self.dir}: {key}")

    def close(self):
        pass


def open_megatron(folder, shape: Optional[LlamaShape] = None, vocab_size: Optional[int] = None):
    """A Megatron checkpoint folder (the one holding latest_checkpointed_iteration.txt, or an
    iteration folder itself) as a reader."""
    from recipes.model import checkpointing

    folder = Path(folder)
    if not folder.exists():
        raise MissingInput(f"{folder} does not exist")
    it_dir = folder
    if (folder / checkpointing.TRACKER).is_file():
        it_dir = checkpointing.iter_dir(folder, checkpointing.latest_iteration(folder))
        if not it_dir.is_dir():
            raise MissingInput(f"{folder}/{checkpointing.TRACKER} points at {it_dir}, which does not exist")
    if (it_dir / ".metadata").is_file():
        return DistSource(it_dir, checkpointing.args_of(it_dir), vocab_size)
    if any(LegacySource.PATTERN.match(d.name) for d in it_dir.iterdir()):
        if shape is None:
            raise ConversionError(f"{it_dir} is a legacy per-rank checkpoint, which does not record its shape: "
                                  "give --type or --hf-config (and shape flags)")
        return LegacySource(it_dir, shape, vocab_size)
    raise ConversionError(f"{it_dir}: neither a torch_dist checkpoint (.metadata) nor legacy mp_rank_XX folders")
