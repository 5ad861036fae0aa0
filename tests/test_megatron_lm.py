"""Stock Megatron-LM (``shared/third_party/Megatron-LM``, core_v0.16.1) with one added line,
``import ascend_patches``, on the CPU: its own ``pretrain_gpt.py`` (TP, PP with virtual
stages, DP with the distributed optimizer, SP, bf16, the import after every megatron import,
PyPI's megatron-core under the checkout's megatron/training), an exact resume, its example
training loop, its ``tools/preprocess_data.py`` and text generation server against this
project's own tools, and the recipe's Megatron-LM engine.

The flags are those a GPU user without Transformer Engine writes (``--transformer-impl
local``, ``--distributed-backend nccl``); nothing CPU-specific.
"""

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import torch

from converters import hf_to_megatron, megatron_to_hf
from recipes.data import preprocess_data
from tests.helpers import megatron_lm as mlm
from tests.helpers.launch import env_for_ranks, free_port, run_module, run_torchrun, torchrun_command

pytestmark = pytest.mark.slow  # multi-process runs of Megatron-LM

RNG_WARNING = "CPU RNG state changed within GPU RNG context"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    return mlm.copy_checkout(tmp_path_factory.mktemp("mlm") / "Megatron-LM")


@pytest.fixture(scope="module")
def training_only(tmp_path_factory):
    """PyPI's megatron-core plus the checkout's megatron/training, the import placed after
    every megatron import of pretrain_gpt.py."""
    return mlm.copy_checkout(tmp_path_factory.mktemp("mlm_pypi") / "Megatron-LM", with_core=False,
                             import_where="after")


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory, fixtures_dir):
    """The Alpaca sample's responses as pretraining text (jsonl, as Megatron-LM's tool reads),
    preprocessed by this project's recipe."""
    out = tmp_path_factory.mktemp("alpaca")
    rows = json.loads((fixtures_dir / "alpaca" / "alpaca_data_sample.json").read_text())
    with open(out / "alpaca.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"text": r["output"]}) + "\n")
    tok = fixtures_dir / "stories260K" / "tokenizer.model"
    preprocess_data.main(["--input", str(out / "alpaca.jsonl"), "--tokenizer-name-or-path", str(tok),
                          "--output-prefix", str(out / "ours"), "--append-eod"])
    return {"jsonl": out / "alpaca.jsonl", "ours": str(out / "ours_text_document"), "tokenizer": tok, "dir": out}


def _pretrain_gpt(root, data, *extra, nproc=2, iters=10, check=True, env=None):
    args = [*mlm.tiny_llama(), "--micro-batch-size", 2, "--global-batch-size", 4, "--lr", "3e-3",
            "--train-iters", iters, "--log-interval", 1, "--eval-iters", 0, "--eval-interval", 1000,
            "--data-path", data["ours"], "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
            data["tokenizer"], *extra]
    proc = run_torchrun(str(root / "pretrain_gpt.py"), *args, nproc=nproc, cwd=root, check=False, timeout=600,
                        env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", 2],
    "pp2_vpp": ["--pipeline-model-parallel-size", 2, "--num-layers", 4, "--num-layers-per-virtual-pipeline-stage", 1],
    "dp2_distopt": ["--use-distributed-optimizer"],
    "tp2_sp": ["--tensor-model-parallel-size", 2, "--sequence-parallel"],
    "tp2_bf16": ["--tensor-model-parallel-size", 2, "--bf16"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pretrain_gpt_trains(checkout, alpaca, layout):
    proc = _pretrain_gpt(checkout, alpaca, *LAYOUTS[layout])
    log = proc.stdout + proc.stderr
    it = mlm.iterations(log)
    assert sorted(it) == list(range(1, 11)), log[-3000:]
    assert it[10][0] < it[1][0] - 0.5, it  # loss falls
    assert log.count(RNG_WARNING) == 0


@pytest.fixture(scope="module")
def tp2_reference(checkout, alpaca):
    return mlm.iterations(_pretrain_gpt(checkout, alpaca, *LAYOUTS["tp2"]).stdout)


@pytest.mark.parametrize("recompute", [["--recompute-granularity", "full", "--recompute-method", "uniform",
                                        "--recompute-num-layers", 1], ["--recompute-granularity", "selective"]],
                         ids=["full", "selective"])
def test_recompute_repeats_the_losses_and_gradients(checkout, alpaca, tp2_reference, recompute):
    """Activation recompute with Megatron-LM's default dropout (0.1): the recomputed forward
    draws the same dropout masks, so every loss and gradient norm equals the run without it."""
    assert mlm.iterations(_pretrain_gpt(checkout, alpaca, *LAYOUTS["tp2"], *recompute).stdout) == tp2_reference


def test_import_after_megatron_and_pypi_core_match(training_only, alpaca, tp2_reference):
    """The import after every megatron import, with PyPI's megatron-core under the checkout's
    megatron/training: the same losses, bit for bit, as the import first on the whole checkout."""
    first = tp2_reference
    proc = _pretrain_gpt(training_only, alpaca, *LAYOUTS["tp2"])
    assert "site-packages/megatron/core" in proc.stderr  # really PyPI's core (its warnings name the path)
    assert mlm.iterations(proc.stdout) == first


@pytest.fixture(scope="module")
def resumed(checkout, alpaca, tmp_path_factory):
    """TP=2 with Megatron-LM's default dropout (0.1): 10 iterations saving at 5 and 10, and the
    same run stopped at 5 then resumed."""
    root = tmp_path_factory.mktemp("resume")
    full, part = root / "full", root / "part"
    a = _pretrain_gpt(checkout, alpaca, *LAYOUTS["tp2"], "--save", full, "--save-interval", 5)
    _pretrain_gpt(checkout, alpaca, *LAYOUTS["tp2"], "--save", part, "--save-interval", 5, "--exit-interval", 5)
    c = _pretrain_gpt(checkout, alpaca, *LAYOUTS["tp2"], "--save", part, "--load", part, "--save-interval", 5)
    return {"full": full, "part": part, "log_full": a.stdout + a.stderr, "log_resumed": c.stdout + c.stderr}


@pytest.mark.full  # two more pretrain_gpt.py runs (saved and resumed) against the uninterrupted one
def test_resume_equals_uninterrupted_bit_for_bit(resumed):
    from converters.sources import open_megatron

    full, again = mlm.iterations(resumed["log_full"]), mlm.iterations(resumed["log_resumed"])
    assert sorted(again) == [6, 7, 8, 9, 10]
    assert resumed["log_full"].count(RNG_WARNING) == resumed["log_resumed"].count(RNG_WARNING) == 0
    for i in (6, 8, 9, 10):
        assert again[i] == full[i], (i, again[i], full[i])
    # Megatron-LM does not reset its loss accumulator on a process's first iteration
    # (training_log: "don't reset accumulators"), so after a resume iteration 7 logs the mean of 6 and 7
    assert again[7][1] == full[7][1] and abs(again[7][0] - (full[6][0] + full[7][0]) / 2) < 2e-6
    a, b = open_megatron(resumed["full"]), open_megatron(resumed["part"])
    compared = 0
    for name in ("embedding", "final_norm", "output"):
        assert torch.equal(a.get(name), b.get(name)), name
        compared += 1
    for layer in range(a.shape.num_layers):
        for name in ("input_norm", "qkv", "proj", "mlp_norm", "fc1", "fc2"):
            assert torch.equal(a.get(name, layer), b.get(name, layer)), (name, layer)
            compared += 1
    assert compared == 3 + 6 * 2


@pytest.mark.full  # uses the resumed run above
def test_checkpoint_of_pretrain_gpt_exports_to_hf(resumed, tmp_path):
    """converters.megatron_to_hf reads the checkpoint stock pretrain_gpt.py wrote (its
    arguments from common.pt, TP=2); transformers' logits equal the Megatron model's, fp32."""
    megatron_to_hf.main(["--input-model-dir", str(resumed["full"]), "--output-model-dir", str(tmp_path / "hf")])
    out = run_torchrun("converted_checks.py", 1, 1, "logits", resumed["full"], tmp_path / "hf", nproc=1)
    (err, scale), = json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:]).values()
    assert err < 1e-4 and scale > 1, (err, scale)


def test_simple_mcore_train_loop_example(checkout):
    proc = run_torchrun(str(checkout / "examples" / "run_simple_mcore_train_loop.py"), nproc=2, cwd=checkout,
                        env={"PYTHONPATH": f"{env_for_ranks()['PYTHONPATH']}:{checkout}"}, timeout=300)
    assert proc.count("Iteration 4:") == 2 and "Successfully loaded the model" in proc


def test_preprocess_data_tools_agree_and_cross_train(checkout, alpaca, tmp_path):
    """Megatron-LM's tools/preprocess_data.py and recipes.preprocess_data write the same token
    streams for the same input and tokenizer; Megatron-LM's output trains in recipes.pretrain
    (ours trains in pretrain_gpt.py above)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    theirs = tmp_path / "theirs"
    proc = subprocess.run([__import__("sys").executable, str(checkout / "tools" / "preprocess_data.py"), "--input",
                           str(alpaca["jsonl"]), "--output-prefix", str(theirs), "--tokenizer-type", "Llama2Tokenizer",
                           "--tokenizer-model", str(alpaca["tokenizer"]), "--append-eod", "--workers", "1"],
                          capture_output=True, text=True, cwd=checkout, env=env_for_ranks(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = IndexedDataset(f"{theirs}_text_document"), IndexedDataset(alpaca["ours"])
    assert len(a) == len(b) == 1724
    assert all(list(a[i]) == list(b[i]) for i in range(len(a)))
    assert open(f"{theirs}_text_document.bin", "rb").read() == open(alpaca["ours"] + ".bin", "rb").read()
    # the index differs only in Megatron-LM's document boundaries for the 3 empty responses,
    # which hold no sequence (this recipe skips and lists those rows instead)
    assert len(a.document_indices) == len(b.document_indices) + 3
    run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", f"{theirs}_text_document",
                 "--tokenizer-name-or-path", alpaca["tokenizer"], "--train-iters", 10, "--seq-length", 64,
                 "--metrics-file", tmp_path / "m.jsonl")
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "m.jsonl")]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses


def _serve(checkout, ckpt, tp, port, log):
    args = ["--num-layers", 5, "--hidden-size", 64, "--ffn-hidden-size", 172, "--num-attention-heads", 8,
            "--group-query-attention", "--num-query-groups", 4, "--seq-length", 512, "--max-position-embeddings", 512,
            *mlm.LLAMA, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", ckpt["tokenizer"],
            "--load", ckpt["path"], "--micro-batch-size", 1, "--port", port, "--make-vocab-size-divisible-by", 128,
            "--tensor-model-parallel-size", tp]
    cmd = torchrun_command(str(checkout / "tools" / "run_text_generation_server.py"), *args, nproc=tp)
    return subprocess.Popen(cmd, cwd=checkout, env=env_for_ranks(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _put(port, payload, deadline):
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


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.full)])
def test_text_generation_server_equals_recipes_generate(checkout, fixtures_dir, tmp_path, tp):
    """tools/run_text_generation_server.py serves a checkpoint from converters.hf_to_megatron;
    a real HTTP client gets the same greedy text as recipes.generate."""
    ckpt = tmp_path / "stories"
    hf_to_megatron.main(["--input-model-dir", str(fixtures_dir / "stories260K"), "--output-model-dir", str(ckpt)])
    prompts = ["Once upon a time", "The little dog"]
    ours = run_module("recipes.generate", "--load", ckpt, *sum((["--prompt", p] for p in prompts), []),
                      "--max-new-tokens", 24, "--greedy", "--output-json", tmp_path / "ours.json",
                      env={"MASTER_PORT": str(free_port())})
    assert ours.returncode == 0, ours.stderr[-3000:]
    expected = [p + r["text"] for p, r in zip(prompts, json.loads((tmp_path / "ours.json").read_text()))]
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = _serve(checkout, {"path": ckpt, "tokenizer": fixtures_dir / "stories260K"}, tp, port, log)
        try:
            reply = _put(port, {"prompts": prompts, "tokens_to_generate": 24, "top_k": 1}, time.time() + 240)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    assert reply["text"] == expected, (reply, expected, (tmp_path / "server.log").read_text()[-2000:])


@pytest.mark.full  # the built-in and the Megatron-LM engine run side by side
def test_recipe_engines_agree_and_megatron_lm_engine_checkpoints(checkout, alpaca, tmp_path):
    """recipes.pretrain --megatron-lm runs stock pretrain_gpt.py with the size table written as
    its flags (printed); from the same checkpoint both engines build the same parameters per
    rank and compute the same first-step loss; the stock loop saves its own checkpoints."""
    common = ["--model", "llama2-tiny", "--data-path", alpaca["ours"], "--tokenizer-name-or-path",
              alpaca["tokenizer"], "--seq-length", 64, "--tensor-model-parallel-size", 2, "--log-interval", 1]
    run_torchrun("recipes.pretrain", *common, "--train-iters", 2, "--save", tmp_path / "init")
    builtin = run_torchrun("recipes.pretrain", *common, "--train-iters", 1, "--load", tmp_path / "init", "--finetune",
                           "--metrics-file", tmp_path / "builtin.jsonl")
    stock = run_torchrun("recipes.pretrain", *common, "--train-iters", 6, "--load", tmp_path / "init", "--finetune",
                         "--megatron-lm", checkout, "--save", tmp_path / "stock", "--save-interval", 3)
    assert "Megatron-LM: python " in stock and "--num-layers 2 --hidden-size 64 --ffn-hidden-size 176" in stock
    ours_params = int(re.search(r"parameters: ([\d,]+) on rank 0", builtin).group(1).replace(",", ""))
    theirs_params = int(re.search(r"number of parameters on \(tensor, pipeline\) model parallel rank \(0, 0\): (\d+)",
                                  stock).group(1))
    assert ours_params == theirs_params
    first_ours = json.loads(open(tmp_path / "builtin.jsonl").readline())["loss"]
    it = mlm.iterations(stock)
    assert abs(it[1][0] - first_ours) / first_ours < 1e-6, (it[1], first_ours)  # Megatron-LM logs 7 digits
    assert it[6][0] < it[1][0]
    assert (tmp_path / "stock" / "iter_0000003").is_dir() and (tmp_path / "stock" / "iter_0000006").is_dir()


def test_stock_convert_py_writes_what_our_converter_writes(checkout, fixtures_dir, tmp_path, single_process_group):
    """tools/checkpoint/convert.py (llama_mistral -> core, --saver-transformer-impl local) runs with
    the import (the patches answer its Transformer Engine check and its missing data-parallel and
    pipeline groups, and fix its transformers 5.x check and legacy norm flag); its weights equal,
    tensor for tensor, those of converters.hf_to_megatron loaded into megatron's GPTModel."""
    from recipes.infer import inference

    hf = fixtures_dir / "stories260K"
    proc = subprocess.run(mlm.convert_command(checkout, hf, tmp_path / "stock"), capture_output=True, text=True,
                          cwd=checkout, env=env_for_ranks(), timeout=600)
    assert proc.returncode == 0 and "Done!" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    stock = torch.load(tmp_path / "stock" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt",
                       map_location="cpu", weights_only=False)["model"]  # a file this test just wrote
    hf_to_megatron.main(["--input-model-dir", str(hf), "--output-model-dir", str(tmp_path / "ours")])
    ours = {k: v for k, v in inference.load(str(tmp_path / "ours"), 1, 1).model.state_dict().items()
            if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    stock = {k: v for k, v in stock.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    assert sorted(stock) == sorted(ours)
    differ = [k for k in ours if not torch.equal(ours[k].float(), stock[k].float())]
    assert differ == [], differ
