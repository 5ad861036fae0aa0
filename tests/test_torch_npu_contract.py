"""The NPU path against the real torch_npu wheel, read without importing it.

Where each fact comes from (``tests/helpers/torch_npu_wheel.py`` fetches and caches the wheels):
- op schemas: the strings ``libtorch_npu.so`` registers, parsed by ``torch._C.parse_schema``;
- output shapes and dtypes: the wheel's ``op_plugin/meta/_meta_registrations.py``, run on meta
  tensors;
- the NPU kernels of aten ops (torch's fused AdamW): their wrappers' names in ``libtorch_npu.so``;
- ``is_support_inf_nan``, the RNG calls, ``transfer_to_npu`` and why not ``NpuFusedAdamW``: the
  wheel's Python, read with ``ast``.
The call sites are found by walking ``ascend_patches/``'s AST, never listed by hand.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import torch_npu_wheel as wheel
from tests.helpers.launch import ROOT

PACKAGE = ROOT / "ascend_patches"
CONTRACT = wheel.CONTRACT_VERSION
OPS_CALLED = ("npu_fusion_attention", "npu_fusion_attention_grad", "npu_rms_norm", "npu_swiglu", "npu_rotary_mul")

# The Python half: what a dotted torch_npu call resolves to in the wheel's source.
PYTHON_CONTRACT = {
    "torch_npu.npu.utils.is_support_inf_nan": ("npu/utils.py", None, "is_support_inf_nan"),
    "torch_npu.npu.get_rng_state": ("npu/random.py", None, "get_rng_state"),
    "torch_npu.npu.set_rng_state": ("npu/random.py", None, "set_rng_state"),
}


def _signature_for(version: str, dotted: str) -> inspect.Signature:
    name = dotted.split(".")[-1]
    if dotted == f"torch_npu.{name}" and name.startswith("npu_"):
        return wheel.signature_of_schema(wheel.schemas(version)[name])
    if dotted in PYTHON_CONTRACT:
        rel, cls, fn = PYTHON_CONTRACT[dotted]
        return wheel.signature_of_def(wheel.find_def(wheel.source(version, rel), fn, cls))
    raise KeyError(dotted)


def binding_problems(package: Path, version: str = CONTRACT) -> list:
    """One line per call site in ``package`` that would not bind on torch-npu ``version``."""
    problems = []
    for path, line, dotted, npos, keywords, starred in wheel.torch_npu_calls(package):
        where = f"{path}:{line}: {dotted}"
        if starred:
            problems.append(f"{where} passes *args/**kwargs: the call cannot be checked against the schema")
            continue
        try:
            sig = _signature_for(version, dotted)
        except KeyError:
            problems.append(f"{where}: torch-npu {version} has no such operator or function "
                            "(or this test does not know where its contract is read from)")
            continue
        try:
            sig.bind(*range(npos), **{k: None for k in keywords})
        except TypeError as e:
            problems.append(f"{where}{sig}: {e}")
    return problems


def test_every_torch_npu_call_in_the_package_binds_to_the_wheels_schema():
    calls = list(wheel.torch_npu_calls(PACKAGE))
    called = {dotted.split(".")[-1] for _, _, dotted, *_ in calls}
    assert set(OPS_CALLED) <= called, f"the AST walk missed calls: found {sorted(called)}"
    assert binding_problems(PACKAGE) == []


def test_a_wrong_keyword_or_a_missing_op_fails_the_binding_check(tmp_path):
    """The check itself, on call sites that would fail on an Ascend host: the keyword the
    hand-written reference had (``mode=``), a missing required argument, an op that does not exist,
    an unpacked dict."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "bad.py").write_text(textwrap.dedent("""
        import torch_npu
        def f(x, c, s, kw):
            torch_npu.npu_rotary_mul(x, c, s, mode="half")
            torch_npu.npu_fusion_attention(x, x, x, 4)
            torch_npu.npu_rotary_mul_fast(x, c, s)
            torch_npu.npu_rms_norm(x, c, **kw)
            torch_npu.npu_rms_norm(x, c, epsilon=1e-5)
    """))
    problems = binding_problems(pkg)
    assert len(problems) == 4, problems
    assert "unexpected keyword argument 'mode'" in problems[0]
    assert "missing a required argument: 'input_layout'" in problems[1]
    assert "no such operator" in problems[2] and "*args/**kwargs" in problems[3]


# -- the emulation is derived from the same contract ------------------------------------------
def test_emulated_ops_are_registered_under_the_wheels_schemas(npu_emulated):
    import npu_emulated_ops

    assert npu_emulated_ops.CONTRACT_VERSION == CONTRACT
    for op in OPS_CALLED:
        real = wheel.schema_text(CONTRACT, op)
        assert npu_emulated_ops.SCHEMAS[op] == real
        registered = getattr(torch.ops.npu, op).default._schema
        assert str(registered) == "npu::" + str(torch._C.parse_schema(real)), op
        assert getattr(npu_emulated, op) is getattr(torch.ops.npu, op)  # torch_npu.<op> is torch.ops.npu.<op>
    x = torch.randn(2, 2, 2, 4)
    with pytest.raises(RuntimeError, match="Unknown keyword argument 'mode'"):
        npu_emulated.npu_rotary_mul(x, x, x, mode="half")  # what torch's binder says on an Ascend host too


def _meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) else t


def _attention_cases():
    s, b, n, ng, d = 16, 2, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(s, b, n * d, generator=g).to(dtype)
        kv = torch.randn(s, b, ng * d, generator=g).to(dtype)
        causal = torch.triu(torch.ones(2048, 2048), 1).bool()
        padding = torch.zeros(b, 1, s, s, dtype=torch.bool)
        yield (f"SBH-gqa-causal-{dtype}", (q, kv, kv, n, "SBH"),
               dict(atten_mask=causal, scale=0.3, keep_prob=1.0, pre_tockens=65536, next_tockens=0, sparse_mode=2))
        yield (f"SBH-gqa-mask-{dtype}", (q, kv, kv, n, "SBH"), dict(atten_mask=padding, scale=0.3, sparse_mode=0))
        t = 3 + 6 + 7  # a pack of three sequences, [T, N, D]
        qt = torch.randn(t, n, d, generator=g).to(dtype)
        kvt = torch.randn(t, ng, d, generator=g).to(dtype)
        yield (f"TND-gqa-causal-{dtype}", (qt, kvt, kvt, n, "TND"),
               dict(atten_mask=causal, scale=0.3, keep_prob=1.0, actual_seq_qlen=[3, 9, 16],
                    actual_seq_kvlen=[3, 9, 16], sparse_mode=3))


def _ring_block_cases():
    """The context-parallel ring's blocks: BNSD, GQA, causal (its own K/V) or full (another
    rank's), the backward handed the merged statistics [B, N, S, 8]."""
    b, n, ng, sq, sk, d = 1, 4, 2, 8, 16, 8
    g = torch.Generator().manual_seed(2)
    causal = torch.triu(torch.ones(2048, 2048), 1).bool()
    for dtype in (torch.float32, torch.bfloat16):
        q, dy, o = (torch.randn(b, n, sq, d, generator=g).to(dtype) for _ in range(3))
        stats = torch.randn(b, n, sq, 8, generator=g).abs()
        for name, kv_len, mode, mask in (("causal", sq, 2, causal), ("full", sk, 0, None)):
            kv = torch.randn(b, ng, kv_len, d, generator=g).to(dtype)
            yield ("npu_fusion_attention", f"BNSD-ring-{name}-{dtype}", (q, kv, kv, n, "BNSD"),
                   dict(atten_mask=mask, scale=0.3, keep_prob=1.0, sparse_mode=mode))
            yield ("npu_fusion_attention_grad", f"BNSD-ring-{name}-{dtype}", (q, kv, kv, dy, n, "BNSD"),
                   dict(atten_mask=mask, softmax_max=stats, softmax_sum=torch.ones_like(stats), attention_in=o,
                        scale_value=0.3, keep_prob=1.0, sparse_mode=mode))


