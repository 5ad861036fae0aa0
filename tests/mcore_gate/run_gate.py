"""Megatron-Core's own unit tests as a compatibility gate: a named list of test files from a
temp copy of ``shared/third_party/Megatron-LM/tests`` (or, with ``--tree core_v0.19.0``, of the
core_v0.19.0 tree's, with ``expected_core_v0.19.0.json``) run against the installed megatron-core
with ascend_patches, each at the world size it was written for (gloo ranks under torchrun),
and their per-test outcomes compared with ``expected.json``.

    python tests/mcore_gate/run_gate.py --mode cpu [--tier ci|extended|all]
        [--files tensor_parallel/test_mappings.py ...] [--record] [--table]

Tiers: ``ci`` (``tests/test_mcore_gate.py``, in the CI run: the files written for at most 2
ranks, one session) and ``extended``: the 8-rank files, one torchrun session per file, about
30 minutes on 2 cores (``expected.json`` says why for each); run them with ``--tier
extended``.  Nothing is dropped: every listed file is in one tier.

Modes: ``cpu`` (ascend_patches on the CPU backend), ``cuda_queries`` (the same, with
``ASCEND_PATCHES_ANSWER_CUDA_QUERIES=1`` so the tests' ``torch.cuda.is_available()`` skips
do not skip), ``npu`` (the emulated NPU backend, with the same answers: what torch_npu's
``transfer_to_npu`` gives on an Ascend host), ``none`` (without ascend_patches).

A test that newly fails (or errors) against the expected outcome fails the gate, and so does one
that passed and is now skipped or deselected (it no longer runs); one that newly passes is listed, so ``expected.json`` is tightened (``--record`` rewrites the mode).
The harness edits below are made on the temp copy only, and listed in every report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
THIRD_PARTY = ROOT.parent / "shared" / "third_party"
# each Megatron-LM tree's tests, with the outcomes recorded for them (run against the megatron-core
# release of that tag: 0.16.1 on Python 3.11 / torch 2.13; 0.19.2 for core_v0.19.0, recorded per
# stack: on Python 3.11 / torch 2.13 with 0.19.2 installed past its Requires-Python, and on Python
# 3.12 / torch 2.14, the stack pip resolves for 0.19.2 (.ci/run's Python 3.12 job))
_STACK_312 = sys.version_info >= (3, 12)
TREES = {"core_v0.16.1": (THIRD_PARTY / "Megatron-LM" / "tests", HERE / "expected.json"),
         "core_v0.19.0": (THIRD_PARTY / "Megatron-LM-core_v0.19.0" / "tests",
                          HERE / ("expected_core_v0.19.0_py312.json" if _STACK_312 else "expected_core_v0.19.0.json"))}
TREE = "core_v0.16.1"
SOURCE, EXPECTED = TREES[TREE]


def use_tree(name: str) -> None:
    """Point the gate at another Megatron-LM tree's tests and its expected outcomes."""
    global TREE, SOURCE, EXPECTED
    TREE = name
    SOURCE, EXPECTED = TREES[name]


MODES = ("cpu", "cuda_queries", "npu", "none")

# (file under tests/, text, replacement, why, modes it applies to)
HARNESS_EDITS = [
    ("unit_tests/conftest.py", ("download_and_extract_asset(assets_dir=str(data_path))",  # core_v0.16.1
                                "download_and_extract_asset(assets_dir=data_path)"),  # core_v0.19.0
     'raise ImportError("offline: the gate does not download /opt/data")',
     "its session fixture downloads test data to /opt/data; no network here (the tests that need the data skip)",
     MODES),
    ("unit_tests/test_utilities.py", "torch.cuda.set_device(Utils.rank % torch.cuda.device_count())",
     "torch.cuda.set_device(Utils.rank % max(1, torch.cuda.device_count()))",
     "rank % device_count() divides by zero where device_count() is 0 (the CPU, truthfully)",
     ("cpu", "none")),
]
_FP8_STAND_IN = ("def check_fp8_support():  # the gate's stand-in (run_gate.HARNESS_EDITS): no Transformer Engine\n"
                 "    return False, 'FP8 needs Transformer Engine, which is not installed here'")
_ATTENTION_FA_CHECK = ("from megatron.core.utils import is_te_min_version\n"
                       "from megatron.core.transformer.attention import is_fa_min_version  # the gate's edit")
