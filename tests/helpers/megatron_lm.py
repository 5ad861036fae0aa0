"""Temp copies of the Megatron-LM checkout (read-only in shared/) for the tests, with the one
line a user adds, and the pieces of its logs the tests read."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers.launch import THIRD_PARTY

SOURCE = THIRD_PARTY / "Megatron-LM"  # core_v0.16.1
SOURCE_CORE_V0_19 = THIRD_PARTY / "Megatron-LM-core_v0.19.0"
IMPORT = "import ascend_patches\n"
# what pretrain_gpt.py imports last: the line after it is "after every megatron import"
LAST_MEGATRON_IMPORT = "from model_provider import model_provider\n"


def add_import(script: Path, where: str = "first") -> None:
    text = script.read_text()
    if where == "first":
        text = IMPORT + text
    else:
        if LAST_MEGATRON_IMPORT not in text:
            raise AssertionError(f"{script}: no '{LAST_MEGATRON_IMPORT.strip()}' line to put the import after")
        text = text.replace(LAST_MEGATRON_IMPORT, LAST_MEGATRON_IMPORT + IMPORT, 1)
    script.write_text(text)


def build_dataset_helpers(root: Path) -> None:
    """What a user does once in a Megatron-LM checkout: build megatron/core/datasets' C++
    helpers, for this interpreter (its Makefile asks python3-config, which need not be it)."""
    folder = root / "megatron" / "core" / "datasets"
    includes = subprocess.run([sys.executable, "-m", "pybind11", "--includes"], capture_output=True, text=True,
                              check=True).stdout.strip()
    subprocess.run(["make", "-s", "-C", str(folder), f"LIBEXT={sysconfig.get_config_var('EXT_SUFFIX')}",
                    f"CPPFLAGS={includes}"], check=True, capture_output=True)


def copy_checkout(dest: Path, with_core: bool = True, import_where: str = "first", source: Path = SOURCE) -> Path:
    """A writable copy of ``source``: the whole checkout (its own megatron/core, helpers built),
    or its megatron/training etc. without megatron/core, to run on PyPI's megatron-core.
    core_v0.19.0's ``.python-version`` ("3.12") stays behind: in the copy, pyenv's shims would
    read it, and ``make``'s ``python3-config`` would be a Python other than the one running."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("tests", "__pycache__", "*.so", ".python-version"))
    if with_core:
        build_dataset_helpers(dest)
    else:
        shutil.rmtree(dest / "megatron" / "core")
    add_import(dest / "pretrain_gpt.py", import_where)
    for script in ("examples/run_simple_mcore_train_loop.py", "tools/run_text_generation_server.py",
                   "tools/checkpoint/convert.py"):
        add_import(dest / script, "first")
    return dest


LLAMA = ["--transformer-impl", "local", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
         "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
         "--distributed-backend", "nccl"]


def tiny_llama(layers=2, seq=64):
    """pretrain_gpt.py's flags for llama2-tiny's shape, as a GPU user without TE writes them."""
    return ["--num-layers", layers, "--hidden-size", 64, "--ffn-hidden-size", 176, "--num-attention-heads", 8,
            "--group-query-attention", "--num-query-groups", 4, "--seq-length", seq, "--max-position-embeddings",
            128, *LLAMA]


ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+) \|.*?grad norm: ([0-9.]+) \|")


def iterations(log: str) -> dict:
    """{iteration: (lm loss, grad norm)} as Megatron-LM logs them."""
    return {int(i): (float(loss), float(norm)) for i, loss, norm in ITERATION.findall(log)}


def convert_command(root: Path, hf_dir: Path, save_dir: Path, tp: int = 1) -> list:
    """Stock ``tools/checkpoint/convert.py``, HF LLaMA-2 -> Megatron-Core (loader llama_mistral,
    saver core, the local implementation: no Transformer Engine)."""
    return [sys.executable, str(root / "tools" / "checkpoint" / "convert.py"), "--model-type", "GPT",
            "--loader", "llama_mistral", "--checkpoint-type", "hf", "--model-size", "llama2-7B",
            "--load-dir", str(hf_dir), "--save-dir", str(save_dir), "--tokenizer-model", str(hf_dir),
            "--saver", "core", "--saver-transformer-impl", "local", "--target-tensor-parallel-size", str(tp)]