def _paged_cases():
    """megatron's dynamic engine step: TND queries, the cache [blocks, 128, KV_N * D], PageAttention."""
    g = torch.Generator().manual_seed(3)
    causal = torch.triu(torch.ones(2048, 2048), 1).bool()
    q = torch.randn(6, 4, 8, generator=g).to(torch.bfloat16)
    cache = torch.randn(4, 128, 2 * 8, generator=g).to(torch.bfloat16)
    table = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    yield ("npu_fused_infer_attention_score", "TND-paged-bf16", (q, cache, cache),
           dict(atten_mask=causal, block_table=table, actual_seq_lengths=[1, 6], actual_seq_lengths_kv=[140, 5],
                num_heads=4, num_key_value_heads=2, scale=0.3, input_layout="TND", sparse_mode=3, block_size=128))


def _cases():
    yield from _paged_cases()
    yield from (("npu_fusion_attention",) + c for c in _attention_cases())
    yield from _ring_block_cases()
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 2, 32, generator=g).to(dtype)
        yield "npu_rms_norm", f"sbh-{dtype}", (x, torch.ones(32, dtype=dtype)), dict(epsilon=1e-5)
        yield "npu_swiglu", f"sbh-{dtype}", (torch.randn(6, 2, 64, generator=g).to(dtype),), dict(dim=-1)
        xr = torch.randn(6, 2, 4, 16, generator=g).to(dtype)
        cs = torch.randn(6, 1, 1, 16, generator=g).to(dtype)
        yield "npu_rotary_mul", f"sbnd-{dtype}", (xr, cs, cs), dict(rotary_mode="half")


