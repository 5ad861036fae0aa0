"""Stock Megatron-LM core_v0.19.0 (``shared/third_party/Megatron-LM-core_v0.19.0``) with one
added line, ``import ascend_patches``, on megatron-core 0.19.x: its example training loop at 2
ranks and, on Python >= 3.12 (its megatron/training imports ``typing.override``), its own
``pretrain_gpt.py`` at TP=2 with the distributed optimizer, at DP=2 with it and at PP=2 (GQA,
Megatron-LM's default dropout 0.1), an exact resume after ``--exit-interval``, its
``tools/preprocess_data.py`` against ``recipes.preprocess_data`` both ways, and its text
generation server on a checkpoint of ``converters.hf_to_megatron``.  .ci/run's Python 3.12
job runs them on torch 2.14.1 and megatron-core 0.19.2 as pip installs them.

The scripts run on PyPI's megatron-core under the checkout's megatron/training (the tree's
own core differs from 0.19.2 in five files; see shared/third_party/README.md), with the flags
a GPU user without Transformer Engine writes: nothing CPU-specific.
"""

import importlib.metadata as md
import json
import shutil
import sys

import pytest

from tests.conftest import emulated_npu_env
from tests.helpers import megatron_lm as mlm
from tests.helpers.launch import env_for_ranks, run_torchrun

TREE = mlm.SOURCE_CORE_V0_19

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not md.version("megatron-core").startswith("0.19."),
                       reason="core_v0.19.0's scripts run on megatron-core 0.19.x (.ci/run's Python 3.12 job)"),
    pytest.mark.skipif(not TREE.is_dir(), reason="the core_v0.19.0 checkout is not beside the repository"),
]
needs_312 = pytest.mark.skipif(sys.version_info < (3, 12), reason="core_v0.19.0's megatron/training imports "
                               "typing.override (Python >= 3.12): .ci/run's Python 3.12 job runs this")


def test_simple_mcore_train_loop_example_core_v0_19(tmp_path):
    """The example as shipped, plus the import as its first line; megatron.core is the installed
    0.19 release (the checkout's own core differs from PyPI's 0.19.2 in five files)."""
    script = tmp_path / "run_simple_mcore_train_loop.py"
    shutil.copy(TREE / "examples" / "run_simple_mcore_train_loop.py", script)
    mlm.add_import(script, "first")
    proc = run_torchrun(str(script), nproc=2, cwd=tmp_path, env={"PYTHONPATH": env_for_ranks()["PYTHONPATH"]},
                        timeout=300)
    assert proc.count("Iteration 4:") == 2 and "Successfully loaded the model" in proc


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """core_v0.19.0's megatron/training, tools and scripts over PyPI's megatron-core, the import
    after every megatron import of pretrain_gpt.py (first in the tools)."""
    return mlm.copy_checkout(tmp_path_factory.mktemp("mlm19") / "Megatron-LM", with_core=False,
                             import_where="after", source=TREE)


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory, fixtures_dir):
    return mlm.alpaca_pretraining_text(tmp_path_factory.mktemp("alpaca19"), fixtures_dir)


LAYOUTS = {
    "tp2_distopt": ["--tensor-model-parallel-size", 2, "--use-distributed-optimizer"],
    "dp2_distopt": ["--use-distributed-optimizer"],
    "pp2": ["--pipeline-model-parallel-size", 2],
}


def _run(checkout, alpaca, layout, *extra):
    proc = mlm.pretrain_gpt(checkout, alpaca, *LAYOUTS[layout], *extra)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return mlm.iterations(log)


@pytest.fixture(scope="module")
def uninterrupted(checkout, alpaca, tmp_path_factory):
    """{layout: {iteration: (loss, grad norm)}}: 10 iterations, saving at 5 and 10 (as the
    resumed runs do), run once per layout on first use."""
    runs = {}

    def get(layout):
        if layout not in runs:
            save = tmp_path_factory.mktemp(f"full_{layout}")
            runs[layout] = _run(checkout, alpaca, layout, "--save", save, "--save-interval", 5)
        return runs[layout]
    return get


