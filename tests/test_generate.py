"""recipes.generate on the real stories260K model, converted to Megatron: the published
llama2.c greedy output byte for byte, HF ``generate`` token for token (greedy and beam
search, including EOS-finished hypotheses), reproducible sampling, batching, and the chat."""

import json
import re
import time

import pytest
import torch

from converters import hf_to_megatron
from tests.helpers.launch import ROOT, env_for_ranks, free_port, run_module, run_torchrun


@pytest.fixture(scope="module")
def stories_ckpt(tmp_path_factory, fixtures_dir):
    out = tmp_path_factory.mktemp("gen") / "stories_tp1"
    hf_to_megatron.main(["--input-model-dir", str(fixtures_dir / "stories260K"), "--output-model-dir", str(out)])
    return out


def _result(out):
    return json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])


COMPILE = {"ASCEND_PATCHES_COMPILE_DECODE": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,nproc,env", [(1, 1, 1, None), (2, 1, 2, None),
                                              pytest.param(1, 2, 2, None, marks=pytest.mark.full),  # CI time: ~45 s
                                              pytest.param(1, 1, 1, COMPILE, marks=pytest.mark.full)],
                         ids=["tp1", "tp2", "pp2", "tp1-compiled"])
def test_greedy_from_bos_reproduces_llama2c(stories_ckpt, fixtures_dir, tp, pp, nproc, env):
    res = _result(run_torchrun("converted_checks.py", tp, pp, "greedy200", stories_ckpt,
                               fixtures_dir / "stories260K" / "expected_greedy_200steps.txt", nproc=nproc, env=env))
    (r,) = res.values()
    assert r["len"] == 200 and r["equal"], r
    assert (r["compiled_steps"] == 199) if env else (r["compiled_steps"] == 0)  # every cached step, or none


@pytest.mark.slow
@pytest.mark.parametrize("tp,nproc,env", [(1, 1, None), (2, 2, None), pytest.param(1, 1, COMPILE, marks=pytest.mark.full)],
                         ids=["tp1", "tp2", "tp1-compiled"])
def test_greedy_and_beam_search_equal_hf_generate(stories_ckpt, fixtures_dir, tp, nproc, env):
    res = _result(run_torchrun("converted_checks.py", tp, 1, "hf_generate", stories_ckpt,
                               fixtures_dir / "stories260K", nproc=nproc, timeout=600, env=env))
    compiled = res.pop("compiled_steps")
    assert compiled > 100 if env else compiled == 0
    (rows,) = res.values()
    assert len(rows) == 4 * 5
    assert sum(r["eos"] for r in rows if "eos" in r) >= 10  # finished hypotheses were exercised
    bad = [r for r in rows if not r["equal"]]
    assert not bad, bad


