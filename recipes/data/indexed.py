"""Writing Megatron's indexed dataset format (``.bin`` tokens + ``.idx`` index), which stock
``GPTDataset`` / ``IndexedDataset`` read; the format is in ``docs/layouts.md``.

Writing it here, rather than through megatron-core's builder, keeps preprocessing free of
importing megatron-core and torch (seconds of start-up on every run, more than the work on a
corpus of tens of thousands of documents).  The tests read every file written back through
megatron's own ``IndexedDataset`` and compare with Megatron-LM's ``tools/preprocess_data.py``.
"""

from __future__ import annotations

import struct

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
               np.uint16: 8}


def token_dtype(vocab_size: int):
    """The smallest dtype that holds every token id (megatron's rule: uint16 below 65500)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class IndexedWriter:
    """One dataset: documents appended to the ``.bin``, the index written by ``finalize``.
    Every document here is one sequence."""

    def __init__(self, bin_path: str, dtype):
        self.dtype = np.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"indexed datasets hold {sorted(t.__name__ for t in DTYPE_CODES)}, not {self.dtype}")
        self.file = open(bin_path, "wb")
        self.lengths = []

    def add(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.file.write(arr.tobytes(order="C"))
        self.lengths.append(arr.size)

    def close(self) -> None:
        self.file.close()

    def finalize(self, idx_path: str) -> None:
        self.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype=np.int64)  # document i ends after sequence i
        with open(idx_path, "wb") as f:
            f.write(HEADER)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(documents)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))