def pretrain_gpt_flags(data: dict) -> list:
    """pretrain_gpt.py's flags for llama2-tiny's shape over ``data`` (batch, lr, logging; no
    --train-iters), shared by every run the tests launch."""
    return [*tiny_llama(), "--micro-batch-size", 2, "--global-batch-size", 4, "--lr", "3e-3", "--log-interval", 1,
            "--eval-iters", 0, "--eval-interval", 1000, "--data-path", data["ours"], "--tokenizer-type",
            "Llama2Tokenizer", "--tokenizer-model", data["tokenizer"]]


def pretrain_gpt(root: Path, data: dict, *extra, nproc: int = 2, iters: int = 10, env=None):
    """``pretrain_gpt.py`` of the checkout at ``root`` on llama2-tiny's shape with Megatron-LM's
    default dropout (0.1), over ``data['ours']`` in ``data['tokenizer']``; the CompletedProcess."""
    from tests.helpers.launch import run_torchrun

    args = [*pretrain_gpt_flags(data), "--train-iters", iters, *extra]
    return run_torchrun(str(root / "pretrain_gpt.py"), *args, nproc=nproc, cwd=root, check=False, timeout=600,
                        env=env)


def serve(root: Path, ckpt: dict, tp: int, port: int, log, tokenizer: str = "HuggingFaceTokenizer"):
    """``tools/run_text_generation_server.py`` on stories260K's shape (a converted checkpoint),
    in a session of its own (stop it with ``os.killpg``).  ``tokenizer``: Megatron-LM's
    --tokenizer-type (Llama2Tokenizer reads the folder's tokenizer.model)."""
    from tests.helpers.launch import env_for_ranks, torchrun_command

    args = ["--num-layers", 5, "--hidden-size", 64, "--ffn-hidden-size", 172, "--num-attention-heads", 8,
            "--group-query-attention", "--num-query-groups", 4, "--seq-length", 512, "--max-position-embeddings", 512,
            *LLAMA, "--tokenizer-type", tokenizer, "--tokenizer-model",
            ckpt["tokenizer"] / "tokenizer.model" if tokenizer == "Llama2Tokenizer" else ckpt["tokenizer"],
            "--load", ckpt["path"], "--micro-batch-size", 1, "--port", port, "--make-vocab-size-divisible-by", 128,
            "--tensor-model-parallel-size", tp]
    cmd = torchrun_command(str(root / "tools" / "run_text_generation_server.py"), *args, nproc=tp)
    return subprocess.Popen(cmd, cwd=root, env=env_for_ranks(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def put_api(port: int, payload: dict, deadline: float) -> dict:
    """Megatron-LM's text_generation_cli.py request: PUT /api with JSON; retried until the server is up."""
    body = json.dumps(payload).encode()
    while True:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api", data=body, method="PUT",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError:
            raise  # the server answered: an error of its own, not "not up yet"
        except (ConnectionError, urllib.error.URLError):
            if time.time() > deadline:
                raise
            time.sleep(1)


def server_and_recipes_generate(root: Path, hf_dir: Path, tmp_path: Path, tp: int,
                                tokenizer: str = "HuggingFaceTokenizer", generate_flags=()):
    """The HF model at ``hf_dir`` converted by converters.hf_to_megatron, served by the
    checkout's text generation server at ``tp`` and asked by a real HTTP client for greedy
    text, and the same prompts through recipes.generate: (served texts, recipes' texts, the
    server's log)."""
    import os
    import signal

    from converters import hf_to_megatron
    from tests.helpers.launch import free_port, run_module

    ckpt = tmp_path / "stories"
    hf_to_megatron.main(["--input-model-dir", str(hf_dir), "--output-model-dir", str(ckpt)])
    prompts = ["Once upon a time", "The little dog"]
    ours = run_module("recipes.generate", "--load", ckpt, *sum((["--prompt", p] for p in prompts), []),
                      "--max-new-tokens", 24, "--greedy", "--output-json", tmp_path / "ours.json", *generate_flags,
                      env={"MASTER_PORT": str(free_port())})
    assert ours.returncode == 0, ours.stderr[-3000:]
    expected = [p + r["text"] for p, r in zip(prompts, json.loads((tmp_path / "ours.json").read_text()))]
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = serve(root, {"path": ckpt, "tokenizer": hf_dir}, tp, port, log, tokenizer)
        try:
            reply = put_api(port, {"prompts": prompts, "tokens_to_generate": 24, "top_k": 1}, time.time() + 240)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    return reply["text"], expected, (tmp_path / "server.log").read_text()


def resume_mismatches(full: dict, resumed: dict, start: int, end: int) -> list:
    """Where ``resumed`` (iterations logged after a resume at ``start``) differs from ``full``,
    the uninterrupted run: every (loss, grad norm) equal, bit for bit in the logged digits, but
    the first logged iteration after the resume's loss: Megatron-LM does not reset its loss
    accumulator on a process's first iteration (training_log: "don't reset accumulators"), so it
    logs the mean of that iteration and the one before (the 7 digits logged: 2e-6)."""
    bad = [] if sorted(resumed) == list(range(start + 1, end + 1)) else [("iterations", sorted(resumed))]
    for i in sorted(resumed):
        if i == start + 2:
            if resumed[i][1] != full[i][1] or abs(resumed[i][0] - (full[i - 1][0] + full[i][0]) / 2) >= 2e-6:
                bad.append((i, resumed[i], full[i - 1], full[i]))
        elif resumed[i] != full.get(i):
            bad.append((i, resumed[i], full.get(i)))
    return bad


def loss_mismatches(got: dict, want: dict, rtol: float) -> list:
    """Iterations whose loss differs by more than rtol (relative) or whose grad norm differs in
    the 3 decimals Megatron-LM logs; and the iterations themselves, if they differ."""
    bad = [] if sorted(got) == sorted(want) else [("iterations", sorted(got))]
    return bad + [(i, got[i], want[i]) for i in sorted(set(got) & set(want))
                  if abs(got[i][0] - want[i][0]) > rtol * abs(want[i][0]) or abs(got[i][1] - want[i][1]) > 1.5e-3]


def alpaca_pretraining_text(out: Path, fixtures: Path) -> dict:
    """The Alpaca sample's responses as pretraining text (jsonl, as Megatron-LM's tool reads),
    preprocessed by this project's recipe into stories260K's tokenizer."""
    from recipes.data import preprocess_data

    rows = json.loads((fixtures / "alpaca" / "alpaca_data_sample.json").read_text())
    with open(out / "alpaca.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"text": r["output"]}) + "\n")
    tok = fixtures / "stories260K" / "tokenizer.model"
    preprocess_data.main(["--input", str(out / "alpaca.jsonl"), "--tokenizer-name-or-path", str(tok),
                          "--output-prefix", str(out / "ours"), "--append-eod"])
    return {"jsonl": out / "alpaca.jsonl", "ours": str(out / "ours_text_document"), "tokenizer": tok, "dir": out}


def preprocess_with_tools(root: Path, data: dict, prefix: Path) -> str:
    """The checkout's ``tools/preprocess_data.py`` on ``data['jsonl']``, checked against what
    recipes.preprocess_data wrote for it (``data['ours']``): the same token streams, the same
    .bin bytes, and an index that differs only in Megatron-LM's document boundaries for the 3
    empty responses, which hold no sequence (the recipe skips and lists those rows instead).
    The written dataset's prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tests.helpers.launch import env_for_ranks

    proc = subprocess.run([sys.executable, str(root / "tools" / "preprocess_data.py"), "--input", str(data["jsonl"]),
                           "--output-prefix", str(prefix), "--tokenizer-type", "Llama2Tokenizer",
                           "--tokenizer-model", str(data["tokenizer"]), "--append-eod", "--workers", "1"],
                          capture_output=True, text=True, cwd=root, env=env_for_ranks(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = f"{prefix}_text_document"
    a, b = IndexedDataset(theirs), IndexedDataset(data["ours"])
    assert len(a) == len(b) == 1724
    assert all(list(a[i]) == list(b[i]) for i in range(len(a)))
    assert open(f"{theirs}.bin", "rb").read() == open(data["ours"] + ".bin", "rb").read()
    assert len(a.document_indices) == len(b.document_indices) + 3
    return theirs


def pretrain_gpt_killed_at(root: Path, data: dict, line: str, *extra, nproc: int = 2, timeout: int = 600) -> str:
    """``pretrain_gpt.py`` as ``pretrain_gpt`` runs it, SIGKILLed, torchrun and every rank (each
    rank is a process group of its own: killing torchrun's group alone leaves them writing), as
    soon as a log line contains ``line``; the log up to then.  Every process is gone on return."""
    import psutil

    from tests.helpers.launch import env_for_ranks, torchrun_command

    args = [*pretrain_gpt_flags(data), *extra]
    proc = subprocess.Popen(torchrun_command(str(root / "pretrain_gpt.py"), *args, nproc=nproc), cwd=root,
                            env=env_for_ranks(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log, deadline = [], time.time() + timeout
    for out in proc.stdout:
        log.append(out)
        if line in out or time.time() > deadline:
            break
    tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"alive after the kill: {alive}"
    assert any(line in out for out in log), "".join(log[-40:])
    return "".join(log)