def _generate(ckpt, *flags, stdin=None, timeout=300):
    proc = run_module("recipes.generate", "--load", ckpt, *flags, input=stdin, timeout=timeout,
                      env={"MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.full  # CI time: ~50 s; the warps: test_top_k_top_p_warping_matches_hf
def test_sampling_is_reproducible_and_seeded(stories_ckpt, tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / f"{name}.json"
        _generate(stories_ckpt, "--prompt", "Once upon a time", "--prompt", "The dog", "--temperature", "0.8",
                  "--top-k", "40", "--top-p", "0.9", "--seed", seed, "--max-new-tokens", "30",
                  "--num-return-sequences", "2", "--return-log-probs", "--output-json", out)
        runs[name] = json.loads(out.read_text())
    assert len(runs["a"]) == 4
    assert runs["a"] == runs["b"]
    assert [r["tokens"] for r in runs["a"]] != [r["tokens"] for r in runs["c"]]
    for r in runs["a"]:
        assert len(r["log_probs"]) == len(r["tokens"]) and all(lp <= 0 for lp in r["log_probs"])


def test_batched_prompts_equal_one_at_a_time(stories_ckpt, single_process_group):
    from recipes.infer import decoding, inference

    lm = inference.load(stories_ckpt, 1, 1)
    prompts = [[1, 403, 407, 261, 378], [1], [1, 67, 429, 270, 260, 392, 281, 449, 300]]
    alone = [decoding.generate(lm, [p], 25, decoding.SamplingParams(), 2)[0] for p in prompts]
    together = decoding.generate(lm, prompts, 25, decoding.SamplingParams(), 2)
    for a, t in zip(alone, together):
        assert a.tokens == t.tokens
        assert torch.allclose(torch.tensor(a.log_probs), torch.tensor(t.log_probs), atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        decoding.generate(lm, [[1]], 600, decoding.SamplingParams(), 2)


@pytest.mark.slow  # compiles the decode step
@pytest.mark.full  # CI time: ~80 s
def test_fused_decode_step_equals_stock_layers(stories_ckpt, single_process_group):
    """ascend_patches' fused decode step (per layer, and for the whole one-stage GPTModel): the
    same logits as megatron's own modules, bit for bit, over prefill + cached steps, two sequences;
    the torch.compile'd step (compile_decode) the same within rounding."""
    import ascend_patches
    from ascend_patches.ops import decode_compiled, decode_layer
    from recipes.infer import decoding, inference

    lm = inference.load(stories_ckpt, 1, 1)
    calls = []
    original = decode_layer.decode_step

    def run():
        session = decoding.Session(lm, 2, 40)
        out = [session.feed(torch.tensor([[1, 403, 407, 261], [1, 67, 429, 270]]))]
        for a, b in ((378, 5), (300, 9), (12, 13), (40, 41)):
            out.append(session.feed(torch.tensor([[a], [b]])))
        return torch.stack(out)

    decode_layer.decode_step = lambda *a: calls.append(1) or original(*a)
    try:
        fused = run()
        with ascend_patches.disabled("decode_layer", "decode_model"):
            stock = run()
        with ascend_patches.disabled("decode_model"):
            layers_only = run()
    finally:
        decode_layer.decode_step = original
    assert len(calls) == 2 * 4 * 5  # every decode step of every layer took the fused path, twice
    assert torch.equal(fused, stock) and torch.equal(layers_only, stock)

    compiled_steps = []
    original_step = decode_compiled.model_step
    decode_compiled.model_step = lambda *a: compiled_steps.append(1) or original_step(*a)
    ascend_patches.configure(compile_decode=True)
    try:
        assert "compile_decode: on" in ascend_patches.report()
        compiled = run()
    finally:
        ascend_patches.configure(compile_decode=False)
        decode_compiled.model_step = original_step
    assert len(compiled_steps) == 4
    assert ascend_patches.compiled_decode_unavailable(lm.model) == ""
    with ascend_patches.disabled("decode_model"):  # --compile-decode then refuses, naming why
        assert "decode_model patch is not applied" in ascend_patches.compiled_decode_unavailable(lm.model)
    # torch.compile fuses and reorders fp32 sums (and the compiled attention is two matmuls
    # rather than SDPA's kernel), so equality is to rounding: logits reach |19| (ulp 2e-6),
    # measured 6e-6; 1e-4 is the converters' logit tolerance
    assert (compiled - stock).abs().max() < 1e-4


def test_top_k_top_p_warping_matches_hf():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    from recipes.infer.decoding import SamplingParams

    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ours = SamplingParams(greedy=False, temperature=0.7, top_k=20, top_p=0.8).warp(scores)
    ref = scores
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        ref = w(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_chat_loop_keeps_history_and_obeys_commands(stories_ckpt):
    out = _generate(stories_ckpt, "--interactive", "--show-prompt", "--max-new-tokens", "12",
                    stdin="Once upon a time\nTell me more\nclear\nHello there\nquit\nnever read\n")
    prompts = re.findall(r"\[prompt, \d+ tokens\] (.*)", out)
    assert len(prompts) == 3, out
    assert "Once upon a time" in prompts[0] and "Tell me more" not in prompts[0]
    # the second turn carries the first exchange (question and answer) in the LLaMA-2 template
    answer1 = out.split("Assistant: ", 2)[1].split("\n[")[0].strip()
    assert "[INST] Once upon a time [/INST]" in prompts[1] and "[INST] Tell me more [/INST]" in prompts[1]
    assert answer1 and answer1 in prompts[1]
    assert "(new conversation)" in out
    assert "Once upon a time" not in prompts[2] and "Hello there" in prompts[2]
    assert out.count("tokens in") == 3  # elapsed time per reply; 'quit' ended it before the last line


@pytest.mark.slow
def test_chat_under_torchrun_rank0_reads(stories_ckpt):
    """Two ranks at TP=2: rank 0 reads stdin and the other follows; EOF quits."""
    out = run_torchrun("recipes.generate", "--load", stories_ckpt, "--interactive", "--max-new-tokens", 8,
                       input="Once upon a time\nnew\nThe cat\n")
    assert out.count("tokens in") == 2 and "TP=2" in out


def test_chat_over_the_position_limit_trims_the_oldest_turn(stories_ckpt):
    """stories260K holds 512 positions: with 200 new tokens a turn, the third prompt no longer
    fits beside two exchanges (it stopped the session before)."""
    out = _generate(stories_ckpt, "--interactive", "--show-prompt", "--max-new-tokens", "200", "--temperature", "0.9",
                    "--seed", "3", "--system-prompt", "You tell stories.",
                    stdin="Once upon a time\nTell me more\nAnd then?\nWhat next?\nquit\n")
    prompts = re.findall(r"\[prompt, (\d+) tokens\] (.*)", out)
    assert len(prompts) == 4, out[-3000:]
    assert "(dropped the oldest" in out and "Traceback" not in out
    for n, text in prompts:
        assert int(n) + 200 <= 512 or "(this reply gets at most" in out
        assert "You tell stories." in text  # the system prompt stays when turns are dropped
    assert "Once upon a time" not in prompts[-1][1] and "What next?" in prompts[-1][1]
    assert out.count("tokens in") == 4


def _pty_chat(stories_ckpt, script):
    """The chat on a pseudo-terminal (its controlling terminal, so \\x03 is the terminal's Ctrl-C);
    ``script``: (text to wait for, bytes to type) pairs.  (output, exit status)."""
    import os
    import pty
    import signal
    import sys

    pid, fd = pty.fork()
    if pid == 0:
        # a shell starts a program with Ctrl-C's default action; a test run launched as a
        # background job (bash: '&' without job control) ignores SIGINT, and the chat would inherit that
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.environ.update(env_for_ranks({"MASTER_PORT": str(free_port())}))
        os.chdir(str(ROOT))
        os.execv(sys.executable, [sys.executable, "-m", "recipes.generate", "--load", str(stories_ckpt),
                                  "--interactive", "--max-new-tokens", "400", "--temperature", "1.0", "--seed", "1"])
    try:
        return _drive(pid, fd, script, time.time() + 180)
    finally:
        try:
            if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running (a failed wait): stop it
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        except ChildProcessError:  # already reaped
            pass


def _drive(pid, fd, script, deadline):
    import os
    import select

    out, seen = b"", 0
    for wait_for, typed in script:
        while out.find(wait_for.encode(), seen) < 0:
            assert time.time() < deadline, out.decode(errors="replace")[-2000:]
            if select.select([fd], [], [], 1)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        seen = out.find(wait_for.encode(), seen) + len(wait_for)
        if typed == b"\x03" and wait_for == "You: ":
            # as a person's Ctrl-C would, land while the chat waits in read(): one in the instant
            # between the prompt's write and the read is held by CPython (its C handler only sets
            # a flag) until a line arrives, and the test would wait for ever
            time.sleep(0.5)
        os.write(fd, typed)
    while time.time() < deadline:
        if select.select([fd], [], [], 1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    while time.time() < deadline + 30:  # its output closed; give it the time to exit
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return out.decode(errors="replace"), os.waitstatus_to_exitcode(status)
        time.sleep(0.2)
    raise AssertionError("the chat did not exit by the deadline:\n" + out.decode(errors="replace")[-2000:])


def test_ctrl_c_stops_a_reply_keeps_the_chat_and_quits_at_the_prompt(stories_ckpt):
    out, code = _pty_chat(stories_ckpt, [
        ("You: ", b"Once upon a time there was a dragon\r"),
        ("Assistant: ", b"\x03"),               # during the reply
        ("You: ", b"Tell me more\r"),            # the session is alive
        ("tokens in", b""),
        ("You: ", b"\x03"),                      # at the prompt: quit
    ])
    assert "(reply stopped)" in out and "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert out.count("tokens in") == 2 and code == 0, (code, out[-3000:])


def test_fit_turn_keeps_the_system_prompt():
    from recipes.infer.generate import chat_tokens, fit_turn

    class Tok:
        bos_id, eos_id = 1, 2

        def encode(self, text):
            return [3] * len(text.split())

    history = [("a b c d", "e f g h")] * 3
    ids, budget, dropped = fit_turn(Tok(), history, "q", "sys prompt", positions=40, max_new_tokens=10)
    assert dropped == 2 and len(ids) + budget <= 40 and ids == chat_tokens(Tok(), history[2:], "q", "sys prompt")
    ids, budget, dropped = fit_turn(Tok(), [], "w " * 50, None, positions=40, max_new_tokens=10)
    assert budget is None


def _engine_run(ckpt, tmp_path, name, *flags):
    out = tmp_path / f"{name}.json"
    text = _generate(ckpt, "--prompt", "Once upon a time", "--prompt", "Lily", "--prompt",
                     "The little dog ran to the park and saw a big red ball. He wanted", "--max-new-tokens", 30,
                     "--output-json", out, *flags)
    return re.search(r"^engine: (\w+)", text, re.M).group(1), json.loads(out.read_text())


@pytest.mark.slow
def test_the_dynamic_engine_path_gives_the_static_paths_greedy_tokens(stories_ckpt, tmp_path):
    """recipes.generate's engine choice.  On megatron-core 0.19+ (the 3.12 job): by default greedy
    prompts of mixed lengths (2 to 16 tokens, 30 new) run through megatron's dynamic engine, and
    give token for token what the static path (``--engine static``, itself checked against HF
    generate above) gives; beam search stays static; a sampled run repeats with its --seed and
    changes with another.  On older releases the default is the static path and ``--engine
    dynamic`` is refused in one line naming 0.19."""
    from ascend_patches.versions import megatron_core_matches
    from recipes.infer import dynamic

    if not megatron_core_matches(dynamic.SERVED):
        engine, _ = _engine_run(stories_ckpt, tmp_path, "auto")
        assert engine == "static"
        proc = run_module("recipes.generate", "--load", stories_ckpt, "--engine", "dynamic",
                          env={"MASTER_PORT": str(free_port())})
        assert proc.returncode == 2 and "--engine dynamic needs megatron-core 0.19 or later" in proc.stderr
        return
    engine, dyn = _engine_run(stories_ckpt, tmp_path, "auto")
    assert engine == "dynamic"
    engine, static = _engine_run(stories_ckpt, tmp_path, "static", "--engine", "static")
    assert engine == "static"
    assert [r["tokens"] for r in dyn] == [r["tokens"] for r in static]
    assert _engine_run(stories_ckpt, tmp_path, "beams", "--num-beams", 2)[0] == "static"
    sampled = [_engine_run(stories_ckpt, tmp_path, f"s{i}", "--temperature", 1.5, "--seed", seed)
               for i, seed in enumerate((7, 7, 8))]
    assert all(e == "dynamic" for e, _ in sampled)
    tokens = [[r["tokens"] for r in rows] for _, rows in sampled]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]