@needs_312
def test_pretrain_gpt_on_the_emulated_npu_gives_the_cpus_losses(checkout, alpaca, tmp_path):
    """core_v0.19.0's pretrain_gpt.py on the emulated NPU device at TP=2 with the distributed
    optimizer, as tests/test_megatron_lm.py runs core_v0.16.1's (an Ascend user's
    CUDA_DEVICE_MAX_CONNECTIONS=1 and --no-gradient-accumulation-fusion; dropout off): the CPU
    backend's losses and grad norms (1e-5 relative), and every rank's kernels ran on npu tensors."""
    flags = [*LAYOUTS["tp2_distopt"], "--no-gradient-accumulation-fusion", "--hidden-dropout", 0,
             "--attention-dropout", 0]
    report = tmp_path / "kernels.jsonl"
    cpu, npu = ({}, {})
    for env, out in ((None, cpu), (emulated_npu_env(CUDA_DEVICE_MAX_CONNECTIONS="1", EMULATED_NPU_REPORT=str(report)),
                                   npu)):
        proc = mlm.pretrain_gpt(checkout, alpaca, *flags, iters=6, env=env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        out.update(mlm.iterations(proc.stdout + proc.stderr))
    assert sorted(npu) == list(range(1, 7)) and mlm.loss_mismatches(npu, cpu, rtol=1e-5) == [], (npu, cpu)
    ranks = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["device"] for r in ranks), ranks
    assert all(r["calls"]["npu_rms_norm"] > 0 and r["calls"]["npu_fusion_attention"] > 0 for r in ranks), ranks


@needs_312
@pytest.mark.parametrize("layout", ["tp2_distopt", "pp2"])
def test_pretrain_gpt_learns(uninterrupted, layout):
    it = uninterrupted(layout)
    assert sorted(it) == list(range(1, 11)), it
    assert it[10][0] < it[1][0] - 0.5, it  # the loss falls


@needs_312
@pytest.mark.parametrize("layout", [
    pytest.param("tp2_distopt", marks=pytest.mark.full),  # the same resume; dp2 shards the optimizer, TP=2 does not
    "dp2_distopt"])
def test_resume_after_exit_interval_equals_uninterrupted(checkout, alpaca, uninterrupted, tmp_path, layout):
    """Stopped by ``--exit-interval 5`` and resumed with ``--load``: iterations 6-10 equal the
    uninterrupted run's (dropout on: the RNG state; the distributed optimizer's Adam state and
    step: megatron's no-Apex branch, patched)."""
    full = uninterrupted(layout)
    save = ["--save", tmp_path, "--save-interval", 5]
    assert sorted(_run(checkout, alpaca, layout, *save, "--exit-interval", 5)) == [1, 2, 3, 4, 5]
    resumed = _run(checkout, alpaca, layout, *save, "--load", tmp_path)
    assert mlm.resume_mismatches(full, resumed, start=5, end=10) == []


NO_DROPOUT = ["--attention-dropout", 0, "--hidden-dropout", 0]  # the ring refuses attention dropout; hidden
# dropout draws its masks per rank, so a token's mask differs between CP layouts


@pytest.fixture(scope="module")
def cp_runs(checkout, alpaca):
    """{CP size: iterations}: 10 iterations with the distributed optimizer and the same global
    batch (DP=2 at CP=1, DP=1 at CP=2), run once per size on first use."""
    runs = {}

    def get(cp):
        if cp not in runs:
            runs[cp] = _run(checkout, alpaca, "dp2_distopt", *NO_DROPOUT, "--context-parallel-size", cp)
        return runs[cp]
    return get


