"""megatron-core's dynamic inference engine (``MegatronLLM``: continuous batching, paged KV
cache) on the CPU without flash-attn, through recipes.infer.dynamic and ascend_patches'
paged attention (ascend_patches/ops/paged_attention.py).

Reference: HF ``generate`` on the same converted weights (stories260K), greedy, each prompt
alone; tokens must be equal.  The engine's API is in megatron-core 0.19+ (the Python 3.12
job); on older releases the recipe refuses it in one line, which is what runs there.
"""

import json

import pytest
import torch

from ascend_patches.versions import megatron_core_matches
from converters import hf_to_megatron
from recipes.errors import BadInput
from recipes.infer import dynamic
from tests.conftest import emulated_npu_env
from tests.helpers.launch import run_torchrun

HAS_API = megatron_core_matches(dynamic.SERVED)
needs_api = pytest.mark.skipif(not HAS_API, reason="megatron.core.inference.apis is in megatron-core 0.19+ "
                                                   "(the Python 3.12 job runs these)")


@pytest.mark.skipif(HAS_API, reason="this megatron-core has the API")
def test_an_older_megatron_core_is_refused_naming_the_release_that_has_it():
    with pytest.raises(BadInput, match="it is in megatron-core 0.19 and later"):
        dynamic.check_release()


