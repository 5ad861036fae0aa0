"""Raw data -> Megatron indexed datasets (.bin/.idx) that stock ``GPTDataset`` reads.

    python -m recipes.preprocess_data --input train.parquet \\
        --tokenizer-name-or-path ./llama-2-7b-hf [--tokenizer-type PretrainedFromHF] \\
        --output-prefix ./dataset/alpaca --workers 4 --log-interval 1000 \\
        [--handler-name GeneralPretrainHandler|GeneralInstructionHandler|MOSSInstructionHandler] \\
        [--append-eod] [--json-keys text] [--seq-length 4096] [--prompt-template alpaca|llama2-chat]

Outputs ``{prefix}_{key}_document.bin/.idx`` (pretraining, one per json key) or
``{prefix}_packed_input_ids_document`` + ``{prefix}_packed_labels_document`` (instruction
data; labels are -100 on prompt tokens).  Rows that yield no sample are counted, listed
with file and row number in ``{prefix}_skipped.jsonl``, and summarised at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from recipes.data.handlers import HANDLERS, TEMPLATES, SkipRow, make_handler
from recipes.data.readers import BadRow, input_files, materialize, read_rows
from recipes.tokenizer import TOKENIZER_TYPES, load_tokenizer

_worker = {}


def _init_worker(tokenizer_path, tokenizer_type, handler_name, handler_kw):
    tok = load_tokenizer(tokenizer_path, tokenizer_type)
    _worker["handler"] = make_handler(handler_name, tok, **handler_kw)


def _process_chunk(chunk):
    handler = _worker["handler"]
    out = []
    for file, row, record in chunk:
        record = materialize(record)
        if isinstance(record, BadRow):
            out.append((file, row, None, record.reason))
            continue
        try:
            sample = handler.process(record)
            # compact arrays pickle back to the main process far faster than lists
            out.append((file, row, {k: np.asarray(ids, dtype=np.int32) for k, (ids, _) in sample.items()}, None))
        except SkipRow as e:
            out.append((file, row, None, str(e)))
    return out


def _chunks(files, size):
    chunk = []
    for f in files:
        for row, record in read_rows(f):
            chunk.append((str(f), row, record))
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def build_parser():
    p = argparse.ArgumentParser(description="Tokenize raw data into Megatron indexed datasets.")
    p.add_argument("--input", required=True, help="a parquet/json/jsonl/csv/txt file, or a folder of them")
    p.add_argument("--tokenizer-name-or-path", required=True)
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="default: a folder with tokenizer.json/config is PretrainedFromHF, a .model file SentencePiece")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--handler-name", choices=HANDLERS, default="GeneralPretrainHandler")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--seq-length", type=int, default=None, help="truncate instruction samples to this many tokens")
    p.add_argument("--prompt-template", choices=TEMPLATES, default="alpaca")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=256, help="rows sent to a worker at a time")
    p.add_argument("--log-interval", type=int, default=1000)
    return p


def preprocess(args) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    files = input_files(args.input)  # clear errors before any work
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.tokenizer_type)
    handler_kw = dict(json_keys=args.json_keys, append_eod=args.append_eod, seq_length=args.seq_length,
                      prompt_template=args.prompt_template)
    handler = make_handler(args.handler_name, tokenizer, **handler_kw)
    prefix = Path(args.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    names = handler.output_names()
    token_dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builders = {}
    for name in names:
        dtype = np.int32 if name.endswith("labels_document") else token_dtype  # labels hold -100
        builders[name] = IndexedDatasetBuilder(f"{prefix}_{name}.bin.tmp", dtype=dtype)

    counts, skipped = Counter(), Counter()
    tokens_written = 0
    skipped_path = f"{prefix}_skipped.jsonl"
    t0 = time.perf_counter()
    init = (args.tokenizer_name_or_path, args.tokenizer_type, args.handler_name, handler_kw)
    if args.workers > 1:
        pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=init)
        results = pool.imap(_process_chunk, _chunks(files, args.chunk_size))
    else:
        pool = None
        _init_worker(*init)
        results = map(_process_chunk, _chunks(files, args.chunk_size))
    next_log = args.log_interval
    with open(skipped_path, "w") as skipped_file:
        for chunk in results:
            for file, row, sample, reason in chunk:
                counts["read"] += 1
                if sample is None:
                    skipped[reason.split(":")[0]] += 1
                    skipped_file.write(json.dumps({"file": file, "row": row, "reason": reason}) + "\n")
                    continue
                for name, ids in sample.items():
                    builders[name].add_document(ids, [len(ids)])
                tokens_written += len(next(iter(sample.values())))
                counts["written"] += 1
            if counts["read"] >= next_log:
                dt = time.perf_counter() - t0
                print(f"processed {counts['read']} rows ({counts['written']} written) | "
                      f"{counts['read'] / dt:.1f} docs/s | {tokens_written / dt:,.0f} tokens/s", flush=True)
                next_log += args.log_interval
    if pool is not None:
        pool.close()
        pool.join()
    for name, builder in builders.items():
        builder.finalize(f"{prefix}_{name}.idx")
        os.replace(f"{prefix}_{name}.bin.tmp", f"{prefix}_{name}.bin")
    dt = time.perf_counter() - t0
    summary = {"files": [str(f) for f in files], "rows_read": counts["read"], "rows_written": counts["written"],
               "rows_skipped": sum(skipped.values()), "skipped_by_reason": dict(skipped),
               "tokens_written": tokens_written, "seconds": round(dt, 3),
               "docs_per_s": round(counts["read"] / dt, 1), "tokens_per_s": round(tokens_written / dt, 1),
               "outputs": [f"{prefix}_{n}" for n in names], "skipped_rows_file": skipped_path}
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"rows read {summary['rows_read']}, written {summary['rows_written']}, skipped {summary['rows_skipped']}"
          + (f" {summary['skipped_by_reason']} (each listed in {summary['skipped_rows_file']})"
             if summary["rows_skipped"] else ""))
    print(f"{summary['tokens_written']:,} tokens in {summary['seconds']:.1f} s "
          f"({summary['docs_per_s']} docs/s, {summary['tokens_per_s']:,.0f} tokens/s) -> {', '.join(summary['outputs'])}")
    return summary


if __name__ == "__main__":
    main()
