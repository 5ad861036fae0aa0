"""An OpenAI-compatible server on megatron-core's own: ``MegatronAsyncLLM(...).serve(...)`` (the
dynamic engine: continuous batching, paged KV cache, chunked prefill), for a checkpoint at any TP.

    python -m recipes.serve --load ./llama2-7b-chat-tp1 --tokenizer-name-or-path ./llama-2-7b-chat-hf
    torchrun --nproc-per-node 8 -m recipes.serve --load ./llama2-70b-tp8 --params-dtype bf16 --port 8000

Endpoints (megatron-core's): ``POST /v1/completions``, ``POST /v1/chat/completions`` (the
LLaMA-2-chat template), ``GET /health``; and ``GET /v1/models`` (this recipe's).  Requests are
checked before megatron's handlers read them (``recipes/infer/openai_rules.py``): a bad one gets a
4xx with an OpenAI-shaped error body and the server keeps serving.  ``stream: true`` is refused
with a 400.  Prompts get BOS as HF's tokenizer and the chat template give it.  A LoRA checkpoint
(``--lora-load``) is merged into the weights at load.  A request whose client disconnects is
cancelled, and its KV blocks freed, at the engine's next step (``recipes/infer/cancel.py``).

``--return-log-probs`` keeps every prompt token's logits, as Megatron-LM's server always does, so
``echo`` + ``logprobs`` (lm-eval's log-likelihoods) works; without it such a request gets a 400
(stock megatron's engine stops on one: an assertion in its loop fails every request in flight).

Bound to 127.0.0.1 unless ``--host`` says otherwise.  SIGTERM or Ctrl-C stops the engine, the
coordinator and the HTTP processes; under torchrun every rank stops.

Sizes: ``--inference-max-seq-length`` (default: the checkpoint's sequence length) is one request's
prompt plus output; ``--inference-dynamic-batching-max-requests`` (``--max-requests``) the
requests in one step (more wait); ``--inference-dynamic-batching-buffer-size-gb`` the KV cache.
Unset, the two are derived from the device's free memory after the model loads: as many
full-length requests as fit in half of it (at most 64), and a cache that holds them all at full
length.  ``--inference-dynamic-batching-block-size`` (``--block-size-tokens``; default 64 tokens on
the CPU, megatron-core's 256 elsewhere) is the cache's block; on the NPU the paged attention kernel
takes 128, 256, 384 or 512.
``--inference-dynamic-batching-prefix-caching`` (vLLM's ``--enable-prefix-caching``; off by
default, as in Megatron-LM) lets requests share the blocks of a common prompt prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from typing import List

import torch

from recipes.errors import ArgumentParser, BadInput
from recipes.infer import cancel, dynamic, inference, openai_rules, settings as infer_settings

MAX_DEFAULT_REQUESTS = 64
SHUTDOWN_S = 20
GIB = 2 ** 30


@dataclass(frozen=True)
class Serve:
    checkpoint: infer_settings.Checkpoint
    host: str
    port: int
    model_name: str
    max_sequence_length: int  # 0: the checkpoint's
    max_requests: int         # 0: from the device's memory
    block_size_tokens: int
    buffer_size_gb: float     # 0: from the device's memory
    frontend_replicas: int
    max_request_bytes: int
    prompt_log_probs: bool
    prefix_caching: bool
    prefix_eviction: str
    packed_gemm: bool         # the CPU's MKL-packed GEMMs for decode steps (recipes/infer/dynamic.py)


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    inference.add_checkpoint_flags(p, lora="merged into the weights at load")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=5000, help="default 5000 (Megatron-LM's)")
    g.add_argument("--served-model-name", default=None, help="the model's name in requests and /v1/models "
                                                             "(default: the --load folder's name)")
    g.add_argument("--frontend-replicas", type=int, default=1,
                   help="HTTP processes on rank 0, sharing the port (default 1; megatron-core's own default is 4)")
    g.add_argument("--max-request-bytes", type=int, default=8 * 2 ** 20,
                   help="larger request bodies get a 413 (default 8 MiB)")
    g = p.add_argument_group("engine (Megatron-LM's flag names)")
    g.add_argument("--inference-max-seq-length", type=int, default=0,
                   help="one request's prompt and output tokens (default: the checkpoint's sequence length)")
    g.add_argument("--inference-dynamic-batching-max-requests", "--max-requests", dest="max_requests", type=int,
                   default=0, help="requests in one engine step (default: from the device's free memory)")
    g.add_argument("--inference-dynamic-batching-block-size", "--block-size-tokens", dest="block_size_tokens",
                   type=int, default=None, help="tokens per KV-cache block (default 64 on the CPU, where the decode "
                                             "attention reads whole blocks; megatron-core's 256 elsewhere)")
    g.add_argument("--return-log-probs", action="store_true",
                   help="keep every prompt token's logits, for echo + logprobs (lm-eval's log-likelihoods), as "
                        "Megatron-LM's server does; it costs the output layer over every prompt token")
    g.add_argument("--inference-dynamic-batching-buffer-size-gb", "--kv-buffer-size-gb", dest="buffer_size_gb",
                   type=float, default=0.0, help="the KV cache's memory (default: from the device's free memory)")
    g.add_argument("--inference-dynamic-batching-prefix-caching", "--enable-prefix-caching", dest="prefix_caching",
                   action=argparse.BooleanOptionalAction, default=False,
                   help="requests share the KV blocks of a common prompt prefix, in whole blocks, and skip its "
                        "prefill (default off, as Megatron-LM; vLLM's name is the alias)")
    g.add_argument("--inference-dynamic-batching-prefix-caching-eviction-policy", dest="prefix_eviction",
                   choices=["ref_zero", "lru"], default=None,
                   help="ref_zero (Megatron-LM's default): a cached block is forgotten once no request holds it; "
                        "lru: kept until its space is needed, so a later request can reuse it")
    g.add_argument("--packed-gemm", dest="packed_gemm", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, decode steps of 4 to 16 requests multiply through MKL-packed copies of the "
                        "float32 linear weights (about 2x faster there; the copies take 1.1 to 1.3x the weights' "
                        "memory, more for small layers), made when they fit in half the free memory (default on; "
                        "the start-up line says which GEMMs run)")
    return p


def settings(args) -> Serve:
    c = infer_settings.checkpoint(args)
    if c.pp != 1:
        raise BadInput("--pipeline-model-parallel-size > 1: serving through megatron-core's dynamic engine is "
                       "checked here at TP only; serve with --tensor-model-parallel-size")
    for name in ("port", "frontend_replicas", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} {getattr(args, name)}: give 1 or more")
    for name, flag in (("inference_max_seq_length", "--inference-max-seq-length"),
                       ("max_requests", "--inference-dynamic-batching-max-requests"),
                       ("buffer_size_gb", "--inference-dynamic-batching-buffer-size-gb")):
        if getattr(args, name) < 0:
            raise BadInput(f"{flag} {getattr(args, name)}: give a positive value (or leave it out)")
    if args.block_size_tokens is not None and args.block_size_tokens < 1:
        raise BadInput(f"--inference-dynamic-batching-block-size {args.block_size_tokens}: give 1 or more")
    if args.prefix_eviction and not args.prefix_caching:
        raise BadInput("--inference-dynamic-batching-prefix-caching-eviction-policy without "
                       "--inference-dynamic-batching-prefix-caching: there is no prefix cache to evict from")
    if args.prefix_caching and args.return_log_probs:
        raise BadInput("--inference-dynamic-batching-prefix-caching with --return-log-probs: a cached prefix is not "
                       "run through the model, so its log-probs would be missing; use one or the other")
    name = args.served_model_name or os.path.basename(os.path.normpath(str(args.load)))
    return Serve(c, args.host, args.port, name, args.inference_max_seq_length, args.max_requests,
                 args.block_size_tokens or dynamic.default_block_size(),
                 args.buffer_size_gb, args.frontend_replicas, args.max_request_bytes,
                 args.return_log_probs, args.prefix_caching, args.prefix_eviction or "ref_zero", args.packed_gemm)


class ServeTokenizer(dynamic.EngineTokenizer):
    """The engine tokenizer as the HTTP handlers use it.  ``tokenize`` adds BOS, as HF's tokenizer
    does for a prompt (megatron's completions handler sends its tokens as they are), and
    ``apply_chat_template`` writes LLaMA-2-chat's turns, each opening with BOS, as HF's template
    does.  ``bos`` is None: megatron's chat handler strips leading BOS tokens from a templated
    prompt when the tokenizer names one (and adds one back only on its own ``add_BOS``); the BOS
    here is the text's, as HF has it."""

    chat_template = "llama-2-chat"

    def __init__(self, tok):
        super().__init__(tok)
        self.bos_id, self.bos = tok.bos_id, None

    def tokenize(self, text: str) -> List[int]:
        return [self.bos_id] + list(self.tok.encode(text))

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=True, tools=None, **kwargs):
        from recipes.infer.generate import chat_tokens

        if not tokenize or not add_generation_prompt or tools or kwargs:
            raise ValueError("the LLaMA-2-chat template here renders token ids for a reply, without tools or "
                             "template arguments")
        system, turns = openai_rules.llama2_chat_messages(messages)
        return chat_tokens(self.tok, turns[:-1], turns[-1][0], system)


