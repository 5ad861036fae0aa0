"""Raw data -> Megatron indexed datasets (.bin/.idx) that stock ``GPTDataset`` reads.

    python -m recipes.preprocess_data --input train.parquet \\
        --tokenizer-name-or-path ./llama-2-7b-hf [--tokenizer-type PretrainedFromHF] \\
        --output-prefix ./dataset/alpaca --workers 4 --log-interval 1000 \\
        [--handler-name GeneralPretrainHandler|GeneralInstructionHandler|MOSSInstructionHandler] \\
        [--append-eod] [--json-keys text] [--seq-length 4096] [--prompt-template alpaca|llama2-chat] [--pack]

Megatron-LM's tokenizer flags work too: ``--tokenizer-type Llama2Tokenizer|SentencePieceTokenizer|
HuggingFaceTokenizer --tokenizer-model PATH``.

Outputs ``{prefix}_{key}_document.bin/.idx`` (pretraining, one per json key) or
``{prefix}_packed_input_ids_document`` + ``{prefix}_packed_labels_document`` (instruction
data; labels are -100 on prompt tokens).  ``--pack --seq-length N`` (MindSpeed-LLM's pack
fine-tuning) records in ``{prefix}_packing.json`` that the samples train packed into rows of
N: recipes.pretrain packs them when the data loads, with or without --reset-position-ids.
Rows that yield no sample are counted, listed
with file and row number in ``{prefix}_skipped.jsonl``, and summarised at the end.  A run
that would write no document is refused; a file that cannot be read is named; a failed run
leaves no partial output (``.bin.tmp``) or report behind.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from recipes import errors
from recipes.data import datasets
from recipes.data.handlers import HANDLERS, TEMPLATES, SkipRow, make_handler
from recipes.data.indexed import IndexedWriter, token_dtype
from recipes.data.readers import BadRow, input_files, materialize, read_rows
from recipes.data.tokenizer import add_tokenizer_flags, load_tokenizer

_worker = {}


def _init_worker(tokenizer_path, tokenizer_type, handler_name, handler_kw, threads=-1):
    tok = load_tokenizer(tokenizer_path, tokenizer_type)
    _worker["handler"] = make_handler(handler_name, tok, threads=threads, **handler_kw)


def _process_chunk(chunk):
    """[(file, row, sample arrays or None, skip reason or None)] for a chunk of raw rows."""
    records = [materialize(record) for _, _, record in chunk]
    good = [r for r in records if not isinstance(r, BadRow)]
    results = iter(_worker["handler"].process_many(good))
    out = []
    for (file, row, _), record in zip(chunk, records):
        sample = record if isinstance(record, BadRow) else next(results)
        if isinstance(sample, (BadRow, SkipRow)):
            out.append((file, row, None, sample.reason if isinstance(sample, BadRow) else str(sample)))
        else:  # compact arrays pickle back to the main process far faster than lists
            out.append((file, row, {k: np.asarray(ids, dtype=np.int32) for k, (ids, _) in sample.items()}, None))
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
    p = errors.ArgumentParser(description="Tokenize raw data into Megatron indexed datasets.")
    p.add_argument("--input", required=True, help="a parquet/json/jsonl/csv/txt file, or a folder of them")
    add_tokenizer_flags(p, "none (one is required)")
    p.add_argument("--output-prefix", required=True, help="written: {prefix}_{key}_document.bin/.idx")
    p.add_argument("--handler-name", choices=HANDLERS, default="GeneralPretrainHandler",
                   help="how a row becomes tokens (default GeneralPretrainHandler: plain text)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="pretraining text columns (default text)")
    p.add_argument("--append-eod", action="store_true", help="end every document with EOS")
    p.add_argument("--seq-length", type=int, default=None,
                   help="truncate instruction samples to this many tokens (default: no truncation)")
    p.add_argument("--prompt-template", choices=TEMPLATES, default="alpaca", help="instruction prompts (default alpaca)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument("--chunk-size", type=int, default=256, help="rows sent to a worker at a time (default 256)")
    p.add_argument("--log-interval", type=int, default=1000, help="print progress every N rows (default 1000)")
    p.add_argument("--pack", action="store_true",
                   help="MindSpeed-LLM's pack fine-tuning: the instruction dataset written trains packed into rows "
                        "of --seq-length (recorded in {prefix}_packing.json; the rows are cut when the data loads, "
                        "in the run's seeded order, as --reset-position-ids packs)")
    return p


class _Outputs:
    """The datasets being written (to ``.bin.tmp``) and the skipped-rows report: renamed into
    place by ``commit``, removed by ``abort`` (a failed run leaves nothing behind)."""

    def __init__(self, prefix: Path, names, tokens_dtype, packing: Optional[int] = None):
        self.prefix, self.names, self.packing = prefix, names, packing  # packing: --pack's seq length
        self.builders = {n: IndexedWriter(self._tmp(n), np.int32 if n.endswith("labels_document") else tokens_dtype)
                         for n in names}  # labels hold -100
        self.report_path = f"{prefix}_skipped.jsonl"
        self.report = open(self.report_path + ".tmp", "w")

    def _tmp(self, name):
        return f"{self.prefix}_{name}.bin.tmp"

    def add(self, sample: dict) -> None:
        for name, ids in sample.items():
            self.builders[name].add(ids)

    def skip(self, file, row, reason) -> None:
        self.report.write(json.dumps({"file": file, "row": row, "reason": reason}) + "\n")

    def commit(self, any_skipped: bool) -> None:
        self.report.close()
        for name, builder in self.builders.items():
            builder.finalize(f"{self.prefix}_{name}.idx")
            os.replace(self._tmp(name), f"{self.prefix}_{name}.bin")
        packing = datasets.PACKING_FILE.format(prefix=self.prefix)
        if self.packing:
            os.replace(datasets.write_packing(str(self.prefix), self.packing, packing + ".tmp"), packing)
        elif os.path.exists(packing):  # the dataset rewritten without --pack: no longer packed
            os.remove(packing)
        if any_skipped:
            os.replace(self.report_path + ".tmp", self.report_path)
        else:
            os.remove(self.report_path + ".tmp")

    def abort(self) -> None:
        self.report.close()
        for name, builder in self.builders.items():
            builder.close()
            for path in (self._tmp(name), self.report_path + ".tmp"):
                if os.path.exists(path):
                    os.remove(path)


def _results(files, args, tokenizer_path):
    init = (tokenizer_path, args.tokenizer_type, args.handler_name, _handler_kw(args))
    if args.workers > 1:  # parallel by process: one tokenizer thread each
        pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=init + (1,))
        return pool, pool.imap(_process_chunk, _chunks(files, args.chunk_size))
    _init_worker(*init)
    return None, map(_process_chunk, _chunks(files, args.chunk_size))


def _handler_kw(args) -> dict:
    return dict(json_keys=args.json_keys, append_eod=args.append_eod, seq_length=args.seq_length,
                prompt_template=args.prompt_template)


def _tokenizer_path(args) -> str:
    path = args.tokenizer_name_or_path
    if not path:
        raise errors.BadInput("give --tokenizer-name-or-path (or Megatron-LM's --tokenizer-model)")
    return path


def _consume(results, out: _Outputs, args, counts: Counter, skipped: Counter, t0: float) -> None:
    next_log = args.log_interval
    for chunk in results:
        for file, row, sample, reason in chunk:
            counts["read"] += 1
            if sample is None:
                skipped[reason.split(":")[0]] += 1
                out.skip(file, row, reason)
                continue
            out.add(sample)
            counts["tokens"] += len(next(iter(sample.values())))
            counts["written"] += 1
        if counts["read"] >= next_log:
            dt = time.perf_counter() - t0
            print(f"processed {counts['read']} rows ({counts['written']} written) | "
                  f"{counts['read'] / dt:.1f} docs/s | {counts['tokens'] / dt:,.0f} tokens/s", flush=True)
            next_log += args.log_interval


def preprocess(args) -> dict:
    files = input_files(args.input)  # clear errors before any work
    tokenizer_path = _tokenizer_path(args)
    tokenizer = load_tokenizer(tokenizer_path, args.tokenizer_type)
    names = make_handler(args.handler_name, tokenizer, **_handler_kw(args)).output_names()
    if args.pack and "packed_input_ids_document" not in names:
        raise errors.BadInput(f"--pack packs instruction samples (MindSpeed-LLM's pack fine-tuning); "
                              f"{args.handler_name} writes pretraining documents, which recipes.pretrain splits at EOD "
                              "with --reset-position-ids --reset-attention-mask: drop --pack")
    if args.pack and not args.seq_length:
        raise errors.BadInput("--pack packs samples into rows of --seq-length: give --seq-length")
    prefix = Path(args.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    counts, skipped = Counter(), Counter()
    t0 = time.perf_counter()
    out = _Outputs(prefix, names, token_dtype(tokenizer.vocab_size), args.seq_length if args.pack else None)
    pool = None
    try:
        pool, results = _results(files, args, tokenizer_path)
        _consume(results, out, args, counts, skipped, t0)
        if counts["written"] == 0:
            raise errors.BadInput(f"{args.input}: no document to write - all {counts['read']} rows were skipped "
                                  f"({dict(skipped) or 'no rows'}); check --json-keys / --handler-name")
    except BaseException:
        out.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    out.commit(any_skipped=bool(skipped))
    dt = time.perf_counter() - t0
    return {"files": [str(f) for f in files], "rows_read": counts["read"], "rows_written": counts["written"],
            "rows_skipped": sum(skipped.values()), "skipped_by_reason": dict(skipped),
            "tokens_written": counts["tokens"], "seconds": round(dt, 3),
            "docs_per_s": round(counts["read"] / dt, 1), "tokens_per_s": round(counts["tokens"] / dt, 1),
            "outputs": [f"{prefix}_{n}" for n in names] + (
                [datasets.PACKING_FILE.format(prefix=prefix)] if args.pack else []), "skipped_rows_file": out.report_path if skipped else None}


def main(argv=None):
    summary = preprocess(build_parser().parse_args(argv))
    print(f"rows read {summary['rows_read']}, written {summary['rows_written']}, skipped {summary['rows_skipped']}"
          + (f" {summary['skipped_by_reason']} (each listed in {summary['skipped_rows_file']})"
             if summary["rows_skipped"] else ""))
    print(f"{summary['tokens_written']:,} tokens in {summary['seconds']:.1f} s "
          f"({summary['docs_per_s']} docs/s, {summary['tokens_per_s']:,.0f} tokens/s) -> {', '.join(summary['outputs'])}")
    return summary


if __name__ == "__main__":
    main()
