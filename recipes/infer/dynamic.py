"""megatron-core's dynamic inference engine, as its high-level API ships it (``MegatronLLM``:
continuous batching, a paged KV cache, chunked prefill), on a model ``recipes.infer.inference``
loaded.  ascend_patches makes it run without flash-attn (``ascend_patches/ops/paged_attention.py``).

The API is in megatron-core 0.19 and later (``megatron.core.inference.apis``); an older release is
refused in one line that names the release that has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from recipes.errors import BadInput

SERVED = ">=0.19"  # the megatron-core releases with megatron.core.inference.apis


def check_release() -> None:
    import importlib.metadata as md

    from ascend_patches.versions import megatron_core_matches

    if not megatron_core_matches(SERVED):
        raise BadInput(f"megatron-core {md.version('megatron-core')} has no dynamic inference API "
                       "(megatron.core.inference.apis, MegatronLLM): it is in megatron-core 0.19 and later; "
                       "install megatron-core>=0.19 (Python 3.12)")


class EngineTokenizer:
    """The tokenizer interface megatron's text generation controller reads (``tokenize``,
    ``detokenize``, ``eod``, ``bos``, ``vocab_size``), over ``recipes.data.tokenizer``'s.
    ``tokenize`` adds no BOS: megatron adds it when ``SamplingParams.add_BOS`` asks, as HF does."""

    def __init__(self, tok):
        self.tok = tok
        self.eod, self.bos, self.vocab_size = tok.eos_id, tok.bos_id, tok.vocab_size
        self.offsets = None

    def tokenize(self, text: str) -> List[int]:
        return list(self.tok.encode(text))

    def detokenize(self, ids, remove_special_tokens: bool = False, **_) -> str:
        ids = [int(i) for i in ids]
        if remove_special_tokens:
            ids = [i for i in ids if i not in (self.bos, self.eod)]
        return self.tok.decode(ids)


CPU_BLOCK_TOKENS = 64  # the CPU's paged-attention decode reads whole blocks (ascend_patches/ops/paged_attention.py)


def default_block_size() -> int:
    """The KV cache's block for this backend: 64 tokens on the CPU, whose decode attention reads
    its rows' blocks whole (bench_serve's 16-client round: 2.20 to 2.41 s with 64, 2.49 to 2.57 s
    with 256, interleaved); megatron-core's 256 elsewhere (the NPU's paged attention takes 128 to
    512)."""
    import ascend_patches

    return CPU_BLOCK_TOKENS if ascend_patches.settings().backend == "cpu" else 256


@dataclass(frozen=True)
class EngineSettings:
    max_requests: int = 16           # requests in one step; more wait in the engine's queue
    block_size_tokens: int = 0       # the paged KV cache's block; 0: default_block_size()
    buffer_size_gb: float = 1.0      # the KV cache's memory
    max_sequence_length: int = 4096  # prompt and generated tokens of one request
    prompt_log_probs: bool = False   # logits for every prompt token (echo + logprobs), not only the last
    prefix_caching: bool = False     # requests share the KV blocks of a common prompt prefix (whole blocks)
    prefix_eviction: str = "ref_zero"  # ref_zero: a block is forgotten when no request holds it; lru: kept till needed


def inference_config(model, settings: EngineSettings):
    """megatron-core's ``InferenceConfig`` for ``settings``, once the release and (on the NPU) the
    paged attention kernel's block size and dtype are checked; ``model`` goes to eval mode."""
    check_release()
    from megatron.core.inference.config import InferenceConfig, PrefixCachingEvictionPolicy

    model.eval()
    import ascend_patches

    block = settings.block_size_tokens or default_block_size()
    if ascend_patches.settings().backend == "npu":
        from ascend_patches.ops.paged_attention import check_npu_engine

        try:
            check_npu_engine(block, next(model.parameters()).dtype)
        except ValueError as e:
            raise BadInput(str(e)) from None
    return InferenceConfig(block_size_tokens=block, buffer_size_gb=settings.buffer_size_gb,
                           max_requests=settings.max_requests, max_sequence_length=settings.max_sequence_length,
                           materialize_only_last_token_logits=not settings.prompt_log_probs,
                           enable_prefix_caching=settings.prefix_caching,
                           prefix_caching_eviction_policy=PrefixCachingEvictionPolicy(settings.prefix_eviction),
                           # LLaMA-2 has no experts: the engine's expert-parallel group is this rank alone and its
                           # "consensus" a local read, yet under the coordinator megatron keeps the last one for
                           # 20 steps (its default), so for up to 19 steps after the last request finished it
                           # ran full dummy forwards (13% of the engine's samples under bench_serve's load)
                           ep_consensus_interval=1)


