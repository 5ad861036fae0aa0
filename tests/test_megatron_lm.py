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
import re
import subprocess

import pytest
import torch

from converters import hf_to_megatron, megatron_to_hf
from tests.conftest import emulated_npu_env
from tests.helpers import megatron_lm as mlm
from tests.helpers.launch import env_for_ranks, run_torchrun

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
    return mlm.alpaca_pretraining_text(tmp_path_factory.mktemp("alpaca"), fixtures_dir)


def _pretrain_gpt(root, data, *extra, nproc=2, iters=10, check=True, env=None):
    proc = mlm.pretrain_gpt(root, data, *extra, nproc=nproc, iters=iters, env=env)
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


@pytest.fixture(scope="module")
def trained(checkout, alpaca):
    """{layout: log} of 10 iterations per layout, run once on first use."""
    logs = {}

    def get(layout):
        if layout not in logs:
            proc = _pretrain_gpt(checkout, alpaca, *LAYOUTS[layout])
            logs[layout] = proc.stdout + proc.stderr
        return logs[layout]
    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pretrain_gpt_trains(trained, layout):
    log = trained(layout)
    it = mlm.iterations(log)
    assert sorted(it) == list(range(1, 11)), log[-3000:]
    assert it[10][0] < it[1][0] - 0.5, it  # loss falls
    assert log.count(RNG_WARNING) == 0


@pytest.mark.full  # default CI runs core_v0.19.0's at DP=2 (the Python 3.12 job)
@pytest.mark.parametrize("layout", ["dp2_distopt", "tp2_distopt"])
def test_distributed_optimizer_resume_equals_uninterrupted(checkout, alpaca, trained, tmp_path, layout):
    """--use-distributed-optimizer without Apex or TE, dropout 0.1: stopped by --exit-interval 5 and
    resumed, iterations 6-10 equal the uninterrupted run's (saving does not change a run: the
    uninterrupted one saves nothing).  Unpatched, the resume asserts in the optimizer's state_dict;
    with that alone fixed, the loaded Adam step is 0 and then advances once per parameter."""
    extra = ["--tensor-model-parallel-size", 2] if layout == "tp2_distopt" else []
    full = mlm.iterations(trained("dp2_distopt") if not extra else
                          _pretrain_gpt(checkout, alpaca, *LAYOUTS["dp2_distopt"], *extra).stdout)
    save = ["--save", tmp_path, "--save-interval", 5]
    _pretrain_gpt(checkout, alpaca, *LAYOUTS["dp2_distopt"], *extra, *save, "--exit-interval", 5)
    resumed = _pretrain_gpt(checkout, alpaca, *LAYOUTS["dp2_distopt"], *extra, *save, "--load", tmp_path)
    assert mlm.resume_mismatches(full, mlm.iterations(resumed.stdout), start=5, end=10) == []


@pytest.fixture(scope="module")
def tp2_reference(trained):
    return mlm.iterations(trained("tp2"))


def test_pretrain_gpt_on_the_emulated_npu_gives_the_cpus_losses(checkout, alpaca, tmp_path):
    """Stock pretrain_gpt.py on the emulated NPU device at TP=2, with what an Ascend user's script
    sets: CUDA_DEVICE_MAX_CONNECTIONS=1 (MindSpeed-LLM's scripts export it) and
    --no-gradient-accumulation-fusion (stock refuses the flag without Apex's CUDA kernel).  Dropout
    off, so the device's own generator does not enter: every loss and grad norm equals the CPU
    backend's (1e-5 relative: Megatron-LM logs 7 digits).  Each rank's emulated kernels ran, and
    they take npu tensors only: the model and its batches were on the device."""
    flags = [*LAYOUTS["tp2"], "--no-gradient-accumulation-fusion", "--hidden-dropout", 0, "--attention-dropout", 0]
    cpu = mlm.iterations(_pretrain_gpt(checkout, alpaca, *flags, iters=6).stdout)
    report = tmp_path / "kernels.jsonl"
    env = emulated_npu_env(CUDA_DEVICE_MAX_CONNECTIONS="1", EMULATED_NPU_REPORT=str(report))
    npu = mlm.iterations(_pretrain_gpt(checkout, alpaca, *flags, iters=6, env=env).stdout)
    assert sorted(npu) == list(range(1, 7)) and mlm.loss_mismatches(npu, cpu, rtol=1e-5) == [], (npu, cpu)
    ranks = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["device"] for r in ranks), ranks
    assert all(r["calls"]["npu_rms_norm"] > 0 and r["calls"]["npu_fusion_attention"] > 0 for r in ranks), ranks


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
    assert resumed["log_full"].count(RNG_WARNING) == resumed["log_resumed"].count(RNG_WARNING) == 0
    assert mlm.resume_mismatches(full, again, start=5, end=10) == []
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


