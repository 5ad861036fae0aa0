"""Training data on stock megatron.core datasets, and the order batches are drawn in.

Pretraining reads ``{prefix}_text_document`` through ``BlendedMegatronDatasetBuilder`` +
``GPTDataset`` (with ``--data-path`` weights and ``--split``).  Instruction data reads the
``packed_input_ids`` / ``packed_labels`` pair written by ``recipes.preprocess_data``: one
sample per document, right-padded, prompt positions out of the loss.

The sample order is a pure function of (seed, consumed samples), so a resumed run draws
exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from recipes.errors import BadInput, MissingInput

IGNORE_INDEX = -100
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class MegatronTokenizerView:
    """The little of a tokenizer GPTDataset needs."""

    def __init__(self, tok):
        self.eod = tok.eos_id
        self.vocab_size = tok.vocab_size
        self.pad = -1  # LLaMA-2 has no pad token; sequences are packed, never padded
        # part of GPTDataset's cache key
        self.unique_identifiers = {"class": type(tok).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


def _check_prefix(prefix: str):
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise MissingInput(f"--data-path {prefix}: {prefix + ext} not found "
                                    "(write it with python -m recipes.preprocess_data)")


def parse_blend(data_path: Sequence[str]):
    """Megatron's ``--data-path [w1] p1 [w2] p2 ...``."""
    items = list(data_path)
    if len(items) == 1:
        return [items[0]], None
    if len(items) % 2:
        raise BadInput("--data-path with weights must alternate weight and prefix")
    weights = [float(w) for w in items[0::2]]
    return items[1::2], weights


SPLIT_NAMES = ("training", "validation", "test")