# edits for one tree's files only: (file, text, replacement, why, modes)
TREE_HARNESS_EDITS = {"core_v0.19.0": [
    (f, "from transformer_engine.pytorch.fp8 import check_fp8_support", _FP8_STAND_IN,
     "imports Transformer Engine's check_fp8_support at module level, so without TE no test in the file is collected; "
     "a stand-in answers (False, 'FP8 needs Transformer Engine...') and the FP8 cases skip themselves on it, as on a "
     "GPU without FP8", MODES)
    for f in ("unit_tests/inference/engines/test_dynamic_engine.py",
              "unit_tests/inference/text_generation_controllers/test_text_generation_controller.py")] + [
    (f, "from megatron.core.utils import is_fa_min_version, is_te_min_version", _ATTENTION_FA_CHECK,
     "its dynamic-batching tests skip unless flash-attn >= 2.7.3 is installed, the check attention.py makes before a "
     "dynamic batch; they ask attention.py's is_fa_min_version instead, which ascend_patches answers for the paged "
     "attention that runs in flash-attn's place (without ascend_patches it is megatron.core.utils' own)", MODES)
    for f in ("unit_tests/inference/engines/test_dynamic_engine.py",
              "unit_tests/inference/text_generation_controllers/test_text_generation_controller.py")]}


# what the pytest plugin (gate_plugin.py) does between tests, listed with the edits
PLUGIN_EDITS = [
    "gate_plugin.py: after each test, destroys megatron's num-microbatches calculator, as the tests' own teardown "
    "does when they pass (one that fails before it, e.g. on a missing Transformer Engine, leaves it initialized, "
    "and every later test in the session asserts on it)",
    "gate_plugin.py: after each test that tore megatron's model parallelism down, destroys the process groups made "
    "since (megatron drops them undestroyed; on gloo each keeps threads and sockets, and 8-rank files ran out of "
    "both: ~950 threads per rank, 'Connection reset by peer')",
    "gate_plugin.py: gives each rank a pytest basetemp inside the session's folder, so the checkpoint folder the "
    "tests share (basetemp's grandparent / tmp_dist_ckpt) is the session's own, not /tmp/pytest-of-<user>/"
    "tmp_dist_ckpt, which any other pytest on the machine deletes",
]


def load_expected() -> dict:
    """The tree's expected outcomes; a tree with none recorded yet takes the file list (tiers,
    world sizes) of the core_v0.16.1 record, for the files it has."""
    if EXPECTED.is_file():
        return json.loads(EXPECTED.read_text())
    base = json.loads(TREES["core_v0.16.1"][1].read_text())["files"]
    return {"files": {f: s for f, s in base.items() if (SOURCE / "unit_tests" / f).is_file()}, "modes": {}}