CASES = list(_cases())


@pytest.mark.parametrize("op,case,args,kwargs", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_emulated_outputs_match_the_wheels_meta_functions(npu_emulated, op, case, args, kwargs):
    """Same number of outputs, shapes and dtypes as the real meta function gives, for the
    layouts and dtypes the patches use (e.g. softmax_max/sum [B, N, S, 8] float32, rstd [S, B, 1])."""
    meta = wheel.meta_functions(CONTRACT, [op])[op]
    # The dispatcher hands a meta function the schema's arguments in order, not by keyword: the
    # meta functions' own parameter names may differ (npu_rotary_mul's says ``mode`` where the
    # schema says ``rotary_mode``, the keyword a hand-written reference once took from it).
    schema = wheel.schemas(CONTRACT)[op]
    bound = wheel.signature_of_schema(schema).bind(*args, **kwargs)
    bound.apply_defaults()
    positional = [_meta(bound.arguments[a.name]) for a in schema.arguments if not a.kwarg_only]
    keyword = {a.name: _meta(bound.arguments[a.name]) for a in schema.arguments if a.kwarg_only}
    want = meta(*positional, **keyword)
    got = getattr(npu_emulated, op)(*args, **kwargs)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor), (i, g)
            assert (tuple(g.shape), g.dtype) == (tuple(w.shape), w.dtype), f"output {i}"
        elif w is None:  # an undefined tensor (npu_fusion_attention_grad's dpse): torch_npu returns it as None
            assert g is None or (isinstance(g, torch.Tensor) and g.numel() == 0), (i, g)
        else:
            assert type(g) is type(w), (i, g, w)


# -- version-robust RoPE ----------------------------------------------------------------------
EXPECTED_CONVENTION = {"2.1.0.post8": "_rotary_three_tensors", "2.5.1": "_rotary_mode_half",
                       "2.14.0": "_rotary_mode_half"}


def _ast_call_of(fn) -> ast.Call:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and wheel.dotted_name(n.func) == "torch_npu.npu_rotary_mul")


@pytest.mark.parametrize("version", wheel.RELEASES)
def test_rope_picks_the_convention_of_each_release_and_computes_rope(npu_emulated, monkeypatch, version):
    from ascend_patches.ops import rope

    schema = wheel.schemas(version)["npu_rotary_mul"]
    call = rope.rotary_call_for(schema)
    assert call is not None and call.__name__ == EXPECTED_CONVENTION[version], (version, str(schema))
    site = _ast_call_of(call)
    wheel.signature_of_schema(schema).bind(*site.args, **{k.arg: k.value for k in site.keywords})

    # run it through an op registered under exactly that release's schema
    import npu_emulated_ops

    ns = "ascend_contract_" + version.replace(".", "_")
    lib = torch.library.Library(ns, "FRAGMENT")
    params = [a.name for a in schema.arguments]
    impl = (lambda input, r1, r2: npu_emulated_ops.npu_rotary_mul(input, r1, r2, "half")) if len(params) == 3 \
        else npu_emulated_ops.npu_rotary_mul
    npu_emulated_ops.define(lib, {"rot": wheel.schema_text(version, "npu_rotary_mul")}, {"rot": impl})
    monkeypatch.setattr(npu_emulated, "npu_rotary_mul", getattr(torch.ops, ns).npu_rotary_mul)
    s, d = 8, 16
    x = torch.randn(s, 2, 4, d, generator=torch.Generator().manual_seed(3))
    freqs = torch.rand(s, 1, 1, d)
    cos, sin = torch.cos(freqs), torch.sin(freqs)
    torch.testing.assert_close(call(x, cos, sin), rope.rope_reference(x, freqs), rtol=1e-6, atol=1e-6)
    del lib


