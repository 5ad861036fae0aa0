"""``python -m recipes.serve``: megatron-core's OpenAI-compatible server (``MegatronAsyncLLM.serve``,
the dynamic engine) on a converted checkpoint, against real clients: the ``openai`` package.

Reference: HF ``generate`` on the same weights (stories260K, fp32, greedy, each prompt alone,
BOS prepended as HF's tokenizer does) and HF's own LLaMA-2-chat template (Meta's, as published
in Llama-2-*-chat-hf's tokenizer_config.json) rendered by ``apply_chat_template``.  Tokens must be
equal.  The API is megatron-core 0.19+'s (the Python 3.12 job runs these).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from ascend_patches.versions import megatron_core_matches, version_of
from converters import hf_to_megatron
from recipes.errors import BadInput
from recipes.infer import dynamic, openai_rules
from tests.conftest import emulated_npu_env
from tests.helpers.launch import ROOT, env_for_ranks, free_port, torchrun_command

HAS_API = megatron_core_matches(dynamic.SERVED)
needs_api = pytest.mark.skipif(not HAS_API, reason="megatron.core.inference.apis is in megatron-core 0.19+ (the "
                                                   "Python 3.12 job runs these)")

# Meta's LLaMA-2-chat template as Llama-2-7b-chat-hf's tokenizer_config.json publishes it
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
PROMPTS = ["Once upon a time", "Lily", "The little dog ran to the park and saw a big red ball. He",
           "One day, Tom and his mom went to the store to buy some food. Tom wanted",
           "Sam", "The sun was"]
NEW = 24
# log-likelihood tolerance of the bf16 server on the emulated NPU against fp32 recipes.evaluate: above the
# largest differences measured, 0.23 at TP=1 and 0.30 at TP=2 (BoolQ passages of ~400 tokens; the weights are
# rounded to bf16), with room for a third
NPU_LL_TOL = 0.5


def command_env(extra=None) -> dict:
    env = env_for_ranks(extra)
    env.pop("MASTER_PORT", None)  # a one-rank group of this test process holds it; the command picks its own
    return env


class Server:
    """A ``recipes.serve`` command in its own session; ``stop`` sends SIGTERM and says which of its
    processes outlived it."""

    def __init__(self, argv, env, log_path, timeout=240):
        self.log = open(log_path, "w")
        self.start(argv, env)
        deadline = time.time() + timeout
        retried = False
        while True:
            if self.proc.poll() is not None:
                if "Address already in use" in self.tail() and not retried:
                    # the free port was taken before the server bound it (its own coordinator binds a
                    # random port first): once more, on another
                    retried = True
                    self.start(argv, env)
                    continue
                pytest.fail(f"the server exited (rc={self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                    self.models = json.load(r)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    self.kill()
                    pytest.fail(f"the server did not answer within {timeout} s:\n{self.tail()}")
                time.sleep(1)
        import openai

        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def start(self, argv, env):
        self.port = free_port()
        self.proc = subprocess.Popen(argv + ["--port", str(self.port), "--served-model-name", "stories"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=command_env(env), cwd=ROOT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return "".join(line for line in f.readlines()[-60:] if "Warning" not in line)

    def tree(self):
        import psutil

        root = psutil.Process(self.proc.pid)
        return [root] + root.children(recursive=True)

    def stop(self, timeout=60):
        """SIGTERM to the command; the processes of its tree still alive after ``timeout``."""
        import psutil

        procs = self.tree()
        self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        self.proc.wait(timeout=10)
        return alive

    def kill(self):
        """SIGKILL to every process of the command's tree: torchrun starts its ranks in sessions of
        their own, so killing torchrun's group alone left the ranks, their coordinator and HTTP
        process running after a failed test (found burning CPU through the rest of a CI run)."""
        import psutil

        try:
            procs = self.tree()
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def complete(self, prompt, max_tokens=NEW, **kw):
        r = self.client.completions.create(model="stories", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           **kw)
        return r.choices[0]

    def timed_completion(self, max_tokens, drop_after_s=None):
        """Seconds a greedy completion of ``max_tokens`` (EOS ignored) took, or, with
        ``drop_after_s``, the client disconnecting that long after sending it."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=drop_after_s or 120)
        body = {"model": "stories", "prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        start = time.time()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        try:
            r = conn.getresponse()
            tokens = json.loads(r.read())["choices"][0]["generation_token_ids"]
            assert r.status == 200 and len(tokens) == max_tokens, (r.status, len(tokens))
        except TimeoutError:
            assert drop_after_s, "the completion did not answer within 120 s"
        finally:
            conn.close()
        return time.time() - start

    def post(self, path, body, content_type="application/json"):
        """(status, parsed JSON body) of a raw POST; ``body`` None declares a 9 MiB body and waits for
        the answer before sending it (as a client sending Expect: 100-continue does)."""
        if body is None:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            conn.putrequest("POST", path)
            conn.putheader("Content-Type", content_type)
            conn.putheader("Content-Length", str(9 * 2 ** 20))
            conn.endheaders()
            r = conn.getresponse()
            out = r.status, json.loads(r.read())
            conn.close()
            return out
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.mark.skipif(HAS_API, reason="this megatron-core has the API")
def test_an_older_megatron_core_is_refused_in_one_line_naming_the_release(tmp_path):
    out = subprocess.run([sys.executable, "-m", "recipes.serve", "--load", str(tmp_path)], capture_output=True,
                         text=True, env=env_for_ranks(), cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: megatron-core {version_of('megatron-core')} has no")
    assert "it is in megatron-core 0.19 and later" in out.stderr


def test_prompt_log_probs_are_refused_naming_the_flag_where_the_engine_keeps_none():
    """``echo`` + ``logprobs`` on a server started without --return-log-probs: a RequestError (the
    bad-input matrix checks that one becomes a 400 with OpenAI's error shape and that the server
    keeps serving) on ``echo``, naming the flag; with the flag, the same request passes."""
    body = {"prompt": "x", "echo": True, "logprobs": 1}
    with pytest.raises(openai_rules.RequestError, match="start it with --return-log-probs") as e:
        openai_rules.check_completion(body, openai_rules.Limits("m", 64, 512, prompt_log_probs=False), lambda t: [1, 2])
    assert (e.value.status, e.value.param) == (400, "echo")
    openai_rules.check_completion(body, openai_rules.Limits("m", 64, 512, prompt_log_probs=True), lambda t: [1, 2])


def test_prefix_caching_flags_are_checked_before_the_model_loads(tmp_path):
    """Megatron-LM's prefix-caching flags (vLLM's --enable-prefix-caching the alias): an eviction
    policy without the cache, and the cache with the prompt's log-probs (a cached prefix is not
    run, so its log-probs would be missing), are refused in one line; the rest become settings."""
    from recipes.infer import serve as serve_recipe

    def settings(*flags):
        return serve_recipe.settings(serve_recipe.build_parser().parse_args(["--load", str(tmp_path), *flags]))

    with pytest.raises(BadInput, match="there is no prefix cache to evict from"):
        settings("--inference-dynamic-batching-prefix-caching-eviction-policy", "lru")
    with pytest.raises(BadInput, match="its log-probs would be missing"):
        settings("--enable-prefix-caching", "--return-log-probs")
    s = settings("--inference-dynamic-batching-prefix-caching", "--inference-dynamic-batching-prefix-caching-eviction-policy", "lru")
    assert (s.prefix_caching, s.prefix_eviction) == (True, "lru")
    assert (settings().prefix_caching, settings("--no-enable-prefix-caching").prefix_caching) == (False, False)
    assert settings("--enable-prefix-caching").prefix_eviction == "ref_zero"  # Megatron-LM's default


@pytest.fixture(scope="module")
def stories_ckpt(tmp_path_factory, fixtures_dir):
    out = tmp_path_factory.mktemp("serve") / "stories_tp1"
    hf_to_megatron.main(["--input-model-dir", str(fixtures_dir / "stories260K"), "--output-model-dir", str(out)])
    return out


@pytest.fixture(scope="module")
def hf(fixtures_dir):
    from transformers import LlamaForCausalLM, LlamaTokenizer

    model = LlamaForCausalLM.from_pretrained(fixtures_dir / "stories260K", dtype=torch.float32).eval()
    tok = LlamaTokenizer.from_pretrained(fixtures_dir / "stories260K")
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    return model, tok


def hf_greedy(hf, ids, n=NEW):
    model, tok = hf
    ids = torch.tensor([ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, num_beams=1,
                         eos_token_id=tok.eos_token_id, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def server(stories_ckpt, tmp_path_factory):
    s = Server([sys.executable, "-m", "recipes.serve", "--load", str(stories_ckpt), "--block-size-tokens", "16",
                "--return-log-probs"], None, tmp_path_factory.mktemp("serve_log") / "server.log")
    yield s
    s.kill()


@needs_api
@pytest.mark.slow
def test_models_lists_the_served_model(server):
    assert [m.id for m in server.client.models.list().data] == ["stories"]
    assert server.models["data"][0]["max_model_len"] == 512  # the checkpoint's sequence length


@needs_api
@pytest.mark.slow
def test_completions_and_chat_equal_hf(server, hf):
    """Greedy completions of prompts of 2 to 20 tokens, and chat conversations (a system message, a
    second turn), through the openai client: token for token HF's."""
    model, tok = hf
    for p in PROMPTS:
        choice = server.complete(p)
        theirs = hf_greedy(hf, tok(p).input_ids)
        assert choice.model_extra["generation_token_ids"] == theirs, p
        assert choice.model_extra["prompt_token_ids"] == tok(p).input_ids
        assert choice.text == tok.decode([t for t in theirs if t != tok.eos_token_id]), p
    conversations = [[{"role": "user", "content": "Tell me a story"}],
                     [{"role": "system", "content": "You are a storyteller."},
                      {"role": "user", "content": "Once upon a time"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, friend."},
                      {"role": "user", "content": "Who is Lily?"}]]
    for messages in conversations:
        r = server.client.chat.completions.create(model="stories", messages=messages, max_tokens=NEW, temperature=0)
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        message = r.choices[0].message
        assert message.model_extra["prompt_token_ids"] == list(ids), messages
        assert message.model_extra["generation_token_ids"] == hf_greedy(hf, list(ids)), messages


@needs_api
@pytest.mark.slow
def test_sixteen_concurrent_clients_each_get_their_solo_answer(server):
    """16 clients at once (mixed prompt lengths: they prefill and decode in the same steps across
    16-token blocks), each answer equal to the same prompt's answer alone."""
    prompts = [(PROMPTS[i % len(PROMPTS)] + " and") * (1 + i % 4) for i in range(16)]
    solo = [server.complete(p, max_tokens=20).model_extra["generation_token_ids"] for p in prompts]
    together = [None] * 16
    errors = []

    def ask(i):
        try:
            together[i] = server.complete(prompts[i], max_tokens=20).model_extra["generation_token_ids"]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert together == solo


BAD = [
    ("malformed JSON", b'{"prompt": "x", bad', 400, None),
    ("not an object", b'["x"]', 400, None),
    ("prompt longer than the context", json.dumps({"prompt": [1] + [400] * 600, "max_tokens": 4}).encode(), 400,
     "max_tokens"),
    ("negative max_tokens", json.dumps({"prompt": "x", "max_tokens": -3}).encode(), 400, "max_tokens"),
    ("huge max_tokens", json.dumps({"prompt": "x", "max_tokens": 10 ** 9}).encode(), 400, "max_tokens"),
    ("unknown parameter", json.dumps({"prompt": "x", "frequency_penalty": 0.5}).encode(), 400, "frequency_penalty"),
    ("a typo", json.dumps({"prompt": "x", "max_token": 4}).encode(), 400, "max_token"),
    ("stream", json.dumps({"prompt": "x", "stream": True}).encode(), 400, "stream"),
    ("unknown model", json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model"),
    ("token outside the vocabulary", json.dumps({"prompt": [1, 99999]}).encode(), 400, "prompt"),
    ("sampling with a seed", json.dumps({"prompt": "x", "seed": 3, "temperature": 0.7}).encode(), 400, "seed"),
    ("past the size limit", None, 413, None),  # 9 MiB declared: answered before the body is sent
]


@needs_api
@pytest.mark.slow
def test_bad_requests_get_openai_shaped_4xx_and_the_server_keeps_serving(server, hf):
    for name, body, status, param in BAD:
        got, answer = server.post("/v1/completions", body)
        assert got == status, (name, got, answer)
        err = answer["error"]
        assert err["type"] == "invalid_request_error" and err["message"], (name, answer)
        assert err["param"] == param, (name, answer)
    chat_bad = [{"messages": [{"role": "assistant", "content": "hi"}]},  # not LLaMA-2-chat's turns
                {"messages": []}, {"messages": [{"role": "user", "content": "hi"}], "stop": ["."]},
                {"messages": [{"role": "user", "content": "hi"}], "stream": True}]
    for body in chat_bad:
        got, answer = server.post("/v1/chat/completions", json.dumps(body).encode())
        assert got == 400 and answer["error"]["param"] in ("messages", "stop", "stream"), (body, answer)
    got, answer = server.post("/v1/nothing", b"{}")
    assert got == 404 and "POST /v1/nothing" in answer["error"]["message"]
    import openai

    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        server.complete("x", max_tokens=600)
    # still serving, the same answer as before
    _, tok = hf
    assert server.complete(PROMPTS[0]).model_extra["generation_token_ids"] == hf_greedy(hf, tok(PROMPTS[0]).input_ids)
    assert openai_rules.MAX_N == 16


@pytest.fixture(scope="module")
def lm_eval_reference(stories_ckpt, fixtures_dir, tmp_path_factory, single_process_group):
    """The lm-eval tasks (MMLU 4 subjects x 10 questions, 0-shot; BoolQ's first 20 questions that
    fit 512 positions whole) and ``recipes.evaluate``'s answers to them on the checkpoint, in this
    process (fp32, one forward per question): the reference for every server's lm-eval run."""
    from recipes.data.tokenizer import load_tokenizer
    from recipes.infer import evaluate, inference
    from tests.helpers import lm_eval_reference as ref

    tmp_path = tmp_path_factory.mktemp("lm_eval_tasks")
    hf_dir = fixtures_dir / "stories260K"
    tok = load_tokenizer(str(hf_dir))
    # BoolQ rows that fit the 512 positions whole: lm-eval and recipes.evaluate truncate a longer
    # context differently (lm-eval by max_length, from the left)
    rows = [line for line in (fixtures_dir / "boolq" / "superglue_BoolQ_val_first200.jsonl").read_text().splitlines()
            if line.strip()]
    short = []
    for r in map(json.loads, rows):  # the title in the passage, as recipes.evaluate writes it ("title -- passage")
        r = dict(r, passage=f"{r.pop('title')} -- {r['passage']}" if r.get("title") else r["passage"])
        if len(tok.encode(r["passage"] + r["question"])) < 400:
            short.append(json.dumps(r))
    boolq = tmp_path / "boolq_short.jsonl"
    boolq.write_text("\n".join(short[:20]) + "\n")
    tasks = ref.mmlu_tasks(fixtures_dir / "mmlu" / "data", tmp_path, limit=10)
    tasks.update(ref.boolq_task(boolq, tmp_path))
    lm = inference.load(stories_ckpt, 1, 1)
    questions = evaluate.mmlu_questions(fixtures_dir / "mmlu" / "data" / "test", 0, 10) + evaluate.boolq_questions(boolq)
    ours = evaluate.evaluate(lm, tok, questions, lm.shape.seq_length, batch_size=16)
    fits = {q.qid: len(tok.encode(q.context)) + 8 < 511 for q in questions}  # whole, in both: no truncation
    return tasks, tmp_path, ours, fits


def lm_eval_against_reference(url, reference, fixtures_dir, ll_tol, num_concurrent=2):
    """lm-eval's ``local-completions`` backend against the server at ``url`` (log-likelihoods through
    echo + logprobs, 8 prompts a request), compared with ``recipes.evaluate``'s answers: every
    question's target the same; for every question that fits 512 positions whole (lm-eval cuts a
    longer one to its max_length, recipes.evaluate to the model's positions) the log-likelihoods
    within ``ll_tol``, and the same prediction wherever the reference's best choice leads the next
    by more than 2 x ``ll_tol`` (closer than that, the tolerance allows either).  Returns (questions
    compared, the largest difference, the predictions that agree, questions with a clear lead)."""
    from tests.helpers import lm_eval_reference as ref

    tasks, task_dir, ours, fits = reference
    hf_dir = fixtures_dir / "stories260K"
    args = (f"model=stories,base_url={url}/v1/completions,tokenizer={hf_dir},tokenizer_backend=huggingface,"
            f"tokenized_requests=True,add_bos_token=True,num_concurrent={num_concurrent},max_retries=1,max_length=512")
    theirs = ref.run(hf_dir, task_dir, tasks, 0, model="local-completions", model_args=args)
    worst, compared, agree, clear, where = 0.0, 0, 0, 0, None
    for task, group in tasks.items():
        mine = [r for r in ours if r["group"] == group]
        assert len(mine) == len(theirs[task]["samples"]), task
        for o, (ll, target) in zip(mine, theirs[task]["samples"]):
            assert o["answer"] == target, o["id"]
            if not fits[o["id"]]:
                continue
            compared += 1
            diff = max(abs(a - b) for a, b in zip(o["loglikelihoods"], ll))
            if diff > worst:
                worst, where = diff, (o["id"], o["loglikelihoods"], ll)
            served = max(range(len(ll)), key=lambda k: (ll[k], -k))
            agree += served == o["prediction"]
            top = sorted(o["loglikelihoods"], reverse=True)
            if top[0] - top[1] > 2 * ll_tol:
                clear += 1
                assert o["prediction"] == served, (o["id"], o["loglikelihoods"], ll)
    assert worst < ll_tol, where
    return compared, worst, agree, clear


def npu_lm_eval_holds(url, reference, fixtures_dir, where):
    """lm-eval against a bf16 server on the emulated NPU: log-likelihoods within NPU_LL_TOL of
    recipes.evaluate's (fp32), and all but 2 of its predictions (measured: 59 compared, all 59 the
    same at TP=1 and TP=2; two near-ties may go either way in bf16)."""
    compared, worst, agree, clear = lm_eval_against_reference(url, reference, fixtures_dir, ll_tol=NPU_LL_TOL)
    print(f"emulated NPU {where}, bf16: {compared} questions compared, largest log-likelihood difference "
          f"{worst:.4f}, {agree} predictions agree, {clear} with a clear lead")
    assert compared >= 55 and agree >= compared - 2, (compared, agree, clear)


@needs_api
@pytest.mark.slow
def test_lm_eval_local_completions_gives_recipes_evaluates_answers(server, lm_eval_reference, fixtures_dir):
    """lm-eval (2 requests at once) against the CPU server, fp32: the same prediction as
    ``recipes.evaluate`` for every question that fits whole (>= 55 of 40 MMLU and 20 BoolQ
    questions), log-likelihoods within 1e-4 (the engine sums over paged, chunked attention,
    recipes.evaluate over one forward)."""
    compared, worst, agree, clear = lm_eval_against_reference(server.url, lm_eval_reference, fixtures_dir, ll_tol=1e-4)
    assert compared >= 55 and agree == compared, (compared, agree)


@needs_api
@pytest.mark.slow
def test_tp2_serves_hf_tokens_lm_eval_cancels_a_dropped_request_and_sigterm_stops_every_process(
        stories_ckpt, hf, lm_eval_reference, fixtures_dir, tmp_path):
    """torchrun --nproc-per-node 2 -m recipes.serve (gloo), two requests a step (--max-requests 2;
    an odd count is refused in one line, as megatron's context splits them over the TP ranks):
    the openai client's greedy completions equal HF's; lm-eval's local-completions gets
    recipes.evaluate's prediction for every question that fits whole, log-likelihoods within
    1e-4, as at TP=1 (fp32; TP=2 adds each layer's two halves in another order; measured 1.0e-5).
    Two clients that disconnect half a
    second into 490-token completions have them cancelled on both ranks: a short request sent
    next, which can only step once one of them has left the engine, answers in under half the
    time a whole completion takes (without the cancel it waited for the rest of one: at TP=1
    with one request a step, 0.06 s against 2.8 s).  SIGTERM to torchrun then stops the ranks,
    the coordinator and the HTTP process."""
    from concurrent.futures import ThreadPoolExecutor

    odd = subprocess.run(torchrun_command("recipes.serve", "--load", stories_ckpt, "--max-requests", 3, nproc=2),
                         capture_output=True, text=True, env=command_env(), cwd=ROOT, timeout=300)
    assert odd.returncode != 0 and "must be a multiple of the TP size 2" in odd.stderr, odd.stderr[-2000:]
    s = Server(torchrun_command("recipes.serve", "--load", stories_ckpt, "--block-size-tokens", 16, "--max-requests", 2,
                                "--return-log-probs", nproc=2), None, tmp_path / "server.log")
    try:
        _, tok = hf
        for p in PROMPTS[:4]:
            assert s.complete(p).model_extra["generation_token_ids"] == hf_greedy(hf, tok(p).input_ids), p
        compared, worst, agree, _ = lm_eval_against_reference(s.url, lm_eval_reference, fixtures_dir, ll_tol=1e-4)
        print(f"CPU at TP=2, fp32: {compared} questions compared, largest log-likelihood difference {worst:.2e}, "
              f"{agree} predictions agree")
        assert compared >= 55 and agree == compared, (compared, agree)
        whole = s.timed_completion(490)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: s.timed_completion(490, drop_after_s=0.5), range(2)))
        after = s.timed_completion(8)
        assert after < whole / 2, (after, whole, s.tail())
        assert s.tail().count("cancelled (its client went away)") == 2, s.tail()
        assert len(s.tree()) >= 5  # torchrun, 2 ranks, the coordinator, the HTTP process
        alive = s.stop()
        assert not alive, (alive, s.tail())
        assert "did not stop" not in s.tail() and s.tail().count("stopped") >= 1  # the orderly way, not forced
    finally:
        s.kill()


@needs_api
@pytest.mark.slow
def test_tp2_on_the_emulated_npu(stories_ckpt, server, lm_eval_reference, fixtures_dir, tmp_path):
    """The server at TP=2 on the emulated NPU (its hccl's rules; bf16, 128-token blocks: what
    npu_fused_infer_attention_score takes), against the CPU server (fp32): the first 8 greedy
    tokens of each prompt equal (bf16 rounds differently; the engine checks in
    test_dynamic_engine measure where they part), the attention in npu_fused_infer_attention_score
    on both ranks (the emulation's count of calls).  lm-eval against it, held as at TP=1 (the
    tolerance NPU_LL_TOL, all but 2 predictions recipes.evaluate's).  A 16-token block is
    refused at start, in one line."""
    refused = subprocess.run([sys.executable, "-m", "recipes.serve", "--load", str(stories_ckpt),
                              "--block-size-tokens", "16", "--params-dtype", "bf16"], capture_output=True, text=True,
                             env=command_env(emulated_npu_env()), cwd=ROOT, timeout=300)
    assert refused.returncode != 0 and "takes blocks of 128, 256, 384, 512 tokens" in refused.stderr
    report = tmp_path / "npu_report.jsonl"
    s = Server(torchrun_command("recipes.serve", "--load", stories_ckpt, "--block-size-tokens", 128, "--params-dtype",
                                "bf16", "--return-log-probs", nproc=2), emulated_npu_env(EMULATED_NPU_REPORT=str(report)),
               tmp_path / "server.log")
    try:
        for p in PROMPTS[:4]:
            npu = s.complete(p, max_tokens=8).model_extra["generation_token_ids"]
            cpu = server.complete(p, max_tokens=8).model_extra["generation_token_ids"]
            assert npu == cpu, (p, npu, cpu)
        npu_lm_eval_holds(s.url, lm_eval_reference, fixtures_dir, "at TP=2")
        assert not s.stop()
        ranks = {}
        for line in report.read_text().splitlines():
            r = json.loads(line)
            if r["calls"].get("npu_fused_infer_attention_score", 0):
                ranks[r["rank"]] = r["calls"]
        # the engine's attention ran in the device kernel (npu tensors only) on both ranks, its norms too
        assert sorted(ranks) == [0, 1] and all(c.get("npu_rms_norm", 0) > 0 for c in ranks.values()), ranks
    finally:
        s.kill()


@needs_api
@pytest.mark.slow
def test_tp1_on_the_emulated_npu_answers_openai_and_lm_eval(stories_ckpt, hf, lm_eval_reference, fixtures_dir,
                                                            tmp_path):
    """The server at TP=1 on the emulated NPU (bf16, 128-token blocks, --return-log-probs):
    the openai client's first 8 greedy tokens of 4 prompts equal HF's (fp32); lm-eval's
    local-completions run (MMLU 4 x 10, BoolQ 20) against ``recipes.evaluate`` (fp32): the model
    here is bf16, its weights rounded to 8 bits of mantissa, so log-likelihoods are held to
    NPU_LL_TOL, predictions to the questions whose best choice leads by more than twice that,
    and all but 2 predictions to recipes.evaluate's.
    The prompts' log-probs come from npu_fused_infer_attention_score (the emulation's count)."""
    report = tmp_path / "npu_report.jsonl"
    s = Server([sys.executable, "-m", "recipes.serve", "--load", str(stories_ckpt), "--block-size-tokens", "128",
                "--params-dtype", "bf16", "--return-log-probs"], emulated_npu_env(EMULATED_NPU_REPORT=str(report)),
               tmp_path / "server.log")
    try:
        _, tok = hf
        for p in PROMPTS[:4]:
            got = s.complete(p, max_tokens=8).model_extra["generation_token_ids"]
            assert got == hf_greedy(hf, tok(p).input_ids, n=8), p
        npu_lm_eval_holds(s.url, lm_eval_reference, fixtures_dir, "at TP=1")
        assert not s.stop()
        calls = [json.loads(line)["calls"] for line in report.read_text().splitlines()]
        assert any(c.get("npu_fused_infer_attention_score", 0) for c in calls), calls
    finally:
        s.kill()


@needs_api
@pytest.mark.slow
def test_the_demo_serves_one_request(stories_ckpt, hf):
    """The demo's last step (``recipes.demo.serve_one_request``): ``python -m recipes.serve`` started
    as a command, one greedy completion over HTTP, SIGTERM; the tokens are HF's."""
    from recipes import demo

    answer = demo.serve_one_request(stories_ckpt, prompt=PROMPTS[0], max_tokens=8)
    _, tok = hf
    assert answer["choices"][0]["generation_token_ids"] == hf_greedy(hf, tok(PROMPTS[0]).input_ids, n=8)