def check_splits(prefixes, split: str) -> None:
    """Refuse a split that --split gives a share but that holds no token: Megatron-Core's
    GPTDataset counts epochs until it has the tokens asked for, so on an empty split it loops
    for ever.  The document ranges are the ones its dataset builder cuts."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                         parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError, ZeroDivisionError):
        raise BadInput(f"--split {split}: expected three non-negative weights, e.g. 949,50,1") from None
    for prefix in prefixes:
        index = IndexedDataset(prefix)
        lengths = np.array(index.sequence_lengths, dtype=np.int64)  # a copy: the index's buffer closes with it
        del index
        n = len(lengths)
        for name, bounds in zip(SPLIT_NAMES, matrix):
            if bounds is None:
                continue
            beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if int(np.sum(lengths[beg:end])) == 0:
                raise BadInput(f"--data-path {prefix}: --split {split} gives the {name} split {end - beg} of its {n} "
                               f"documents, which hold no token, and Megatron-Core's GPTDataset cannot draw samples "
                               f"from an empty split; give that split weight 0 (e.g. --split 95,5,0) or more data")


def build_pretrain_datasets(data_path, split: str, seq_length: int, seed: int, sizes: List[int],
                            tokenizer, cache_dir: Optional[str] = None, reset_position_ids: bool = False,
                            eod_mask_loss: bool = False):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(data_path)
    for p in prefixes:
        _check_prefix(p)
    check_splits(prefixes, split)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=cache_dir, tokenizer=MegatronTokenizerView(tokenizer),
        reset_position_ids=reset_position_ids, reset_attention_mask=reset_position_ids, eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


class InstructionDataset(torch.utils.data.Dataset):
    """Samples from the packed_input_ids / packed_labels pair; tokens padded to seq_length."""

    def __init__(self, prefix: str, seq_length: int, pad_id: int, indices: Optional[np.ndarray] = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ids_prefix, labels_prefix = f"{prefix}_packed_input_ids_document", f"{prefix}_packed_labels_document"
        _check_prefix(ids_prefix)
        _check_prefix(labels_prefix)
        self.ids = IndexedDataset(ids_prefix)
        self.labels = IndexedDataset(labels_prefix)
        if len(self.ids) != len(self.labels):
            raise BadInput(f"{prefix}: {len(self.ids)} input_ids documents but {len(self.labels)} labels documents")
        self.seq_length, self.pad_id = seq_length, pad_id
        self.indices = np.arange(len(self.ids)) if indices is None else indices

    def __len__(self):
        return len(self.indices)

    def positions(self) -> np.ndarray:
        """Each sample's input positions (its tokens but the last, at most seq_length), from the
        index alone."""
        lengths = np.asarray(self.ids.sequence_lengths, dtype=np.int64)[self.indices]
        return np.maximum(np.minimum(lengths, self.seq_length + 1) - 1, 0)

    def document(self, i):
        """(ids, labels) of sample i, cut to seq_length + 1 tokens as the padded row cuts them."""
        doc = int(self.indices[i])
        ids = np.asarray(self.ids[doc], dtype=np.int64)[: self.seq_length + 1]
        labels = np.asarray(self.labels[doc], dtype=np.int64)[: self.seq_length + 1]
        if len(ids) != len(labels):
            raise BadInput(f"document {doc}: {len(ids)} tokens but {len(labels)} labels")
        return ids, labels

    def __getitem__(self, i):
        ids, labels = self.document(i)
        n = self.seq_length + 1
        tokens = np.full(n, self.pad_id, dtype=np.int64)
        targets = np.full(n, IGNORE_INDEX, dtype=np.int64)
        tokens[: len(ids)] = ids
        targets[: len(labels)] = labels
        loss_mask = (targets[1:] != IGNORE_INDEX).astype(np.float32)
        return {"tokens": torch.from_numpy(tokens[:-1]),
                "labels": torch.from_numpy(np.where(targets[1:] == IGNORE_INDEX, 0, targets[1:])),
                "loss_mask": torch.from_numpy(loss_mask)}


PACKING_FILE = "{prefix}_packing.json"  # written by recipes.preprocess_data --pack


def write_packing(prefix: str, seq_length: int, path: Optional[str] = None) -> str:
    """Record that the instruction dataset at ``prefix`` trains packed into rows of
    ``seq_length`` (MindSpeed-LLM's preprocess-time --pack); to ``path`` if given (a file
    renamed into place later).  Returns the file written."""
    import json

    out = path or PACKING_FILE.format(prefix=prefix)
    Path(out).write_text(json.dumps({"pack": True, "seq_length": seq_length}) + "\n")
    return out


def read_packing(prefix: str) -> Optional[dict]:
    """{"pack": True, "seq_length": N} for a dataset preprocessed with --pack, else None."""
    import json

    path = Path(PACKING_FILE.format(prefix=prefix))
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("pack") else None


def first_fit(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Rows of sample indices: each sample, in the given order, goes whole into the first row
    with room for it (a new row if none has).  A pure function of the order and the lengths."""
    room = np.zeros(0, dtype=np.int64)
    rows: List[List[int]] = []
    for i, n in enumerate(lengths):
        if n <= 0:
            continue  # a one-token sample has no input position (the padded row has no loss there either)
        fits = np.flatnonzero(room >= n)
        if len(fits):
            r = int(fits[0])
        else:
            rows.append([])
            room = np.append(room, capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    return rows


class PackedInstructionDataset(torch.utils.data.Dataset):
    """An InstructionDataset's samples packed whole into rows of seq_length positions, first
    fit in the split's seeded order: no sample is cut across rows, and the rows are a pure
    function of (data, --seed, --seq-length), so a resume draws the same rows.  Each row's
    position_ids restart at every sample (and at the padding that fills the row's tail, which
    carries no loss), which is what marks the sequences for THD attention."""

    def __init__(self, samples: InstructionDataset):
        self.samples = samples
        self.seq_length, self.pad_id = samples.seq_length, samples.pad_id
        self.rows = first_fit(samples.positions().tolist(), self.seq_length)

    def __len__(self):
        return len(self.rows)

    def real_fraction(self) -> float:
        """Input positions that are a sample's, over all the rows hold."""
        return float(sum(self.samples.positions()[r].sum() for r in self.rows)) / (len(self.rows) * self.seq_length)

    def __getitem__(self, i):
        tokens, targets, positions = [], [], []
        for j in self.rows[i]:
            ids, labels = self.samples.document(j)
            tokens.append(ids[:-1])
            targets.append(labels[1:])
            positions.append(np.arange(len(ids) - 1))
        used = sum(len(t) for t in tokens)
        pad = self.seq_length - used
        if pad:
            tokens.append(np.full(pad, self.pad_id, dtype=np.int64))
            targets.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
            positions.append(np.arange(pad))
        tokens, targets, positions = (np.concatenate(x) for x in (tokens, targets, positions))
        return {"tokens": torch.from_numpy(tokens),
                "labels": torch.from_numpy(np.where(targets == IGNORE_INDEX, 0, targets)),
                "loss_mask": torch.from_numpy((targets != IGNORE_INDEX).astype(np.float32)),
                "position_ids": torch.from_numpy(positions)}


def to_thd(batch: dict) -> dict:
    """A micro-batch of rows whose position_ids restart at each sequence, as one packed row
    [1, b*s] with cu_seqlens (the sequences' cumulative ends) and the longest one's length:
    the batch megatron's PackedSeqParams describes."""
    out = {k: v.reshape(1, -1) for k, v in batch.items()}
    pos = out["position_ids"].view(-1)
    starts = torch.nonzero(pos == 0).view(-1)
    cu = torch.cat([starts, torch.tensor([pos.numel()])]).to(torch.int32)
    out["cu_seqlens"] = cu
    out["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
    return out


def trim_to_longest(batch: dict, multiple: int = 1) -> dict:
    """--variable-seq-lengths: cut the micro-batch after its last loss-bearing position (rounded
    up to ``multiple``); the positions cut only follow every loss-bearing one, so under causal
    attention no loss or gradient changes."""
    keep = batch["loss_mask"].sum(0).nonzero()
    n = int(keep[-1]) + 1 if len(keep) else 1
    n = min(-(-n // multiple) * multiple, batch["tokens"].shape[1])
    return {k: v[:, :n].contiguous() for k, v in batch.items()}


def split_instruction_dataset(prefix: str, seq_length: int, pad_id: int, split: str, seed: int):
    """Documents shuffled once with --seed, then cut by --split weights (train, valid, test)."""
    n = len(InstructionDataset(prefix, seq_length, pad_id))  # also checks both files exist
    weights = [float(x) for x in split.replace("/", ",").split(",")]
    weights += [0.0] * (3 - len(weights))
    order = np.random.RandomState(seed).permutation(n)
    bounds = np.cumsum([0] + [round(w / sum(weights) * n) for w in weights])
    bounds[-1] = n
    return [InstructionDataset(prefix, seq_length, pad_id, order[bounds[i]:bounds[i + 1]]) if bounds[i + 1] > bounds[i]
            else None for i in range(3)]


def microbatches(dataset, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int = 0, reshuffle_epochs: bool = False,
                 shape=None) -> Iterator[dict]:
    """Endless stream of this DP rank's micro-batches, starting after consumed_samples, in
    Megatron-LM's order (its ``MegatronPretrainingSampler``): micro-step j reads samples
    consumed + j * mbs * dp onwards and rank r takes the r-th mbs of them, so both engines of
    the pretrain recipe train on the same batches.  A GPTDataset is shuffled already; with
    ``reshuffle_epochs`` (instruction data) every pass over the data is a permutation drawn
    from the seed.  The order is a pure function of (seed, consumed samples): a resumed run
    draws exactly the batches the uninterrupted run would have.  ``shape``: what each stacked
    micro-batch becomes (``to_thd``, ``trim_to_longest``)."""
    n = len(dataset)
    if n == 0:
        raise BadInput("the dataset is empty")
    step = micro_batch_size * dp_size
    perms = {}

    def sample(j):
        epoch, pos = divmod(j, n)
        if not reshuffle_epochs:
            return dataset[pos]
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.random.RandomState(seed + epoch).permutation(n)
        return dataset[int(perms[epoch][pos])]

    k = consumed_samples
    while True:
        first = k + dp_rank * micro_batch_size
        items = [sample(first + i) for i in range(micro_batch_size)]
        batch = {key: torch.stack([it[key] for it in items]) for key in BATCH_KEYS if key in items[0]}
        yield batch if shape is None else shape(batch)
        k += step