def test_rope_patch_is_skipped_with_the_schema_when_no_convention_fits(npu_emulated, monkeypatch):
    import ascend_patches
    from ascend_patches.ops import rope
    from megatron.core.models.common.embeddings import rope_utils  # noqa: F401  (the patch's target)

    odd = torch._C.parse_schema("npu_rotary_mul(Tensor input, Tensor r1, Tensor r2, int mode) -> Tensor")
    assert rope.rotary_call_for(odd) is None
    monkeypatch.setattr(rope, "installed_rotary_schema", lambda: odd)
    monkeypatch.setattr(rope, "_npu_call", {"schema": None, "call": None})
    stock = ascend_patches.REGISTRY.original("rope") if "rope" in ascend_patches.REGISTRY.applied else \
        rope_utils._apply_rotary_pos_emb_bshd
    ascend_patches.configure(backend="npu")
    try:
        state, why = ascend_patches.REGISTRY.status["rope"]
        assert state == "skipped" and "int mode" in why, (state, why)
        assert rope_utils._apply_rotary_pos_emb_bshd is stock  # megatron's own RoPE runs
        assert "int mode" in ascend_patches.report()
    finally:
        monkeypatch.undo()
        ascend_patches.configure(backend="npu")
    assert ascend_patches.REGISTRY.status["rope"][0] == "applied"


# -- the Python half --------------------------------------------------------------------------
def test_npu_adamw_is_torchs_fused_kernel_which_the_wheel_implements(npu_emulated):
    """On the NPU backend megatron's Adam slot gets torch.optim.AdamW(fused=True) (Adam for L2
    decay), whose step calls torch._fused_adamw_ / _fused_adam_ with a float rate: torch-npu
    2.14.0 registers an NPU kernel for each (their default overloads), and torch counts the
    PrivateUse1 device among its fused-kernel devices, so on an Ascend host the step is one
    NPU kernel.  Not NpuFusedAdamW: its first step sizes each gradient by its storage and
    combines them, and a main_grad view into megatron's bucket reports the whole bucket."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    from ascend_patches.ops import adamw

    kernels = wheel.npu_kernels(CONTRACT)
    assert {"wrapper_NPU___fused_adamw_", "wrapper_NPU___fused_adam_"} <= kernels
    assert "wrapper_NPU_tensor_lr__fused_adamw_" not in kernels  # a tensor rate is not served: megatron's is a float
    assert torch._C._get_privateuse1_backend_name() in _get_fused_kernels_supported_devices()
    base = wheel.source(CONTRACT, "optim/npu_fused_optim_base.py")
    assert "p.grad.storage().size()" in base and "npu_combine_tensors" in base
    bucket = torch.zeros(1000)
    assert bucket[100:200].untyped_storage().nbytes() == bucket.untyped_storage().nbytes()  # a view's storage

    p = torch.nn.Parameter(torch.ones(3))
    opt = adamw.FusedAdamW([p], lr=None)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] and opt.param_groups[0]["lr"] is None
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="no learning rate"):
        opt.step()
    l2 = adamw.FusedAdamW([p], lr=1e-3, adam_w_mode=False)  # was refused on the NPU: the wheel has _fused_adam_
    assert type(l2) is torch.optim.Adam and l2.defaults["fused"]
    with pytest.raises(TypeError, match="maximize"):
        adamw.FusedAdamW([p], lr=1e-3, maximize=True)


@pytest.mark.parametrize("version", wheel.RELEASES)
def test_is_support_inf_nan_and_the_rng_calls_exist_in_each_release(version):
    utils = wheel.source(version, "npu/utils.py")
    wheel.signature_of_def(wheel.find_def(utils, "is_support_inf_nan")).bind()
    random = wheel.source(version, "npu/random.py")
    wheel.signature_of_def(wheel.find_def(random, "get_rng_state")).bind()
    wheel.signature_of_def(wheel.find_def(random, "set_rng_state")).bind(torch.empty(0))


def _hccl_wrapped_targets(src: str) -> set:
    """Each ``X = ..._wrapper_hccl(...)...`` assignment in transfer_to_npu's ``_init``, as 'module:attr'."""
    out = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Assign) and any(isinstance(n, ast.Name) and n.id == "_wrapper_hccl"
                                                for n in ast.walk(node.value)):
            dotted = wheel.dotted_name(node.targets[0])
            mod, _, attr = dotted.rpartition(".")
            out.add(f"{mod}:{attr}")
    return out