def free_device_bytes() -> tuple:
    """(the bytes free now on the rank's device with the least, where it came from): every TP
    rank must size the same engine, or their steps would not match."""
    import ascend_patches
    import torch.distributed as dist

    free, where = ascend_patches.device_memory("free")
    least = torch.tensor([free], dtype=torch.int64, device=ascend_patches.device())
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    return int(least.item()), where


def engine_settings(s: Serve, lm, tp: int) -> dynamic.EngineSettings:
    seq = s.max_sequence_length or lm.shape.seq_length
    per_request = seq * dynamic.kv_bytes_per_token(lm.shape, lm.dtype, tp)
    free, where = free_device_bytes()
    requests = s.max_requests
    if requests and requests % tp:
        raise BadInput(f"--inference-dynamic-batching-max-requests {requests} must be a multiple of the TP size {tp} "
                       "(megatron's context splits a step's requests over the TP ranks)")
    if not requests:
        requests = min(MAX_DEFAULT_REQUESTS, int(0.5 * free // per_request)) // tp * tp  # a multiple of TP
        if requests < 1:
            raise BadInput(f"one {seq}-token request's KV cache ({per_request / GIB:.2f} GiB) does not fit half of "
                           f"{where} ({free / GIB:.2f} GiB): lower --inference-max-seq-length or raise "
                           "--tensor-model-parallel-size")
    buffer_gb = s.buffer_size_gb or requests * per_request / GIB
    if buffer_gb * GIB > free:
        raise BadInput(f"a {buffer_gb:.2f} GiB KV cache does not fit {where} ({free / GIB:.2f} GiB): lower "
                       "--inference-dynamic-batching-buffer-size-gb or --inference-dynamic-batching-max-requests")
    return dynamic.EngineSettings(max_requests=requests, block_size_tokens=s.block_size_tokens,
                                  buffer_size_gb=buffer_gb, max_sequence_length=seq,
                                  prompt_log_probs=s.prompt_log_probs, prefix_caching=s.prefix_caching,
                                  prefix_eviction=s.prefix_eviction)


async def run(llm, s: Serve, rank: int) -> None:
    """Serve until SIGTERM or SIGINT, then stop the HTTP processes, the engine and the
    coordinator."""
    from megatron.core.inference.apis import ServeConfig

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await llm.serve(ServeConfig(host=s.host, port=s.port, frontend_replicas=s.frontend_replicas), blocking=False)
    if rank == 0:
        print(f"serving {s.model_name!r} on http://{s.host}:{s.port}/v1 (completions, chat/completions, models); "
              "Ctrl-C or SIGTERM stops it", flush=True)
    engine_done = asyncio.ensure_future(llm.wait_for_shutdown())
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait({engine_done, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if rank == 0:
        print("stopping: the HTTP processes, the engine, the coordinator", flush=True)
    try:
        await asyncio.wait_for(llm.shutdown(), SHUTDOWN_S)
    except asyncio.TimeoutError:  # the coordinator gone (killed), or a rank
        print(f"rank {rank}: the engine did not stop within {SHUTDOWN_S} s; stopping its processes", flush=True)
        stop_children()
        sys.stdout.flush()
        os._exit(1)
    engine_done.cancel()
    signalled.cancel()


@contextlib.contextmanager
def signals_ignored():
    """SIGINT and SIGTERM ignored while megatron spawns its coordinator, which inherits that: a
    terminal's Ctrl-C and torchrun's SIGTERM reach the whole process group, and the coordinator
    died at once (its faulthandler chains to the default action), so the ranks' orderly shutdown,
    which stops it, hung until the timeout."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_children() -> None:
    """Whatever this process started and megatron's shutdown left running."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for c in children:
        c.terminate()
    _, alive = psutil.wait_procs(children, timeout=5)
    for c in alive:
        c.kill()


def main(argv=None):
    s = settings(build_parser().parse_args(argv))
    dynamic.check_release()
    try:
        import hypercorn  # noqa: F401
        import quart  # noqa: F401
        import zmq  # noqa: F401
    except ImportError as e:
        raise BadInput(f"megatron-core's server needs quart, hypercorn and pyzmq ({e}): pip install "
                       "'ascend-patches[serve]'") from None
    from ascend_patches.engine_threads import engine_thread_count, hand_to_engine_thread

    # megatron steps the engine in a thread of its own: this thread keeps one intra-op thread from here on
    # (the load included), and the engine's thread takes the rest (ascend_patches/engine_threads.py)
    hand_to_engine_thread()
    lm, tok = inference.open_checkpoint(s.checkpoint)
    import torch.distributed as dist

    from megatron.core.inference.apis import MegatronAsyncLLM
    from megatron.core.inference.text_generation_server.dynamic_text_gen_server import endpoints

    from recipes.model import lora, parallel

    rank = dist.get_rank()
    if s.checkpoint.lora_load:
        n = lora.merge_in_place(lm.model)
        if rank == 0:
            print(f"merged {n} LoRA adapters from {s.checkpoint.lora_load}", flush=True)
    free, _ = free_device_bytes()  # every rank asks (an all-reduce)
    gemms = dynamic.pack_gemms(lm.model, free, engine_thread_count(), s.packed_gemm)
    if rank == 0 and gemms:
        print(gemms, flush=True)
    engine = engine_settings(s, lm, s.checkpoint.tp)
    tokenizer = ServeTokenizer(tok)
    limits = openai_rules.Limits(s.model_name, engine.max_sequence_length, lm.vocab_size, s.prompt_log_probs)
    endpoints.__all__.append(openai_rules.blueprint(limits, tokenizer.tokenize, tokenizer.apply_chat_template,
                                                    s.max_request_bytes))
    if rank == 0:
        print(f"engine: {engine.max_requests} requests a step, {engine.max_sequence_length}-token requests, "
              f"{engine.block_size_tokens}-token blocks, a {engine.buffer_size_gb:.3f} GiB KV cache"
              f"{f', prefix caching ({engine.prefix_eviction})' if engine.prefix_caching else ''}; "
              f"{lm.shape.describe()}, TP={s.checkpoint.tp}, {lm.dtype}", flush=True)
    cancel.install()  # before the engine, its coordinator and the HTTP processes start
    with signals_ignored():
        llm = MegatronAsyncLLM(model=lm.model, tokenizer=tokenizer, inference_config=dynamic.inference_config(
            lm.model, engine), coordinator_host="127.0.0.1")
    try:
        asyncio.run(run(llm, s, rank))
    finally:
        stop_children()
    parallel.destroy()
    if rank == 0:
        print("stopped", flush=True)
    sys.stdout.flush()
