"""Where Megatron-Core 0.16 and the torch installed beside it disagree.

``megatron.core.dist_checkpointing``'s ``remove_sharded_tensors`` renames a checkpoint's
metadata through ``FileSystemWriter.metadata_path``; torch 2.13's writer no longer has that
attribute (it computes the path per call), so the function fails with AttributeError on every
backend.  The descriptor gives it back: the writer's folder joined with ``.metadata``, the
name Megatron-Core writes (its ``_metadata_fn``).  It has no ``__set__``, so a torch that sets
the attribute on the instance keeps its own value."""

from __future__ import annotations

from pathlib import Path

METADATA_FILE = ".metadata"


class MetadataPath:
    def __get__(self, writer, owner=None):
        if writer is None:
            return self
        return Path(writer.fs.concat_path(writer.path, METADATA_FILE))