@pytest.mark.parametrize("version", wheel.RELEASES)
def test_transfer_to_npu_renames_nccl_where_the_emulation_does(version):
    src = wheel.source(version, "contrib/transfer_to_npu.py")
    wrapper = wheel.find_def(src, "_wrapper_hccl")
    replaces = {(c.args[0].value, c.args[1].value) for c in ast.walk(wrapper)
                if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "replace"
                and all(isinstance(a, ast.Constant) for a in c.args)}
    assert ("nccl", "hccl") in replaces
    targets = _hccl_wrapped_targets(src)
    assert "torch.distributed:init_process_group" in targets
    if version == CONTRACT:
        emulated = ast.parse((ROOT / "tests" / "npu_emulation" / "torch_npu" / "contrib" / "transfer_to_npu.py").read_text())
        renamed = next(ast.literal_eval(n.value) for n in emulated.body
                       if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "HCCL_RENAMED")
        assert set(renamed) == targets


@pytest.mark.parametrize("version", wheel.RELEASES)
def test_the_npu_rng_patches_are_needed_where_transfer_to_npu_does_not_alias_the_generators(version):
    """megatron's ``_get_cuda_rng_state`` indexes ``torch.cuda.default_generators``; only 2.14's
    transfer_to_npu points that at the NPU's (lazily, after device init), so the device layer
    routes megatron's helpers to ``torch_npu.npu.get/set_rng_state`` on every release."""
    src = wheel.source(version, "contrib/transfer_to_npu.py")
    aliases = any(isinstance(n, ast.Assign) and wheel.dotted_name(n.targets[0]) == "torch.cuda.default_generators"
                  for n in ast.walk(ast.parse(src)))
    assert aliases == (version == "2.14.0")


# What the emulated transfer_to_npu redirects that torch-npu 2.14.0's does not.  The emulation
# installs the CPU device layer as its redirect; torch.cuda.nvtx is not among the modules the
# real one points at torch_npu.npu, so on an Ascend host megatron's nvtx ranges (off unless
# enabled) would reach torch's CUDA stub.
EMULATION_ONLY = {"torch.cuda.nvtx:range_push", "torch.cuda.nvtx:range_pop"}


def test_the_emulated_redirect_covers_only_what_transfer_to_npu_redirects():
    """torch-npu 2.14.0's transfer_to_npu points torch.cuda (and torch.cuda.random) at
    torch_npu.npu (and .random) through ``_patch_cuda``: every name in those modules' ``__all__``
    (``_init/patches/monkey_patches.py``).  Each torch.cuda function the emulation redirects is
    one of them, but for EMULATION_ONLY."""
    from ascend_patches.device import cpu

    def exported(rel):
        tree = ast.parse(wheel.source(CONTRACT, rel))
        return set(next(ast.literal_eval(n.value) for n in tree.body
                        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__"))

    patch_cuda = ast.unparse(wheel.find_def(wheel.source(CONTRACT, "contrib/transfer_to_npu.py"), "_patch_cuda"))
    assert "['cuda', torch_npu.npu]" in patch_cuda and "['cuda.random', torch_npu.npu.random]" in patch_cuda
    assert "for attr in patch.__all__" in wheel.source(CONTRACT, "_init/patches/monkey_patches.py")
    real = {f"torch.cuda:{n}" for n in exported("npu/__init__.py")} | \
        {f"torch.cuda.random:{n}" for n in exported("npu/random.py")}
    emulated = {p.target for p in cpu.patches() if p.target.startswith("torch.cuda")}
    assert emulated - real == EMULATION_ONLY
