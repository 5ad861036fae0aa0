"""Temp copies of the Megatron-LM checkout (read-only in shared/) for the tests, with the one
line a user adds, and the pieces of its logs the tests read."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.helpers.launch import THIRD_PARTY

SOURCE = THIRD_PARTY / "Megatron-LM"
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


def copy_checkout(dest: Path, with_core: bool = True, import_where: str = "first") -> Path:
    """A writable copy: the whole checkout (its own megatron/core, helpers built), or its
    megatron/training etc. without megatron/core, to run on PyPI's megatron-core."""
    shutil.copytree(SOURCE, dest, ignore=shutil.ignore_patterns("tests", "__pycache__", "*.so"))
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