# Context parallelism: the ring refuses attention dropout, and hidden dropout draws its masks per
# rank (a token's mask differs between layouts), so these runs set both to 0.
NO_DROPOUT = ["--attention-dropout", 0, "--hidden-dropout", 0]
CP_LAYOUTS = {"cp1": [], "cp2": ["--context-parallel-size", 2], "tp2": ["--tensor-model-parallel-size", 2],
              "cp2_a2a": ["--context-parallel-size", 2, "--cp-comm-type", "a2a"],
              "tp2_cp2": ["--tensor-model-parallel-size", 2, "--context-parallel-size", 2]}


@pytest.fixture(scope="module")
def cp_runs(checkout, alpaca):
    """{layout: iterations} of 10 iterations per context-parallel layout (the same global batch
    of 4: DP=2 at CP=1, DP=1 at CP=2 and at TP=2), run once on first use."""
    runs = {}

    def get(layout):
        if layout not in runs:
            nproc = 4 if layout == "tp2_cp2" else 2
            runs[layout] = mlm.iterations(_pretrain_gpt(checkout, alpaca, *NO_DROPOUT, *CP_LAYOUTS[layout],
                                                        nproc=nproc).stdout)
        return runs[layout]
    return get


# CI time: core_v0.16.1's CP runs are in the full tier; default CI runs core_v0.19.0's pretrain_gpt.py at CP=2
# against CP=1 and its CP resume (the Python 3.12 job), and the recipe's ring and Ulysses (test_context_parallel)
@pytest.mark.parametrize("layout,reference", [pytest.param("cp2", "cp1", marks=pytest.mark.full),
                                              pytest.param("cp2_a2a", "cp1", marks=pytest.mark.full),
                                              pytest.param("tp2_cp2", "tp2", marks=pytest.mark.full)])
def test_context_parallel_losses_equal_cp1(cp_runs, layout, reference):
    """--context-parallel-size 2 with the local layer spec, which stock megatron-core refuses
    without Transformer Engine: megatron's own CP data split, RoPE positions and loss reduction
    around this package's ring attention (--cp-comm-type p2p, the default) and Ulysses (a2a).  fp32, 10 iterations; tolerance 1e-5 relative: the
    runs differ in the order of floating-point sums only (the log's 7 digits agree here).  TP=2
    initialises other weights than TP=1, so TP2 x CP2 (4 ranks) is held to TP=2 alone."""
    ref, got = cp_runs(reference), cp_runs(layout)
    assert sorted(ref) == list(range(1, 11)) and ref[10][0] < ref[1][0] - 0.5, ref
    assert mlm.loss_mismatches(got, ref, rtol=1e-5) == []


@pytest.mark.full  # core_v0.19.0's resume at CP=2 runs in default CI (the Python 3.12 job)
def test_context_parallel_resume_equals_uninterrupted(checkout, alpaca, cp_runs, tmp_path):
    """CP=2 stopped by --exit-interval 5 and resumed: iterations 6-10 equal the uninterrupted run."""
    save = ["--save", tmp_path, "--save-interval", 5]
    _pretrain_gpt(checkout, alpaca, *NO_DROPOUT, *CP_LAYOUTS["cp2"], *save, "--exit-interval", 5)
    resumed = _pretrain_gpt(checkout, alpaca, *NO_DROPOUT, *CP_LAYOUTS["cp2"], *save, "--load", tmp_path)
    assert mlm.resume_mismatches(cp_runs("cp2"), mlm.iterations(resumed.stdout), start=5, end=10) == []


def test_simple_mcore_train_loop_example(checkout):
    proc = run_torchrun(str(checkout / "examples" / "run_simple_mcore_train_loop.py"), nproc=2, cwd=checkout,
                        env={"PYTHONPATH": f"{env_for_ranks()['PYTHONPATH']}:{checkout}"}, timeout=300)
    assert proc.count("Iteration 4:") == 2 and "Successfully loaded the model" in proc


def test_preprocess_data_tools_agree_and_cross_train(checkout, alpaca, tmp_path):
    """Megatron-LM's tools/preprocess_data.py and recipes.preprocess_data write the same token
    streams for the same input and tokenizer; Megatron-LM's output trains in recipes.pretrain
    (ours trains in pretrain_gpt.py above)."""
    theirs = mlm.preprocess_with_tools(checkout, alpaca, tmp_path / "theirs")
    run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", theirs,
                 "--tokenizer-name-or-path", alpaca["tokenizer"], "--train-iters", 10, "--seq-length", 64,
                 "--metrics-file", tmp_path / "m.jsonl")
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "m.jsonl")]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.full)])
def test_text_generation_server_equals_recipes_generate(checkout, fixtures_dir, tmp_path, tp):
    """tools/run_text_generation_server.py serves a checkpoint from converters.hf_to_megatron;
    a real HTTP client gets the same greedy text as recipes.generate."""
    served, expected, log = mlm.server_and_recipes_generate(checkout, fixtures_dir / "stories260K", tmp_path, tp)
    assert served == expected, (served, expected, log[-2000:])


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
