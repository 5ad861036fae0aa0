"""recipes.preprocess_data on the shared fixtures: every handler, read back through stock
megatron datasets; the instruction label mask; bad rows counted with file and row."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recipes.data import preprocess_data
from recipes.data.datasets import InstructionDataset, build_pretrain_datasets
from recipes.data.handlers import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from recipes.data.tokenizer import load_tokenizer
from tests.helpers.launch import ROOT

IGNORE = -100


@pytest.fixture(scope="module")
def alpaca_parquet(tmp_path_factory, fixtures_dir):
    """AscendSpeed's users start from Alpaca's parquet release (instruction, input, output, text)."""
    rows = json.loads((fixtures_dir / "alpaca" / "alpaca_data_sample.json").read_text())
    for r in rows:
        r["text"] = "\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x)
    path = tmp_path_factory.mktemp("alpaca") / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, rows


@pytest.fixture(scope="module")
def llama_tok(fixtures_dir):
    return str(fixtures_dir / "tokenizer" / "tokenizer.model")


def run(*argv):
    return preprocess_data.preprocess(preprocess_data.build_parser().parse_args([str(a) for a in argv]))


def test_pretrain_handler_reads_back_through_gpt_dataset(alpaca_parquet, llama_tok, tmp_path, single_process_group):
    path, rows = alpaca_parquet
    s = run("--input", path, "--tokenizer-name-or-path", llama_tok, "--output-prefix", tmp_path / "a", "--append-eod")
    assert s["rows_read"] == len(rows) == s["rows_written"] and s["rows_skipped"] == 0
    tok = load_tokenizer(llama_tok)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "a_text_document"))
    assert len(ds) == len(rows)
    for i in (0, 7, len(rows) - 1):
        assert ds[i].tolist() == tok.encode(rows[i]["text"]) + [tok.eos_id]
    train, valid, _ = build_pretrain_datasets([str(tmp_path / "a_text_document")], "90,10,0", 64, 1, [50, 10, 0], tok)
    sample = train[0]
    assert sample["tokens"].shape == (64,) and sample["labels"].shape == (64,)
    assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()
    assert len(valid) >= 10


def test_instruction_mask_covers_exactly_the_response(alpaca_parquet, llama_tok, tmp_path):
    path, rows = alpaca_parquet
    s = run("--input", path, "--tokenizer-name-or-path", llama_tok, "--output-prefix", tmp_path / "i",
            "--handler-name", "GeneralInstructionHandler", "--seq-length", "512")
    empty = [i + 1 for i, r in enumerate(rows) if not r["output"].strip()]
    assert s["rows_skipped"] == len(empty) and s["skipped_by_reason"] == {"empty output": len(empty)}
    skipped = [json.loads(l) for l in open(s["skipped_rows_file"])]
    assert [r["row"] for r in skipped] == empty and all(r["file"] == str(path) for r in skipped)
    tok = load_tokenizer(llama_tok)
    ds = InstructionDataset(str(tmp_path / "i"), 512, tok.eos_id)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ids_ds, lab_ds = IndexedDataset(str(tmp_path / "i_packed_input_ids_document")), \
        IndexedDataset(str(tmp_path / "i_packed_labels_document"))
    kept = [r for r in rows if r["output"].strip()]
    for k in (0, 1, 5):  # 0: no input; 5 has an input in this sample
        r = kept[k]
        ids, labels = ids_ds[k].tolist(), lab_ds[k].tolist()
        n_prompt = sum(1 for l in labels if l == IGNORE)
        prompt_text = tok.decode(ids[1:n_prompt])
        response_text = tok.decode([l for l in labels if l != IGNORE][:-1])
        template = ALPACA_WITH_INPUT if r["input"].strip() else ALPACA_NO_INPUT
        assert prompt_text == template.format(instruction=r["instruction"], input=r["input"].strip())
        assert response_text == r["output"].strip()
        assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert ids[-1] == tok.eos_id and labels[-1] == tok.eos_id
        if not r["input"].strip():
            assert "### Input" not in prompt_text
        item = ds[k]  # training view: targets shifted by one, prompt positions masked
        assert item["loss_mask"].sum().item() == len(ids) - n_prompt


def test_truncation_that_removes_the_response_is_reported(alpaca_parquet, llama_tok, tmp_path):
    path, rows = alpaca_parquet
    s = run("--input", path, "--tokenizer-name-or-path", llama_tok, "--output-prefix", tmp_path / "t",
            "--handler-name", "GeneralInstructionHandler", "--seq-length", "64")  # some responses fit, some not
    assert s["skipped_by_reason"].get("no response tokens left after truncation to --seq-length", 0) > 0
    assert s["rows_read"] == s["rows_written"] + s["rows_skipped"] and s["rows_written"] > 0


def test_moss_handler_both_schemas(fixtures_dir, llama_tok, tmp_path):
    tok = load_tokenizer(llama_tok)
    s = run("--input", fixtures_dir / "moss" / "DERIVED_moss003_samples_oneline.jsonl", "--tokenizer-name-or-path",
            llama_tok, "--output-prefix", tmp_path / "m", "--handler-name", "MOSSInstructionHandler")
    assert s["rows_written"] == 4 and s["rows_skipped"] == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # keep the datasets referenced: megatron closes the mmap its arrays view when one is freed
    ids_ds = IndexedDataset(str(tmp_path / "m_packed_input_ids_document"))
    lab_ds = IndexedDataset(str(tmp_path / "m_packed_labels_document"))
    ids, labels = ids_ds[0].tolist(), lab_ds[0].tolist()
    trained = tok.decode([l for l in labels if l != IGNORE])
    first = json.loads((fixtures_dir / "moss" / "DERIVED_moss003_samples_oneline.jsonl").read_text().splitlines()[0])
    assert trained.startswith("<|MOSS|>:") and "<|Human|>" not in trained
    assert first["chat"]["turn_1"]["MOSS"].strip()[:20] in tok.decode(ids)
    s2 = run("--input", fixtures_dir / "moss" / "firefly_dummy_data_moss.jsonl", "--tokenizer-name-or-path",
             llama_tok, "--output-prefix", tmp_path / "f", "--handler-name", "MOSSInstructionHandler")
    assert s2["rows_written"] == 33


def test_bad_rows_are_counted_with_file_and_row(tmp_path, fixtures_dir):
    tok = str(fixtures_dir / "stories260K" / "tokenizer.model")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "Once upon a time"}\n'
                    b'{"text": "broken json"\n'
                    b'{"other": "no text column"}\n'
                    b'{"text": "caf\xe9 bytes"}\n'
                    b'{"text": "   "}\n'
                    b'{"text": "The end."}\n')
    s = run("--input", bad, "--tokenizer-name-or-path", tok, "--output-prefix", tmp_path / "b")
    assert (s["rows_read"], s["rows_written"], s["rows_skipped"]) == (6, 2, 4)
    reasons = {r["row"]: r["reason"] for r in map(json.loads, open(s["skipped_rows_file"]))}
    assert reasons[2].startswith("malformed JSON") and reasons[3] == "missing column 'text'"
    assert reasons[4].startswith("non-UTF-8 bytes") and reasons[5] == "empty text in column 'text'"


def test_csv_txt_and_workers_give_identical_output(tmp_path, fixtures_dir):
    tok = str(fixtures_dir / "stories260K" / "tokenizer.model")
    lines = [f"Tom had {i} red balls and a big dog." for i in range(300)]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "d.csv").write_text("id,text\n" + "\n".join(f'{i},"{l}"' for i, l in enumerate(lines)) + "\n")
    outs = []
    for name, workers in (("d.txt", 1), ("d.txt", 2), ("d.csv", 2)):
        prefix = tmp_path / f"{name}_{workers}"
        s = run("--input", tmp_path / name, "--tokenizer-name-or-path", tok, "--output-prefix", prefix,
                "--workers", workers, "--chunk-size", 16)
        assert s["rows_written"] == 300
        outs.append((tmp_path / f"{name}_{workers}_text_document.bin").read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_missing_paths_fail_before_any_work(tmp_path, fixtures_dir):
    tok = str(fixtures_dir / "stories260K" / "tokenizer.model")
    (tmp_path / "x.jsonl").write_text('{"text": "hi"}\n')
    for argv, msg in (
        (["--input", tmp_path / "nope.jsonl", "--tokenizer-name-or-path", tok], "input not found"),
        (["--input", tmp_path / "x.jsonl", "--tokenizer-name-or-path", tmp_path / "no_tok"], "tokenizer not found"),
    ):
        out = subprocess.run([sys.executable, "-m", "recipes.preprocess_data", *map(str, argv),
                              "--output-prefix", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2 and msg in out.stderr
    assert not list(tmp_path.glob("o*"))


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "recipes.preprocess_data", *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_a_run_that_writes_no_document_fails_and_leaves_nothing(fixtures_dir, tmp_path):
    """--json-keys naming a column no row has: every row skipped -> refused (exit 2, one
    line), no empty .bin, no .bin.tmp, no report."""
    out = _cli("--input", fixtures_dir / "alpaca" / "alpaca_data_sample.json", "--tokenizer-name-or-path",
               fixtures_dir / "stories260K" / "tokenizer.model", "--output-prefix", tmp_path / "o", "--json-keys", "textt")
    assert out.returncode == 2, out.stderr
    assert "no document to write - all 1727 rows were skipped" in out.stderr and "missing column 'textt'" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("o*")), list(tmp_path.iterdir())


def test_corrupt_files_are_named_and_leave_no_debris(alpaca_parquet, fixtures_dir, tmp_path):
    """A truncated parquet in a folder of several: the message names that file; the good
    files' partial output and the report are removed."""
    path, _ = alpaca_parquet
    folder = tmp_path / "in"
    folder.mkdir()
    data = path.read_bytes()
    (folder / "a_good.parquet").write_bytes(data)
    (folder / "b_truncated.parquet").write_bytes(data[: len(data) // 2])
    out = _cli("--input", folder, "--tokenizer-name-or-path", fixtures_dir / "stories260K" / "tokenizer.model",
               "--output-prefix", tmp_path / "o", "--json-keys", "output")
    assert out.returncode == 2, out.stderr
    assert f"{folder / 'b_truncated.parquet'}: not a readable parquet file" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.glob("o*")), list(tmp_path.iterdir())


def test_megatron_lm_tokenizer_flags(fixtures_dir, tmp_path):
    """Megatron-LM's --tokenizer-type / --tokenizer-model give the same dataset as this recipe's
    own flags for the same tokenizer (sentencepiece model; HF folder)."""
    src = fixtures_dir / "alpaca" / "alpaca_data_sample.json"
    model, folder = fixtures_dir / "stories260K" / "tokenizer.model", fixtures_dir / "stories260K"
    pairs = {"sp": (["--tokenizer-name-or-path", model], ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", model]),
             "hf": (["--tokenizer-name-or-path", folder, "--tokenizer-type", "PretrainedFromHF"],
                    ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", folder])}
    for kind, (ours, theirs) in pairs.items():
        for name, flags in (("ours", ours), ("theirs", theirs)):
            out = _cli("--input", src, *flags, "--output-prefix", tmp_path / f"{kind}_{name}", "--json-keys", "output")
            assert out.returncode == 0, out.stderr
        assert (tmp_path / f"{kind}_ours_output_document.bin").read_bytes() == \
            (tmp_path / f"{kind}_theirs_output_document.bin").read_bytes(), kind
