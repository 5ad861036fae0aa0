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


def test_paged_attention_equals_attention_over_each_requests_whole_sequence():
    """Three requests in one step: a decode (1 new token after 20), a chunk (5 new after 9) and a
    fresh prefill (7), GQA (8 query heads on 4 KV heads), blocks of 4 scattered in the cache,
    and padding rows past the last token.  Each request's output against plain causal SDPA over
    its own keys; padding rows zero."""
    import torch.nn.functional as F

    from ascend_patches.ops.paged_attention import paged_attention

    torch.manual_seed(0)
    h, hkv, d, block = 8, 4, 16, 4
    lens_k, lens_q = [21, 14, 7], [1, 5, 7]
    k_cache, v_cache = torch.randn(40, block, hkv, d), torch.randn(40, block, hkv, d)
    perm = torch.randperm(40)
    table = torch.full((3, 6), -1, dtype=torch.int32)
    used = 0
    for r, n in enumerate(lens_k):
        nb = -(-n // block)
        table[r, :nb] = perm[used:used + nb].int()
        used += nb
    q = torch.randn(sum(lens_q) + 3, h, d)  # 3 padding rows
    cu = torch.tensor([0, 1, 6, 13], dtype=torch.int32)
    out = paged_attention(q, k_cache, v_cache, cu, torch.tensor(lens_k, dtype=torch.int32), table, d ** -0.5)
    for r, (nk, nq) in enumerate(zip(lens_k, lens_q)):
        rows = table[r, :-(-nk // block)].long()
        keys = k_cache[rows].reshape(-1, hkv, d)[:nk].repeat_interleave(h // hkv, 1)
        vals = v_cache[rows].reshape(-1, hkv, d)[:nk].repeat_interleave(h // hkv, 1)
        qr = q[cu[r]:cu[r + 1]]
        mask = torch.arange(nk)[None, :] <= (nk - nq + torch.arange(nq))[:, None]
        want = F.scaled_dot_product_attention(qr.transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1),
                                              attn_mask=mask).transpose(0, 1)
        torch.testing.assert_close(out[cu[r]:cu[r + 1]], want, rtol=1e-5, atol=1e-6)  # fp32, another sum order
    assert out[13:].abs().max() == 0


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


@needs_api
@pytest.mark.slow
def test_on_the_emulated_npu_a_dynamic_batch_is_refused_in_one_line(stories_ckpt, fixtures_dir):
    """Its kernel there (npu_fused_infer_attention_score with a block table) is not built: the
    first step says so instead of failing inside flash-attn's missing kernels."""
    proc = run_torchrun("dynamic_engine_checks.py", 1, stories_ckpt, fixtures_dir / "stories260K", nproc=1,
                        timeout=300, check=False, env=emulated_npu_env())
    assert proc.returncode != 0
    assert "NotImplementedError: megatron-core's dynamic inference engine on the NPU needs paged attention " \
           "through torch_npu.npu_fused_infer_attention_score" in proc.stdout + proc.stderr, proc.stderr[-3000:]