def copy_tests(dest: Path, mode: str) -> list:
    """The third-party tests in a temp folder, with this mode's harness edits; the edits made.
    The checkout's megatron packages other than megatron/core come along (the tests' helpers
    import megatron.training): megatron is a namespace package, so they sit beside the
    installed megatron-core, which is what runs."""
    shutil.copytree(SOURCE, dest / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for package in (SOURCE.parent / "megatron").iterdir():
        if package.is_dir() and package.name != "core":
            shutil.copytree(package, dest / "megatron" / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    made = []
    for rel, old, new, why, modes in HARNESS_EDITS + TREE_HARNESS_EDITS.get(TREE, []):
        if mode not in modes:
            continue
        path = dest / "tests" / rel
        text = path.read_text()
        found = [o for o in ((old,) if isinstance(old, str) else old) if o in text]
        if not found:
            raise SystemExit(f"harness edit for {rel} no longer applies (upstream changed): {old!r}")
        path.write_text(text.replace(found[0], new))
        made.append(f"{rel}: {why}")
    return made


TYPING_OVERRIDE_EDIT = ("gate_plugin.py: on Python < 3.12, provides typing.override (PEP 698: at run time it only "
                        "sets __override__ on the method) before the tests import megatron.training, whose "
                        "core_v0.19.0 models/ import it; the tests' conftest imports megatron.training")


def _needs_typing_override() -> bool:
    return SOURCE == TREES["core_v0.19.0"][0] and sys.version_info < (3, 12)


def mode_env(mode: str, out: Path, work: Path) -> dict:
    env = dict(os.environ, GATE_MODE=mode, GATE_OUT=str(out), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(work), str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if _needs_typing_override():
        env["GATE_TYPING_OVERRIDE"] = "1"
    for k in ("ASCEND_PATCHES_BACKEND", "ASCEND_PATCHES_ANSWER_CUDA_QUERIES", "ASCEND_PATCHES_DISABLE"):
        env.pop(k, None)
    if mode in ("cuda_queries", "npu"):
        env["ASCEND_PATCHES_ANSWER_CUDA_QUERIES"] = "1"
    if mode == "npu":
        env["ASCEND_PATCHES_BACKEND"] = "npu"
        env["PYTHONPATH"] += os.pathsep + str(ROOT / "tests" / "npu_emulation")
    return env


def run_group(targets, world: int, mode: str, work: Path, timeout_s: int, deselect=()) -> dict:
    """One torchrun session of pytest over ``targets`` (files, or ``file::test`` node ids) at
    ``world`` ranks; merged outcomes (a test fails if it fails on any rank)."""
    out = Path(tempfile.mkdtemp(dir=work))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-port",
           str(_free_port()), "-m", "pytest", "-q", "-p", "gate_plugin", "-p", "no:cacheprovider",
           "--timeout", "120", "-o", "addopts=", "--continue-on-collection-errors", "-m", "not flaky_in_dev",
           *[f"tests/unit_tests/{t}" for t in targets], *[f"--deselect=tests/unit_tests/{t}" for t in deselect]]
    proc = subprocess.Popen(cmd, cwd=work, env=mode_env(mode, out, work), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        log = stdout[-1500:] + stderr[-1500:]
    except subprocess.TimeoutExpired:
        # SIGTERM: torchrun stops its ranks (each in a session of its own, so a SIGKILL of
        # torchrun alone left them running, competing with the next session)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        log = f"the session ran past {timeout_s} s"  # whatever the ranks wrote is kept; the rest counts as missing
    merged = {}
    for rank_file in sorted(out.glob("rank*.json")):
        for nodeid, r in json.loads(rank_file.read_text()).items():
            nodeid = nodeid.replace("tests/unit_tests/", "", 1)
            worst = merged.get(nodeid)
            if worst is None or _rank(r["outcome"]) > _rank(worst["outcome"]):
                merged[nodeid] = r
    for t in targets:
        if not any(k == t or k.startswith(t + "::") or k.startswith(t + "[") for k in merged):
            merged[t + "::<no result>"] = {"outcome": "error", "why": f"no rank reported: {log}"}
    return merged


def _rank(outcome: str) -> int:
    return {"passed": 0, "skipped": 1, "failed": 2, "error": 3}[outcome]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (pattern in the failure text, the reason recorded in expected.json, whether the goal
# counts the test: one that needs TE, Apex, CUDA graphs, FP8 or a GPU memory pool cannot pass
# on a host without it)
REASONS = [
    (r"'>=' not supported between instances of 'NoneType' and 'Version'",
     "the tests' conftest calls is_te_min_version(), which raises TypeError without Transformer Engine "
     "(ascend_patches makes it answer False)", True),
    (r"Fused QKV RoPE not available", "needs Transformer Engine", False),
    (r"TESpecProvider|transformer_engine|Transformer Engine|\bTE\b|te_version|TELinear|TENorm",
     "needs Transformer Engine", False),
    (r"amp_C", "needs Apex (amp_C)", False),
    (r"[Aa]pex", "needs Apex", False),
    (r"[Cc]uda[ _]?[Gg]raph|CUDAGraph|graph capture", "CUDA graphs", False),
    (r"[Ff][Pp]8|fp4|FP4", "FP8/FP4", False),
    (r"memory_allocated|max_memory|memory pool|mem_get_info", "asserts a GPU memory pool > 0", False),
    (r"flash_attn|flashattn|FlashAttention", "needs flash-attn (CUDA)", False),
    (r"world_size .* is not divisible|not divisible by", "layout needs more ranks than the file was written for",
     True),
    (r"Torch not compiled with CUDA enabled", "moves a tensor with .cuda(): no device here (transfer_to_npu redirects "
                                              "it to the NPU on an Ascend host; the emulation does not)", True),
    (r"file defines no tests", "the file defines no tests (upstream keeps them inside a string)", True),
    (r"assert 'cpu' == 'cuda'", "asserts its output is on a CUDA device", True),
    (r"requires 2 GPUs, but only 8 are available", "asks for a world of exactly 2; the file's other tests need 8",
     True),
    (r"^deselected: marked flaky_in_dev upstream", "deselected as Megatron-LM's CI deselects it (run_ci_test.sh: "
                                                  "-m 'not flaky_in_dev'); one failing rank hangs the rest", False),
    (r"Test requires world_size=\d+, but got 0", "takes its world size from torch.cuda.device_count() (0 here, "
                                                 "truthfully; the cuda_queries mode answers one per rank)", True),
    (r"KeyError: 'step'", "fills the optimizer state as Apex's/TE's FusedAdam holds it (exp_avg and exp_avg_sq, no "
                          "'step'); without them megatron's distributed optimizer reads torch AdamW's per-parameter "
                          "'step'", False),
    (r"Grouped GEMM is not available", "needs the grouped_gemm CUDA extension", False),
    (r"Skipped: TP \(\d+\) \* PP \(\d+\) > \d+", "skips itself: its layout needs more ranks than the 8 it was "
                                                  "written for (upstream's 8-GPU CI skips it too)", False),
    (r"DEBUG +c10d-NullHandler-dcp_logger|assert \"DEBUG +c10\.\.\.",
     "asserts caplog.text == '', and torch 2.13's checkpoint logger (dcp_logger) writes DEBUG records there: torch, "
     "on any device", True),
    (r"Skipped: Multiple optimizer instances require distributed optimizer", "skips itself: a parameter "
     "combination it rules out (upstream skips it too)", False),
    (r"name 'nvtx' is not defined", "needs the nvtx package (megatron-core's dev extra; in this project's test extra "
                                    "since)", True),
    (r"^no outcome: the session ended", "never reported: its session ran past its time limit (a test before it, "
                                        "or this one, blocked in a collective)", True),
    (r"No module named '(causal_conv1d|mamba_ssm)'", "needs the Mamba kernels (causal_conv1d, mamba_ssm: CUDA "
                                                      "extensions)", False),
    (r"could not import 'flashinfer'", "needs flashinfer (CUDA)", False),
    (r"torch_memory_saver", "needs torch_memory_saver (CUDA)", False),
    (r"(?i)inference.optimized.* transformer engine|inference optimized transformer",
     "the inference-optimized transformer: needs Transformer Engine", False),
    (r"reserved_bytes\.all|allocated_bytes\.all", "asserts a GPU memory pool > 0 (reads torch.cuda.memory_stats())",
     False),
    (r"0 active drivers|libcuda\.so cannot found", "runs a Triton kernel directly, which needs a GPU (Triton finds no "
                                                    "active driver, or on the NPU no libcuda.so)", False),
    (r"NVIDIA driver", "pins host memory for a GPU copy (CUDA-only code path)", False),
    (r"'NoneType' object has no attribute 'synchronize'|Expected 'record' to be called once",
     "CUDA streams and events (a copy stream, a GPU-ready event)", False),
    (r"LayerNorm.__init__\(\) got an unexpected keyword argument 'config'",
     "megatron's CLIP ViT falls back to torch.nn.LayerNorm without Transformer Engine and passes it config=, "
     "which it does not take: needs TE", False),
    (r"result = next\(effect\)", "builds a Transformer Engine class (the hybrid stack's TEDotProductAttention), "
                                  "which megatron stands in with a MagicMock without TE: needs TE", False),
    (r"request \d+, result \(\[.*\) != expected", "compares with tokens recorded on a GPU, from weights CUDA's "
     "generator drew (model_parallel_cuda_manual_seed); the CPU's generator draws other weights", False),
    (r"assert step_count == \d+", "asserts a step count recorded on a GPU; it depends on the sampled tokens, drawn "
                                  "from CUDA's generator on weights CUDA's generator drew", False),
    (r"assert request_batched.prompt_log_probs == pytest.approx", "bf16: a prompt's log-probs batched and alone "
     "differ by up to 9.6e-4 (the test allows 1e-6 relative): SDPA's CPU kernel, ascend_patches' attention here, "
     "rounds a row differently with the batch's padded length; with the flash_attention patch off (megatron's "
     "unfused softmax in fp32) it passes", True),
    (r"paged attention without flash-attn: .* is not built", "a paged-attention feature ascend_patches refuses in one "
     "line (sliding window, sink offset, MLA: not built)", True),
    (r"Skipped: Test requires at least \d+ GPUs", "asks for more ranks than the 2 it runs at here", True),
    (r"Skipped: (Test requires tp_size > 1|Sequence parallelism requires tp_size > 1|Test requires model parallel "
     r"size > 1|MoE models are not supported|The inference optimized transformer requires)",
     "skips itself: a parameter combination it rules out (upstream skips it too)", False),
    (r"Skipped: activate for `megatron-core", "skipped upstream until a fix lands (its own marker)", False),
    (r"Invalid device string: 'cuda:cpu'", "builds a device name 'cuda:<torch.cuda.current_device()>'; the CPU "
                                           "backend answers torch.device('cpu')", True),
    (r"CUDA|cuda|nccl|NCCL", "CUDA-only code path", True),
]
NOT_ELIGIBLE = frozenset(reason for _, reason, eligible in REASONS if not eligible)


def reason_for(why: str, at: str = "") -> str:
    """The recorded reason for a failure message; where the message names none, for the source
    line it failed at (``at``: e.g. ``backend = TESpecProvider()`` for "'NoneType' object is not
    callable")."""
    for text in (why, at):
        for pattern, reason, _ in REASONS:
            if text and re.search(pattern, text):
                return reason
    return "unclassified: " + why[:120]


def reason_of(result: dict) -> str:
    return reason_for(result["why"], result.get("at", ""))


def compare(results: dict, expected: dict) -> tuple:
    newly_failing, newly_passing = [], []
    for nodeid, r in sorted(results.items()):
        want = expected.get(nodeid, {"outcome": "new"})["outcome"]
        if r["outcome"] in ("failed", "error") and want not in ("failed", "error"):
            newly_failing.append(f"{nodeid}: {r['outcome']} ({r['why'][:200]}), expected {want}")
        elif r["outcome"] == "skipped" and want == "passed":  # skipped or deselected now: it no longer runs
            newly_failing.append(f"{nodeid}: skipped ({r.get('why', '')[:200]}), expected passed")
        elif r["outcome"] == "passed" and want != "passed":
            newly_passing.append(f"{nodeid}: passed, expected {want}")
    for nodeid, e in sorted(expected.items()):
        if nodeid not in results and e["outcome"] == "passed":
            newly_failing.append(f"{nodeid}: not run, expected passed")
    return newly_failing, newly_passing


def check(results: dict, mode: str, files, which: str = "all") -> tuple:
    """(newly failing, newly passing) of ``results`` against what expected.json holds for
    ``mode`` over ``files``, of the tests ``which`` ran (see ``run``)."""
    wide = set(wide_tests(files, load_expected()["files"]))
    want = {k: v for k, v in load_expected()["modes"].get(mode, {}).items()
            if k.split("::")[0] in files and which in ("all", "wide" if k.split("[")[0] in wide else "narrow")}
    return compare(results, want)


def table(results: dict, files) -> str:
    rows = ["| file | collected | passed | failed | skipped |", "|---|---|---|---|---|"]
    total = Counter()
    for f in files:
        c = Counter(r["outcome"] for k, r in results.items() if k.split("::")[0] == f)
        n = sum(c.values())
        rows.append(f"| {f} | {n} | {c['passed']} | {c['failed'] + c['error']} | {c['skipped']} |")
        total.update(c)
    rows.append(f"| all | {sum(total.values())} | {total['passed']} | {total['failed'] + total['error']} | "
                f"{total['skipped']} |")
    return "\n".join(rows)


def summary(results: dict) -> str:
    """The eligible count (tests that do not need TE, Apex, CUDA graphs, FP8 or a GPU memory
    pool), how many of them pass, and why the others do not."""
    eligible = {k: r for k, r in results.items() if r["outcome"] == "passed" or reason_of(r) not in NOT_ELIGIBLE}
    passed = sum(r["outcome"] == "passed" for r in eligible.values())
    why = Counter(reason_of(r) for r in eligible.values() if r["outcome"] != "passed")
    lines = [f"{len(results)} outcomes, {len(results) - len(eligible)} need TE/Apex/CUDA graphs/FP8/a GPU memory pool; "
             f"of the {len(eligible)} eligible, {passed} pass"]
    lines += [f"  {n} {reason}" for reason, n in why.most_common()]
    return "\n".join(lines)


def files_in(tier: str) -> list:
    spec = load_expected()["files"]
    return [f for f, s in spec.items() if tier == "all" or s.get("tier", "ci") == tier]


def wide_tests(files, spec) -> list:
    """The node ids (unparametrized) of the files' tests that need more ranks than their file."""
    return [f"{f}::{t}" for f in files for t in spec.get(f, {}).get("wide_tests", ())]


def sessions(files, spec) -> list:
    """(world size, targets, deselected) per torchrun session: the files at the world size they
    were written for, the tests of a file that need more ranks (``wide_tests``) at theirs; the
    2-rank files share one session, the 8-rank ones get one each (in a shared one, a failing
    test's leftover state put the ranks out of step and hung the files after it)."""
    by_world, wide = {}, {}
    for f in files:
        s = spec.get(f, {})
        by_world.setdefault(s.get("world_size", 1), []).append(f)
        for t in s.get("wide_tests", ()):
            wide.setdefault((s["wide_world_size"], f), []).append(f"{f}::{t}")
    deselect = [t for ts in wide.values() for t in ts]
    out = []
    for world, group in sorted(by_world.items()):
        for part in ([group] if world <= 2 else [[f] for f in group]):
            out.append((world, part, [t for t in deselect if t.split("::")[0] in part]))
    out += [(world, ts, []) for (world, _), ts in sorted(wide.items())]
    return out


def run(mode: str, files=None, timeout_s: int = 900, tier: str = "ci", tree: str = "core_v0.16.1",
        which: str = "all") -> tuple:
    """(results, harness edits made) for ``mode`` over ``files`` (default: the tier's files):
    ``which`` is "all" the sessions, "narrow" (the files at their world size, without their
    wide tests) or "wide" (only the wide tests' sessions, at 4 or 8 ranks)."""
    use_tree(tree)
    spec = load_expected()["files"]
    files = files or files_in(tier)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        edits = copy_tests(work, mode) + PLUGIN_EDITS + ([TYPING_OVERRIDE_EDIT] if _needs_typing_override() else [])
        results = {}
        wide = set(wide_tests(files, spec))
        for world, targets, deselect in sessions(files, spec):
            if which != "all" and (set(targets) <= wide) != (which == "wide"):
                continue
            # a file whose tests alone outlast the default says so (session_timeout_s)
            limit = max([timeout_s] + [spec.get(t.split("::")[0], {}).get("session_timeout_s", 0) for t in targets])
            results.update(run_group(targets, world, mode, work, limit, deselect))
    return results, edits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=MODES, default="cpu")
    p.add_argument("--files", nargs="*", default=None, help="test files under tests/unit_tests (default: all listed)")
    p.add_argument("--record", action="store_true", help="write these outcomes to expected.json for the mode")
    p.add_argument("--table", action="store_true", help="print the per-file table")
    p.add_argument("--timeout", type=int, default=900, help="seconds per torchrun session")
    p.add_argument("--tier", choices=("ci", "extended", "all"), default="ci", help="which listed files")
    p.add_argument("--tree", choices=sorted(TREES), default="core_v0.16.1",
                   help="whose tests: Megatron-LM at this tag (run it against that release's megatron-core)")
    args = p.parse_args(argv)
    results, edits = run(args.mode, args.files, args.timeout, args.tier, args.tree)
    expected = load_expected()
    files = args.files or files_in(args.tier)
    print("harness edits on the temp copy:\n" + "\n".join(f"  {e}" for e in edits))
    if args.table:
        print(table(results, files))
        print(summary(results))
    if args.record:
        mode = expected["modes"].setdefault(args.mode, {})
        for nodeid in [k for k in mode if k.split("::")[0] in files]:  # the files run are recorded afresh
            del mode[nodeid]
        for nodeid, r in results.items():
            mode[nodeid] = ({"outcome": "passed"} if r["outcome"] == "passed" else
                            {"outcome": r["outcome"], "reason": reason_of(r), "why": r["why"][:200]})
        EXPECTED.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
        return 0
    newly_failing, newly_passing = check(results, args.mode, files)
    for line in newly_passing:
        print(f"NEWLY PASSING (tighten expected.json): {line}")
    for line in newly_failing:
        print(f"NEWLY FAILING: {line}")
    return 1 if newly_failing else 0


if __name__ == "__main__":
    sys.exit(main())