@needs_312
def test_context_parallel_equals_cp1(cp_runs):
    """core_v0.19.0's pretrain_gpt.py --transformer-impl local --context-parallel-size 2, which stock
    megatron-core refuses without Transformer Engine: losses equal CP=1's to 1e-5 relative, grad
    norms in the logged digits (fp32; the runs differ in the order of sums only)."""
    cp1, cp2 = cp_runs(1), cp_runs(2)
    assert sorted(cp1) == list(range(1, 11)) and cp1[10][0] < cp1[1][0] - 0.5, cp1
    assert mlm.loss_mismatches(cp2, cp1, rtol=1e-5) == []


@needs_312
def test_context_parallel_resume_equals_uninterrupted(checkout, alpaca, cp_runs, tmp_path):
    save = ["--save", tmp_path, "--save-interval", 5]
    cp2 = [*NO_DROPOUT, "--context-parallel-size", 2]
    assert sorted(_run(checkout, alpaca, "dp2_distopt", *cp2, *save, "--exit-interval", 5)) == [1, 2, 3, 4, 5]
    resumed = _run(checkout, alpaca, "dp2_distopt", *cp2, *save, "--load", tmp_path)
    assert mlm.resume_mismatches(cp_runs(2), resumed, start=5, end=10) == []


@needs_312
@pytest.mark.full  # a killed run and a resume; the chaos test kills the built-in engine in default CI
def test_kill_during_async_save_leaves_the_last_complete_checkpoint(checkout, alpaca, uninterrupted, tmp_path):
    """--ckpt-format torch_dist --async-save, saving every 3 with the distributed optimizer: the
    whole launch SIGKILLed as iteration 7 is logged (the save of 6 in flight or just done).
    "latest" names a complete checkpoint, and the resume from it equals the uninterrupted run."""
    from recipes.model import checkpointing

    layout = [*LAYOUTS["tp2_distopt"], "--ckpt-format", "torch_dist", "--async-save", "--save-interval", 3]
    mlm.pretrain_gpt_killed_at(checkout, alpaca, "iteration        7/", *layout, "--train-iters", 10,
                               "--save", tmp_path)
    last = checkpointing.latest_iteration(tmp_path)
    assert last in (3, 6), last
    folder = tmp_path / f"iter_{last:07d}"
    assert (folder / ".metadata").is_file() and (folder / "metadata.json").is_file(), sorted(folder.iterdir())
    resumed = _run(checkout, alpaca, "tp2_distopt", "--ckpt-format", "torch_dist", "--async-save", "--save-interval", 3,
                   "--save", tmp_path, "--load", tmp_path)
    full = uninterrupted("tp2_distopt")
    assert mlm.resume_mismatches(full, resumed, start=last, end=10) == []


@needs_312
def test_preprocess_data_tools_agree_both_ways(checkout, alpaca, tmp_path):
    """core_v0.19.0's tools/preprocess_data.py and recipes.preprocess_data write the same token
    streams; its output trains in recipes.pretrain (ours trains in pretrain_gpt.py above)."""
    theirs = mlm.preprocess_with_tools(checkout, alpaca, tmp_path / "theirs")
    run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", theirs, "--tokenizer-name-or-path",
                 alpaca["tokenizer"], "--train-iters", 10, "--seq-length", 64, "--metrics-file", tmp_path / "m.jsonl")
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "m.jsonl")]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses


# core_v0.19.0's tools/run_text_generation_server.py reads an argument its parser does not define
# (--inference-max-seq-length's dest is inference_max_seq_length): the script stops with
# AttributeError before it serves, on any device.  The test's copy gets that one name right.
SERVER_FIX = ("args.inference_max_sequence_length", "args.inference_max_seq_length")