def pack_gemms(model, free_bytes: int, threads: int, wanted: bool = True) -> str:
    """On the CPU backend, MKL-packed copies of ``model``'s float32 linear weights for decode steps
    of 4 to 16 requests (``ascend_patches/ops/packed_linear.py``: measured 2x faster GEMMs there),
    when they fit in half of ``free_bytes``, for GEMMs on ``threads`` intra-op threads (the
    engine's), unless not ``wanted`` (``--no-packed-gemm``): the line that says what was done ('' off
    the CPU).  Call once the weights are final (LoRA merged)."""
    import ascend_patches

    if ascend_patches.settings().backend != "cpu":
        return ""
    if not wanted:
        return "CPU GEMMs: plain (--no-packed-gemm)"
    from ascend_patches.ops import packed_linear

    why = packed_linear.unavailable()
    if why:
        return f"CPU GEMMs: plain ({why})"
    if not packed_linear.packable(model):
        return "CPU GEMMs: plain (no float32 linear weights)"
    took = packed_linear.pack(model, free_bytes // 2, threads)
    if took < 0:
        return (f"CPU GEMMs: plain (packed copies of the weights would pass half the free memory, "
                f"{free_bytes / 2 ** 31:.2f} GiB)")
    return f"CPU GEMMs: MKL-packed copies of the linear weights for 4 to 16 rows ({took / 2 ** 30:.2f} GiB)"


def build_llm(model, tokenizer, settings: EngineSettings, use_coordinator: bool = False):
    """``MegatronLLM`` over ``model`` (every rank calls this, in direct mode each rank runs the
    engine in lockstep), with the CPU's packed GEMMs (rank 0 prints which GEMMs run)."""
    config = inference_config(model, settings)
    import ascend_patches
    import torch.distributed as dist
    from ascend_patches.engine_threads import engine_thread_count

    line = pack_gemms(model, ascend_patches.device_memory("free")[0], engine_thread_count())
    if line and (not dist.is_initialized() or dist.get_rank() == 0):
        print(line, flush=True)
    from megatron.core.inference.apis import MegatronLLM

    return MegatronLLM(model=model, tokenizer=EngineTokenizer(tokenizer), inference_config=config,
                       use_coordinator=use_coordinator)


def kv_bytes_per_token(shape, dtype, tp: int) -> int:
    """Keys and values of one token in every layer on one TP rank."""
    import torch

    return 2 * shape.num_layers * max(1, shape.num_query_groups // tp) * shape.kv_channels * (torch.finfo(dtype).bits // 8)


def greedy(llm, prompts: List[List[int]], max_new_tokens: int, eos_id: Optional[int]) -> List[List[int]]:
    """Each prompt's greedy continuation (ending at ``eos_id``, which is kept, as HF keeps it)."""
    from megatron.core.inference.apis import SamplingParams

    params = SamplingParams(num_tokens_to_generate=max_new_tokens, top_k=1,
                            termination_id=-1 if eos_id is None else eos_id)
    return [[int(t) for t in r.generated_tokens] for r in llm.generate([list(p) for p in prompts], params)]
