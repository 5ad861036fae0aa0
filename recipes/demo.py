"""The README's main job on the CPU default, tensor-parallel over 2 processes:
1. preprocess the shipped Alpaca sample into a Megatron indexed dataset;
2. pretrain a tiny LLaMA-2 on stock megatron-core with ascend_patches, checkpointing;
3. convert the shipped, really trained stories260K model (HF format) to Megatron and
   generate text from it (greedy and beam search, KV cache);
4. LoRA-fine-tune it on the Alpaca sample (instruction data, responses only) and merge the
   adapter into an HF folder;
5. evaluate the model before and after LoRA on MMLU (4 subjects) and BoolQ;
6. serve it with ``python -m recipes.serve`` (megatron-core's OpenAI-compatible server) and
   send it one completion request: on megatron-core 0.19+, which has the server API; on an older
   release (the README's default stack, 0.16.1) this step says so and is skipped.

    torchrun --nproc-per-node 2 -m recipes.demo [--train-iters 60] [--out demo_out]

The converters run as the commands a user types (``python -m converters...``), printed
before they run: the recipes never import the converters.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

import ascend_patches
from recipes.errors import ArgumentParser
from recipes.data import preprocess_data
from recipes.infer import evaluate, generate
from recipes.train import pretrain
from recipes.model import checkpointing, flags

HERE = Path(__file__).resolve().parent / "demo_data"
TOKENIZER = HERE / "tokenizer_stories260K.model"


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def _command(*argv) -> None:
    """Run a converter as its command line (rank 0 only)."""
    cmd = [sys.executable, "-m", *map(str, argv)]
    print("$ python -m " + " ".join(shlex.quote(str(a)) for a in argv), flush=True)
    subprocess.run(cmd, check=True)


def prepare(args, out: Path) -> None:
    """Step 1 and the stories260K conversion (rank 0)."""
    print(ascend_patches.short_report(import_targets=True), flush=True)
    print("\n== 1. preprocess the shipped Alpaca sample (responses as pretraining text)", flush=True)
    preprocess_data.main(["--input", str(HERE / "alpaca_data_sample.json"), "--tokenizer-name-or-path",
                          str(TOKENIZER), "--output-prefix", str(out / "data" / "alpaca"), "--json-keys", "output",
                          "--append-eod", "--workers", "2", "--log-interval", "100000"])
    preprocess_data.main(["--input", str(HERE / "alpaca_data_sample.json"), "--tokenizer-name-or-path",
                          str(HERE / "stories260K"), "--output-prefix", str(out / "data" / "alpaca_sft"),
                          "--handler-name", "GeneralInstructionHandler", "--seq-length", "256",
                          "--workers", "2", "--log-interval", "100000"])
    for stale in (out / "lora", out / "stories260K_lora_merged_hf"):
        if stale.exists():
            shutil.rmtree(stale)  # a fresh fine-tune each run, not a resume
    converted = out / "stories260K_megatron"
    if checkpointing.latest_iteration(converted) is None:
        _command("converters.hf_to_megatron", "--input-model-dir", HERE / "stories260K", "--output-model-dir",
                 converted, "--tensor-model-parallel-size", args.tensor_model_parallel_size)


def pretrain_tiny(args, out: Path, rank: int) -> None:
    tp, ckpt = str(args.tensor_model_parallel_size), out / "ckpt"
    _say(rank, f"\n== 2. pretrain llama2-tiny, TP={tp}, {args.train_iters} iterations")
    pretrain.main(["--model", "llama2-tiny", "--data-path", str(out / "data" / "alpaca_output_document"),
                   "--tokenizer-name-or-path", str(TOKENIZER), "--train-iters", str(args.train_iters),
                   "--tensor-model-parallel-size", tp, "--seq-length", "128", "--micro-batch-size", "4",
                   "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "5",
                   "--save", str(ckpt), "--save-interval", str(max(1, args.train_iters // 2)),
                   "--eval-interval", str(max(1, args.train_iters // 3)), "--eval-iters", "2", "--log-interval", "10",
                   "--overwrite"])  # each demo run is a fresh one into its own folder
    if rank == 0:
        recs = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]
        first, last = recs[0]["loss"], recs[-1]["loss"]
        print(f"\nloss {first:.4f} -> {last:.4f}: {'fell' if last < first else 'DID NOT FALL'}; checkpoint {ckpt}, "
              f"metrics {ckpt / 'metrics.jsonl'}", flush=True)
        if not last < first:
            raise SystemExit(1)


def generate_stories(args, out: Path, rank: int) -> None:
    _say(rank, f"\n== 3. generate with stories260K (converted from HF to Megatron, TP="
               f"{args.tensor_model_parallel_size}): greedy, then beam search")
    load = str(out / "stories260K_megatron")
    generate.main(["--load", load, "--prompt", "Once upon a time", "--prompt", "The little dog", "--max-new-tokens",
                   "60", "--greedy"])
    generate.main(["--load", load, "--prompt", "Lily saw a bird", "--num-beams", "4", "--max-new-tokens", "40"])


def lora_finetune(args, out: Path, rank: int) -> None:
    tp = str(args.tensor_model_parallel_size)
    _say(rank, f"\n== 4. LoRA fine-tune of stories260K on the Alpaca sample (responses only), TP={tp}")
    pretrain.main(["--load", str(out / "stories260K_megatron"), "--data-path", str(out / "data" / "alpaca_sft"),
                   "--is-instruction-dataset", "--train-iters", "20", "--seq-length", "256",
                   "--tensor-model-parallel-size", tp, "--micro-batch-size", "4", "--global-batch-size", "8",
                   "--lr", "5e-3", "--lr-warmup-iters", "2", "--lora-target-modules", "query_key_value", "dense",
                   "gate_proj", "up_proj", "down_proj", "--lora-r", "8", "--lora-alpha", "16",
                   "--save", str(out / "lora"), "--log-interval", "5"])
    if rank == 0:
        _command("converters.merge_lora", "--base", out / "stories260K_megatron", "--lora", out / "lora",
                 "--output-model-dir", out / "stories260K_lora_merged_hf", "--to-hf")


def evaluate_before_after(out: Path, rank: int) -> None:
    _say(rank, "\n== 5. evaluate before and after LoRA: MMLU (0-shot, 50 questions per subject), BoolQ")
    scores = []
    for label, extra in (("base", []), ("after LoRA", ["--lora-load", str(out / "lora")])):
        for task, path, more in (("mmlu", HERE / "mmlu" / "test", ["--limit", "50"]), ("boolq", HERE / "boolq", [])):
            summary, _ = evaluate.main(["--task", task, "--task-data-path", str(path), "--load",
                                        str(out / "stories260K_megatron"), "--micro-batch-size", "16", *more, *extra])
            scores.append((label, task, summary))
    if rank == 0:  # the four runs side by side, each beside what guessing scores
        print(f"\n{'model':<11} {'task':<6} {'questions':>9} {'accuracy':>9} {'chance':>7} {'majority':>9}")
        for label, task, s in scores:
            print(f"{label:<11} {task:<6} {s['questions']:>9d} {s['accuracy']:>9.4f} {s['chance']:>7.4f} "
                  f"{s['majority']:>9.4f}")
        print("(a model this small, 260K parameters, is not expected to beat chance or the majority answer; the "
              "numbers show the pipeline end to end)", flush=True)


# torchrun's variables: the server is a command of its own, one rank, not a member of the demo's group
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def serve_one_request(load: Path, prompt: str = "Once upon a time", max_tokens: int = 40) -> dict:
    """Start ``python -m recipes.serve --load LOAD`` on a free port of 127.0.0.1, send one greedy
    completion request, stop the server with SIGTERM; the answer's JSON."""
    import os
    import signal
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    argv = ["recipes.serve", "--load", str(load), "--port", str(port), "--served-model-name", "stories260K",
            "--block-size-tokens", "16"]
    print("$ python -m " + " ".join(shlex.quote(a) for a in argv), flush=True)
    server = subprocess.Popen([sys.executable, "-m", *argv], env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"recipes.serve exited (rc={server.returncode}) before it answered")
            try:
                urllib.request.urlopen(url + "/models", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    raise SystemExit("recipes.serve did not answer within 300 s") from None
                time.sleep(1)
        body = {"model": "stories260K", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        print(f"$ curl {url}/completions -d '{json.dumps(body)}'", flush=True)
        request = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.load(r)
        print(f"{prompt}{answer['choices'][0]['text']}", flush=True)
        return answer
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def serve(out: Path, rank: int) -> None:
    from ascend_patches.versions import megatron_core_matches, version_of

    from recipes.infer import dynamic

    if rank == 0:
        if megatron_core_matches(dynamic.SERVED):
            print("\n== 6. serve stories260K with recipes.serve (megatron-core's OpenAI-compatible server) and "
                  "send it one request", flush=True)
            serve_one_request(out / "stories260K_megatron")
        else:
            print(f"\n== 6. serve: skipped. recipes.serve runs megatron-core's server API "
                  f"(megatron.core.inference.apis, {dynamic.SERVED}); this stack has megatron-core "
                  f"{version_of('megatron-core')}. The README's Python 3.12 stack (megatron-core 0.19.2) runs this "
                  "step", flush=True)
    dist.barrier()


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="where everything is written (default demo_out)")
    p.add_argument("--train-iters", type=int, default=60, help="pretraining iterations (default 60)")
    flags.add_layout_flags(p, "default: the world size", with_pp=False)
    args = p.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    dist.init_process_group(backend=ascend_patches.dist_backend())
    args.tensor_model_parallel_size = args.tensor_model_parallel_size or dist.get_world_size()
    rank = dist.get_rank()
    if rank == 0:
        prepare(args, out)
    dist.barrier()
    pretrain_tiny(args, out, rank)
    generate_stories(args, out, rank)
    lora_finetune(args, out, rank)
    evaluate_before_after(out, rank)
    serve(out, rank)
    if rank == 0:
        print(f"\ndemo done in {time.perf_counter() - started:.0f} s; it wrote, under {out}/:")
        for name, what in (("data/", "the indexed datasets (alpaca_output_document, alpaca_sft_packed_*)"),
                           ("ckpt/", "the pretrained llama2-tiny checkpoint and its metrics.jsonl"),
                           ("stories260K_megatron/", "stories260K converted from HF to Megatron"),
                           ("lora/", "the LoRA adapter checkpoint"),
                           ("stories260K_lora_merged_hf/", "the adapter merged into an HF folder")):
            print(f"  {name:<28} {what}", flush=True)


if __name__ == "__main__":
    main()