@needs_312
def test_text_generation_server_equals_recipes_generate(checkout, fixtures_dir, tmp_path):
    """core_v0.19.0's tools/run_text_generation_server.py (on megatron.core.inference's static
    engine and MegatronServer) serves a converted checkpoint; PUT /api's greedy text equals
    recipes.generate's.  Its replies carry per-token segments, which megatron's tokenizers
    compute with sentencepiece's decode_ids_as_immutable_proto (refused from sentencepiece 0.2.2,
    gone in 0.2.3: the megatron-lm extra keeps sentencepiece below 0.2.2) or an HF tokenizer's
    offsets (which megatron's HuggingFaceTokenizer lacks), so it is served with --tokenizer-type
    Llama2Tokenizer.  It never puts BOS before a prompt (its PUT handler reads add_BOS, and
    run_mcore_engine is called without it), so recipes.generate runs with --no-bos."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(fixtures_dir / "stories260K" / "tokenizer.model"))
    try:
        sp.decode_ids_as_immutable_proto([1, 2])
    except (AttributeError, ValueError) as e:
        pytest.fail(f"sentencepiece {sentencepiece.__version__}: {e}; core_v0.19.0's server calls "
                    "decode_ids_as_immutable_proto for every reply: pip install -e '.[megatron-lm]' "
                    "(sentencepiece<0.2.2)")
    script = checkout / "tools" / "run_text_generation_server.py"
    text = script.read_text()
    assert SERVER_FIX[0] in text, "upstream fixed its argument name: drop SERVER_FIX"
    script.write_text(text.replace(*SERVER_FIX))
    served, expected, log = mlm.server_and_recipes_generate(checkout, fixtures_dir / "stories260K", tmp_path, 1,
                                                            tokenizer="Llama2Tokenizer", generate_flags=["--no-bos"])
    assert served == expected, (served, expected, log[-2000:])


def test_no_python_version_file_in_copies(tmp_path):
    """pyenv reads ``.python-version`` in a folder and its parents: the copy must not carry the
    tree's "3.12", or ``make`` in the copy would run another Python's ``python3-config``."""
    assert (TREE / ".python-version").is_file()  # the reason for the rule is still there
    copy = mlm.copy_checkout(tmp_path / "Megatron-LM", with_core=False, source=TREE)
    assert not (copy / ".python-version").exists()


@needs_312
@pytest.mark.full  # CI time: ~90 s in the 3.12 job; the recipe's document masking: test_packing
def test_inter_document_masking_runs_thd_and_equals_megatrons_document_masks(checkout, alpaca):
    """``--dataloader-inter-document-masking`` with the local layer spec: the dataset returns
    cu_seqlens at document boundaries and the batch reaches the model as THD, which stock
    Megatron-Core serves only with Transformer Engine (its fused THD RoPE, then
    DotProductAttention's ``packed_seq_params is None``).  Under the import it trains at TP=2
    with RoPE; and with positions out of the picture (``--position-embedding-type none``,
    dropout 0) its losses equal Megatron-LM's own document masks (``--reset-position-ids
    --reset-attention-mask``) through stock DotProductAttention (the flash-attention patch off),
    to 1e-5 relative over 6 iterations: the same documents, each attending to itself alone."""
    losses = _run(checkout, alpaca, "tp2_distopt", "--dataloader-inter-document-masking", "--train-iters", 6)
    assert len(losses) == 6 and losses[6][0] < losses[1][0] - 0.2, losses
    nope = ["--position-embedding-type", "none", "--attention-dropout", 0, "--hidden-dropout", 0,
            "--tensor-model-parallel-size", 2]
    thd = mlm.pretrain_gpt(checkout, alpaca, "--dataloader-inter-document-masking", *nope, iters=6)
    masks = mlm.pretrain_gpt(checkout, alpaca, "--reset-position-ids", "--reset-attention-mask", *nope, iters=6,
                             env=dict(env_for_ranks(), ASCEND_PATCHES_DISABLE="flash_attention"))
    runs = []
    for proc in (thd, masks):
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-6000:]
        runs.append(mlm.iterations(log))
    assert len(runs[0]) == 6 and all(abs(runs[0][i][0] - runs[1][i][0]) <= 1e-5 * runs[1][i][0] for i in runs[1]), runs