def _step(block, dtype, lens_k=(201, 145, 7, 0), lens_q=(1, 5, 7, 0), compact=False):
    """Three requests in one step: a decode (1 new token after 200), a chunk (5 new after 140) and
    a fresh prefill (7), GQA (8 query heads on 4 KV heads), blocks scattered in the cache (or,
    ``compact``, taken from the top down as megatron's allocator hands them out), a padding
    request (no tokens) and padding rows past the last token."""
    torch.manual_seed(0)
    h, hkv, d = 8, 4, 16
    lens_k, lens_q = list(lens_k), list(lens_q)
    blocks = sum(-(-n // block) for n in lens_k) + 5
    k_cache, v_cache = (torch.randn(blocks, block, hkv, d).to(dtype) for _ in range(2))
    perm = torch.arange(blocks - 1, -1, -1) if compact else torch.randperm(blocks)
    table = torch.full((len(lens_k), -(-max(lens_k) // block) + 1), -1, dtype=torch.int32)
    used = 0
    for r, n in enumerate(lens_k):
        nb = -(-n // block)
        table[r, :nb] = perm[used:used + nb].int()
        used += nb
    q = torch.randn(sum(lens_q) + 3, h, d).to(dtype)  # 3 padding rows
    cu = torch.cumsum(torch.tensor([0] + lens_q), 0).int()
    return q, k_cache, v_cache, cu, torch.tensor(lens_k, dtype=torch.int32), table


def _per_request_reference(q, k_cache, v_cache, cu, lens_k, table):
    """Plain causal SDPA (from the end) over each request's own keys, in fp32."""
    import torch.nn.functional as F

    block, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    h = q.shape[1]
    outs = []
    for r in range(len(lens_k)):
        nk, nq = int(lens_k[r]), int(cu[r + 1] - cu[r])
        if nq == 0:
            continue
        rows = table[r, :-(-nk // block)].long()
        keys = k_cache[rows].float().reshape(-1, hkv, d)[:nk].repeat_interleave(h // hkv, 1)
        vals = v_cache[rows].float().reshape(-1, hkv, d)[:nk].repeat_interleave(h // hkv, 1)
        mask = torch.arange(nk)[None, :] <= (nk - nq + torch.arange(nq))[:, None]
        outs.append(F.scaled_dot_product_attention(q[cu[r]:cu[r + 1]].float().transpose(0, 1), keys.transpose(0, 1),
                                                   vals.transpose(0, 1), attn_mask=mask).transpose(0, 1))
    return torch.cat(outs)


def test_paged_attention_equals_attention_over_each_requests_whole_sequence():
    from ascend_patches.ops.paged_attention import paged_attention

    q, k, v, cu, lens_k, table = _step(16, torch.float32)
    out = paged_attention(q, k, v, cu, lens_k, table, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out[:13], _per_request_reference(q, k, v, cu, lens_k, table), rtol=1e-5,
                               atol=1e-6)  # fp32, another summation order
    assert out[13:].abs().max() == 0


def test_requests_of_unlike_lengths_attend_in_groups_and_still_equal_the_reference():
    """Decodes after 3 to 300 keys, chunks and prefills in one step, out of order: the attention
    pads each group of like lengths to its own longest (2 or 3 groups here), and every request's
    rows still equal plain SDPA over its own keys (fp32, as above)."""
    from ascend_patches.ops.paged_attention import _length_groups, paged_attention

    lens_k = (300, 3, 40, 9, 0, 251, 17, 64, 5, 120, 33, 2, 190)
    lens_q = (1, 1, 40, 1, 0, 1, 17, 3, 1, 1, 1, 2, 1)
    q, k, v, cu, seqlens_k, table = _step(16, torch.float32, lens_k, lens_q)
    live = [i for i, n in enumerate(lens_q) if n]
    order = sorted(live, key=lambda i: lens_k[i])
    groups = _length_groups(torch.tensor([lens_q[i] for i in order]), torch.tensor([lens_k[i] for i in order]))
    assert len(groups) > 1, groups
    out = paged_attention(q, k, v, cu, seqlens_k, table, q.shape[-1] ** -0.5)
    real = sum(lens_q)
    torch.testing.assert_close(out[:real], _per_request_reference(q, k, v, cu, seqlens_k, table), rtol=1e-5,
                               atol=1e-6)
    assert out[real:].abs().max() == 0


def test_decode_rows_attend_where_their_keys_lie_and_equal_the_reference(monkeypatch):
    """Decode rows (one query token) whose blocks lie together attend in place (no gather), the
    step's other rows through the groups; every row equals plain SDPA over its own keys (fp32, as
    above).  The in-place path steps aside, and the gather gives the same rows, when the blocks lie
    scattered, when two rows share a block (a cached prefix), and when a slot past a row's keys
    holds a NaN."""
    from ascend_patches.ops import paged_attention as pa

    taken = []
    in_place = pa._decode_in_place
    monkeypatch.setattr(pa, "_decode_in_place", lambda *a: taken.append(in_place(*a)) or taken[-1])
    lens_k = (300, 3, 40, 9, 0, 251, 17, 64, 5, 120, 33, 2, 190)
    lens_q = (1, 1, 40, 1, 0, 1, 17, 3, 1, 1, 1, 2, 1)
    real = sum(lens_q)

    def check(q, k, v, cu, seqlens_k, table):
        out = pa.paged_attention(q, k, v, cu, seqlens_k, table, q.shape[-1] ** -0.5)
        torch.testing.assert_close(out[:real], _per_request_reference(q, k, v, cu, seqlens_k, table), rtol=1e-5,
                                   atol=1e-6)
        assert out[real:].abs().max() == 0

    step = _step(16, torch.float32, lens_k, lens_q, compact=True)
    check(*step)
    q, k, v, cu, seqlens_k, table = step
    far = table.clone()  # row 1's block moved 150 blocks past the others
    far[1, 0] = k.shape[0] + 150
    k_far, v_far = (torch.cat([c, torch.randn(200, *c.shape[1:])]) for c in (k, v))
    k_far[far[1, 0]], v_far[far[1, 0]] = k[table[1, 0]], v[table[1, 0]]
    check(q, k_far, v_far, cu, seqlens_k, far)
    assert taken == [True, False]
    shared = table.clone()
    shared[3, 0] = shared[1, 0]  # rows 1 and 3 (decodes after 3 and 9 keys) start with the same block
    check(q, k, v, cu, seqlens_k, shared)
    nan_k, nan_v = k.clone(), v.clone()
    nan_k[table[1, 0], 3:] = float("nan")  # past row 1's 3 keys, in its block: its scores are masked
    check(q, nan_k, v, cu, seqlens_k, table)
    nan_v[table[1, 0], 3:] = float("nan")  # and a value there: a zero weight times NaN is NaN
    check(q, nan_k, nan_v, cu, seqlens_k, table)
    assert taken == [True, False, False, True, False]


def test_paged_attention_ignores_what_the_cache_holds_past_a_requests_keys():
    """The cache is allocated empty, so a slot past a request's keys can hold a NaN; masked, it must
    not reach the outputs (a NaN score plus the mask's -inf is still NaN, and poisoned the whole row)."""
    from ascend_patches.ops.paged_attention import paged_attention

    q, k, v, cu, lens_k, table = _step(16, torch.float32)
    clean = paged_attention(q, k, v, cu, lens_k, table, q.shape[-1] ** -0.5)
    used = set()
    for r, n in enumerate(lens_k.tolist()):
        blocks = table[r, :-(-n // 16)].tolist() if n else []
        used.update(blocks)
        if n % 16:
            k[blocks[-1], n % 16:] = float("nan")
            v[blocks[-1], n % 16:] = float("nan")
    free = [i for i in range(k.shape[0]) if i not in used]
    k[free], v[free] = float("nan"), float("nan")  # the blocks no request holds, block 0 among them here
    # the same rows (the decode row may go through the gather instead of in place: another summation order)
    torch.testing.assert_close(paged_attention(q, k, v, cu, lens_k, table, q.shape[-1] ** -0.5), clean, rtol=1e-5,
                               atol=1e-6)


def test_the_npu_path_through_npu_fused_infer_attention_score(npu_emulated):
    """The same step through ``torch_npu.npu_fused_infer_attention_score`` (its 2.14.0 schema,
    emulated): TND, the cache viewed [blocks, 128, Hkv * D], prefix sums, each request's key
    count, sparse_mode 3.  bf16, the kernel's type for PageAttention: within 2e-2 of the fp32
    reference (bf16 keeps 8 bits of mantissa, ~4e-3 per rounding).  fp32 and a 16-token block
    in a step with prompt rows are what the kernel refuses (the wheel's documentation)."""
    from ascend_patches.ops.paged_attention import check_npu_engine, paged_attention_npu

    q, k, v, cu, lens_k, table = _step(128, torch.bfloat16)
    out = paged_attention_npu(q, k, v, cu, lens_k, table, q.shape[-1] ** -0.5)
    assert npu_emulated.calls["npu_fused_infer_attention_score"] == 1
    torch.testing.assert_close(out[:13].float(), _per_request_reference(q, k, v, cu, lens_k, table), rtol=2e-2,
                               atol=2e-2)
    assert out[13:].abs().max() == 0
    with pytest.raises(RuntimeError, match="PageAttention supports key / value float16, bfloat16"):
        paged_attention_npu(*[t.float() if t.is_floating_point() else t for t in _step(128, torch.bfloat16)], 0.25)
    with pytest.raises(RuntimeError, match="block_size must be 128 to 512, a multiple of 128"):
        paged_attention_npu(*_step(16, torch.bfloat16), 0.25)
    with pytest.raises(ValueError, match="takes blocks of 128, 256, 384, 512 tokens"):
        check_npu_engine(16, torch.bfloat16)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        check_npu_engine(256, torch.float32)


@pytest.fixture(scope="module")
def stories_ckpt(tmp_path_factory, fixtures_dir):
    out = tmp_path_factory.mktemp("dyn") / "stories_tp1"
    hf_to_megatron.main(["--input-model-dir", str(fixtures_dir / "stories260K"), "--output-model-dir", str(out)])
    return out


@needs_api
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_llm_greedy_tokens_equal_hf_generate(stories_ckpt, fixtures_dir, tp):
    out = run_torchrun("dynamic_engine_checks.py", tp, stories_ckpt, fixtures_dir / "stories260K", nproc=tp,
                       timeout=600)
    rows = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])
    assert len(rows) == 12 and sum(r["n"] == 40 for r in rows if r["eos"] == 2) == 6
    assert len({r["n"] for r in rows if r["eos"] == 426}) > 2  # requests finished at different steps
    bad = [r for r in rows if not r["equal"]]
    assert not bad, bad
    # prefix caching (--inference-dynamic-batching-prefix-caching, LRU): HF's tokens on both passes, and the
    # second ran fewer tokens through the model (the shared blocks came from the cache)
    prefix = json.loads([line for line in out.splitlines() if line.startswith("PREFIX ")][-1][len("PREFIX "):])
    print(f"TP={tp} prefix caching: tokens through the embedding {prefix['embedded']} (first pass, second)")
    assert prefix["equal"] == [True, True] and prefix["embedded"][1] < prefix["embedded"][0], prefix
    # under megatron's coordinator (recipes.serve's engine): HF's tokens, no dummy forward during the work or
    # half a second after it (megatron's default ep_consensus_interval ran up to 19 after the last request),
    # and every forward in the engine's own thread with the 2 intra-op threads the script's main thread handed
    # it, the main thread keeping one: recipes.serve's arrangement
    coordinator = json.loads([line for line in out.splitlines() if line.startswith("COORDINATOR ")][-1][12:])
    assert coordinator == {"equal": True, "dummy_forwards": 0, "forward_threads": [[False, 2]], "handed": 2,
                           "main_thread": 1}, coordinator


NEAR_TIE = 0.1  # fp32 logits this close are a tie in bf16 (under two of its spacings at 8 to 16, 0.0625)


def _tokens(out):
    return json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])


@needs_api
@pytest.mark.slow
def test_on_the_emulated_npu_the_engine_runs_on_the_device(stories_ckpt, fixtures_dir):
    """MegatronLLM on the emulated NPU (every kernel takes npu tensors only; the paged attention is
    npu_fused_infer_attention_score) against the same engine on the CPU, both bf16 with 128-token
    blocks (the kernel's smallest for prompt rows), prompts up to 131 tokens and 40 new ones.
    The two attentions round differently in bf16, so a near-tie can flip a token and the rest
    of its continuation.  Asserted: 40 tokens each where eos is 2, and where two part, the
    two tokens they chose are a near-tie in HF's fp32 logits (within NEAR_TIE, 0.1: bf16's
    spacing at a logit near 9 is 0.0625, and 20 steps of a bf16 cache add to it); at least 9 of
    12 whole.  Measured: 9 of 12 whole, the others part at tokens 3, 3 (the same step, once per
    eos; fp32 gap 0.013) and 21 (gap 0.050)."""
    args = ("dynamic_engine_checks.py", 1, stories_ckpt, "-", "bf16", 128)
    cpu = _tokens(run_torchrun(*args, nproc=1, timeout=600))
    npu = _tokens(run_torchrun(*args, nproc=1, timeout=600, env=emulated_npu_env()))
    pairs = [(p, a, b) for ra, rb in zip(cpu, npu) for p, a, b in zip(ra["prompts"], ra["tokens"], rb["tokens"])]
    assert len(pairs) == 12 and all(len(a) == len(b) == 40 for _, a, b in pairs[:6]), pairs  # eos 2: never chosen
    parted = [(p, a, b) for p, a, b in pairs if a != b]
    assert len(parted) <= 3, parted
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(fixtures_dir / "stories260K", dtype=torch.float32).eval()
    for p, a, b in parted:
        k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        with torch.no_grad():
            logits = hf(torch.tensor([p + a[:k]])).logits[0, -1]
        gap = abs(float(logits[a[k]] - logits[b[k]]))
        assert gap < NEAR_TIE, (p, k, a[k], b[k], gap)
