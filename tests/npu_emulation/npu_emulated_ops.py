"""The numerics of the emulated torch_npu ops, registered under the schemas torch_npu registers.  TESTS ONLY.

The real ``torch_npu.<op>`` *is* ``torch.ops.npu.<op>`` (torch_npu's ``_exports.py``), so the
emulation registers each op it covers with ``torch.library`` under the very schema string
torch-npu 2.14.0's ``libtorch_npu.so`` holds (``SCHEMAS``; ``tests/test_torch_npu_contract.py``
checks them against the wheel and the outputs against the wheel's meta functions).  torch's
dispatcher then binds a call exactly as on an Ascend host: a keyword the real op rejects fails
here with the same "Unknown keyword argument" error.  The numerics are plain torch on the CPU,
with the argument checks the real kernels make on the layouts the patches use.

This module is not named ``torch_npu``: the ``npu_emulated`` fixture drops ``torch_npu*`` from
``sys.modules`` between tests, while torch keeps an op library for the life of the process, so
the ops are defined once, here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONTRACT_VERSION = "2.14.0"
SCHEMAS = {
    "npu_fusion_attention": (
        'npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, '
        'Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., '
        'float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, '
        'int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, '
        'bool gen_mask_parallel=True, bool sync=False, str softmax_layout="", Tensor? sink=None, '
        'Tensor? dropout_mask=None, int seed=0, int offset=0) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)'),
    "npu_fusion_attention_grad": (
        'npu_fusion_attention_grad(Tensor query, Tensor key, Tensor value, Tensor dy, int head_num, '
        'str input_layout, *, Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, '
        'Tensor? softmax_max=None, Tensor? softmax_sum=None, Tensor? softmax_in=None, Tensor? attention_in=None, '
        'float scale_value=1., float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, '
        'int inner_precise=0, int seed=0, int offset=0, int numels=0, int[]? prefix=None, '
        'int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, '
        'bool gen_mask_parallel=True, bool sync=False, str softmax_layout="", Tensor? sink=None) '
        '-> (Tensor, Tensor, Tensor, Tensor, Tensor)'),
    "npu_fused_infer_attention_score": (
        'npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? pse_shift=None, '
        'Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None, SymInt[]? actual_seq_lengths_kv=None, '
        'Tensor? dequant_scale1=None, Tensor? quant_scale1=None, Tensor? dequant_scale2=None, '
        'Tensor? quant_scale2=None, Tensor? quant_offset2=None, Tensor? antiquant_scale=None, '
        'Tensor? antiquant_offset=None, Tensor? key_antiquant_scale=None, Tensor? key_antiquant_offset=None, '
        'Tensor? value_antiquant_scale=None, Tensor? value_antiquant_offset=None, Tensor? block_table=None, '
        'Tensor? query_padding_size=None, Tensor? kv_padding_size=None, Tensor? key_shared_prefix=None, '
        'Tensor? value_shared_prefix=None, SymInt[]? actual_shared_prefix_len=None, Tensor? query_rope=None, '
        'Tensor? key_rope=None, Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, '
        'int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout="BSH", '
        'int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0, '
        'int antiquant_mode=0, int key_antiquant_mode=0, int value_antiquant_mode=0, '
        'bool softmax_lse_flag=False) -> (Tensor, Tensor)'),
    "npu_rms_norm": "npu_rms_norm(Tensor input, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
    "npu_swiglu": "npu_swiglu(Tensor input, int dim=-1) -> Tensor",
    "npu_rotary_mul": ("npu_rotary_mul(Tensor input, Tensor r1, Tensor r2, str rotary_mode='half', "
                       "Tensor? rotate=None) -> Tensor"),
}
calls = {name: 0 for name in SCHEMAS}


def _count(op: str, *tensors) -> None:
    """One call of ``op``; on the emulated device, a CPU tensor is refused as the real kernel
    (which has no CPU implementation) refuses it."""
    import sys

    calls[op] += 1
    device = sys.modules.get("torch_npu.device")
    if device is not None:
        device.require_npu(op, *tensors)

_LAYOUTS = ("SBH", "BSH", "BNSD", "BSND", "TND")


def _to_bnsd(t: torch.Tensor, layout: str, heads: int, name: str):
    if layout == "BNSD":
        if t.dim() != 4:
            raise RuntimeError(f"npu_fusion_attention: {name} must be 4-D for BNSD, got {tuple(t.shape)}")
        return t
    if layout == "BSND":
        if t.dim() != 4:
            raise RuntimeError(f"npu_fusion_attention: {name} must be 4-D for BSND, got {tuple(t.shape)}")
        return t.permute(0, 2, 1, 3)
    if t.dim() != 3:
        raise RuntimeError(f"npu_fusion_attention: {name} must be 3-D for {layout}, got {tuple(t.shape)}")
    if t.shape[-1] % heads:
        raise RuntimeError(f"npu_fusion_attention: {name} hidden {t.shape[-1]} not divisible by {heads} heads")
    d = t.shape[-1] // heads
    if layout == "SBH":
        s, b, _ = t.shape
        return t.reshape(s, b, heads, d).permute(1, 2, 0, 3)
    b, s, _ = t.shape  # BSH
    return t.reshape(b, s, heads, d).permute(0, 2, 1, 3)


def _from_bnsd(o: torch.Tensor, layout: str):
    b, n, s, d = o.shape
    if layout == "BNSD":
        return o
    if layout == "BSND":
        return o.permute(0, 2, 1, 3)
    if layout == "SBH":
        return o.permute(2, 0, 1, 3).reshape(s, b, n * d)
    return o.permute(0, 2, 1, 3).reshape(b, s, n * d)


def _kv_heads(t: torch.Tensor, layout: str, head_dim: int) -> int:
    if layout in ("BNSD",):
        return t.shape[1]
    if layout == "BSND":
        return t.shape[2]
    if t.shape[-1] % head_dim:
        raise RuntimeError("npu_fusion_attention: key/value hidden size is not a multiple of head_dim")
    return t.shape[-1] // head_dim


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                         actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                         softmax_layout="", sink=None, dropout_mask=None, seed=0, offset=0):
    _count("npu_fusion_attention", query, key, value, atten_mask, pse, padding_mask)
    if softmax_layout or sink is not None or dropout_mask is not None:
        raise NotImplementedError("the emulation does not cover softmax_layout / sink / dropout_mask")
    if input_layout not in _LAYOUTS:
        raise RuntimeError(f"npu_fusion_attention: input_layout {input_layout!r} not in {_LAYOUTS}")
    if not isinstance(head_num, int) or head_num <= 0:
        raise RuntimeError(f"npu_fusion_attention: head_num must be a positive int, got {head_num!r}")
    if pse is not None or padding_mask is not None or prefix is not None:
        raise NotImplementedError("the emulation does not cover pse / padding_mask / prefix")
    if not 0.0 < keep_prob <= 1.0:
        raise RuntimeError(f"npu_fusion_attention: keep_prob must be in (0, 1], got {keep_prob}")
    if input_layout == "TND":
        return _tnd(query, key, value, head_num, atten_mask, scale, keep_prob, inner_precise, actual_seq_qlen,
                    actual_seq_kvlen, sparse_mode)
    if actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise NotImplementedError("the emulation takes actual_seq_qlen / actual_seq_kvlen with TND only")
    if sparse_mode not in (0, 2):
        raise NotImplementedError(f"the emulation covers sparse_mode 0 and 2, not {sparse_mode}")

    q = _to_bnsd(query, input_layout, head_num, "query")
    d = q.shape[-1]
    n_kv = _kv_heads(key, input_layout, d)
    if head_num % n_kv:
        raise RuntimeError(f"npu_fusion_attention: key heads {n_kv} do not divide head_num {head_num}")
    k = _to_bnsd(key, input_layout, n_kv, "key")
    v = _to_bnsd(value, input_layout, n_kv, "value")
    b, n, sq, _ = q.shape
    sk = k.shape[2]

    masked = _dense_mask(atten_mask, sparse_mode, b, n, sq, sk, pre_tockens, next_tockens, query.device)
    out, row_max, row_sum = _attend(q, k, v, masked, scale, keep_prob, inner_precise)
    softmax_max = row_max.expand(b, n, sq, 8).float().detach()
    softmax_sum = row_sum.expand(b, n, sq, 8).float().detach()
    return (_from_bnsd(out.to(query.dtype), input_layout), softmax_max, softmax_sum,
            torch.empty(0, dtype=query.dtype, device=query.device), 0, 0, 0)


def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                              atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None,
                              attention_in=None, scale_value=1.0, keep_prob=1.0, pre_tockens=2147483647,
                              next_tockens=2147483647, inner_precise=0, seed=0, offset=0, numels=0, prefix=None,
                              actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
                              sync=False, softmax_layout="", sink=None):
    """The flash-attention backward from the forward's statistics: the probabilities are
    recomputed as exp(scale * QK^T - softmax_max) / softmax_sum, and rowsum(dy * attention_in)
    is the softmax's correction term; dense layouts, sparse_mode 0 and 2, no dropout."""
    _count("npu_fusion_attention_grad", query, key, value, dy, atten_mask)
    if input_layout == "TND" or actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise NotImplementedError("the emulated grad covers the dense layouts only")
    if pse is not None or padding_mask is not None or prefix is not None or sink is not None or softmax_layout:
        raise NotImplementedError("the emulated grad does not cover pse / padding_mask / prefix / sink / softmax_layout")
    if keep_prob != 1.0:
        raise NotImplementedError("the emulated grad does not cover dropout")
    if softmax_max is None or softmax_sum is None or attention_in is None:
        raise RuntimeError("npu_fusion_attention_grad: softmax_max, softmax_sum and attention_in are required")
    if sparse_mode not in (0, 2):
        raise NotImplementedError(f"the emulated grad covers sparse_mode 0 and 2, not {sparse_mode}")
    q = _to_bnsd(query, input_layout, head_num, "query").float()
    d = q.shape[-1]
    n_kv = _kv_heads(key, input_layout, d)
    k = _to_bnsd(key, input_layout, n_kv, "key").float()
    v = _to_bnsd(value, input_layout, n_kv, "value").float()
    do = _to_bnsd(dy, input_layout, head_num, "dy").float()
    o = _to_bnsd(attention_in, input_layout, head_num, "attention_in").float()
    b, n, sq, _ = q.shape
    sk, rep = k.shape[2], n // n_kv
    if tuple(softmax_max.shape) != (b, n, sq, 8) or tuple(softmax_sum.shape) != (b, n, sq, 8):
        raise RuntimeError(f"npu_fusion_attention_grad: softmax_max / softmax_sum must be [{b}, {n}, {sq}, 8], got "
                           f"{tuple(softmax_max.shape)} / {tuple(softmax_sum.shape)}")
    masked = _dense_mask(atten_mask, sparse_mode, b, n, sq, sk, pre_tockens, next_tockens, query.device)
    kf, vf = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    dq = torch.empty_like(q)
    dkf, dvf = torch.zeros_like(kf), torch.zeros_like(vf)
    for start in range(0, sq, QUERY_TILE):  # query rows a tile at a time, as the forward
        rows = slice(start, start + QUERY_TILE)
        q_t, do_t = q[:, :, rows], do[:, :, rows]
        scores = ((q_t @ kf.transpose(-1, -2)) * scale_value).masked_fill(masked[..., rows, :], float("-inf"))
        p = torch.exp(scores - softmax_max[:, :, rows, :1].float()) / softmax_sum[:, :, rows, :1].float()
        del scores
        ds = p * (do_t @ vf.transpose(-1, -2) - (do_t * o[:, :, rows]).sum(-1, keepdim=True))
        dq[:, :, rows] = (ds @ kf) * scale_value
        dkf += (ds.transpose(-1, -2) @ q_t) * scale_value
        dvf += p.transpose(-1, -2) @ do_t
    dk = dkf.unflatten(1, (n_kv, rep)).sum(2)
    dv = dvf.unflatten(1, (n_kv, rep)).sum(2)
    return (_from_bnsd(dq.to(query.dtype), input_layout), _from_bnsd(dk.to(query.dtype), input_layout),
            _from_bnsd(dv.to(query.dtype), input_layout), torch.empty(0, dtype=query.dtype, device=query.device), torch.empty(0, device=query.device))


def _dense_mask(atten_mask, sparse_mode, b, n, sq, sk, pre_tockens, next_tockens, device):
    """True = masked out, [.., sq, sk], for the dense layouts: sparse_mode 2 (left-up causal with
    the compressed 2048 x 2048 mask) or 0 (the mask as given, within the token window)."""
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if sparse_mode == 2:
        if atten_mask is None or tuple(atten_mask.shape) != (2048, 2048):
            raise RuntimeError("npu_fusion_attention: sparse_mode=2 needs the compressed [2048, 2048] mask")
        if not torch.equal(atten_mask.bool(), torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=atten_mask.device), 1)):
            raise RuntimeError("npu_fusion_attention: sparse_mode=2 mask must be triu(ones, diagonal=1)")
        allowed &= torch.ones(sq, sk, dtype=torch.bool, device=device).tril()  # left-up causal
        full_mask = None
    else:
        full_mask = atten_mask
        if atten_mask is not None:
            if atten_mask.dtype not in (torch.bool, torch.uint8):
                raise RuntimeError(f"npu_fusion_attention: atten_mask must be bool/uint8, got {atten_mask.dtype}")
            shape = tuple(atten_mask.shape)
            ok = {(b, n, sq, sk), (b, 1, sq, sk), (1, 1, sq, sk), (sq, sk)}
            if shape not in ok:
                raise RuntimeError(f"npu_fusion_attention: atten_mask shape {shape} not one of {sorted(ok)}")
        i = torch.arange(sq, device=device).unsqueeze(1)
        j = torch.arange(sk, device=device).unsqueeze(0)
        allowed &= (j >= i - pre_tockens) & (j <= i + next_tockens)

    masked = ~allowed
    if full_mask is not None:
        fm = full_mask.bool()
        masked = masked | (fm if fm.dim() == 4 else fm.view(1, 1, sq, sk))
    return masked


# The kernels tile over query rows, as flash attention does: a [B, N, S, S] score matrix is never
# materialised whole, so the emulated device's memory holds what the real kernels' does (their
# outputs and statistics) plus one tile, not the full square.
QUERY_TILE = 128


def _attend(q, k, v, masked, scale, keep_prob, inner_precise):
    """[b, n, sq, d] x [b, n_kv, sk, d] with True = masked out: (out float32, row max, row sum),
    QUERY_TILE query rows at a time."""
    n, n_kv = q.shape[1], k.shape[1]
    rep = n // n_kv
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    outs, maxes, sums = [], [], []
    for start in range(0, q.shape[2], QUERY_TILE):
        rows = slice(start, start + QUERY_TILE)
        scores = (q[:, :, rows].float() @ kf.transpose(-1, -2)) * scale
        scores = scores.masked_fill(masked[..., rows, :], float("-inf"))
        row_max = scores.amax(-1, keepdim=True)
        fully_masked = torch.isinf(row_max)
        probs = torch.exp(scores - row_max.masked_fill(fully_masked, 0))
        del scores
        row_sum = probs.sum(-1, keepdim=True)
        probs = probs / row_sum
        if inner_precise == 2:
            probs = probs.masked_fill(fully_masked, 0.0)
        if keep_prob < 1.0:
            probs = F.dropout(probs, p=1.0 - keep_prob, training=True)
        outs.append(probs @ vf)
        maxes.append(row_max)
        sums.append(row_sum)
    return torch.cat(outs, 2), torch.cat(maxes, 2), torch.cat(sums, 2)


def _tnd(query, key, value, head_num, atten_mask, scale, keep_prob, inner_precise, actual_seq_qlen,
         actual_seq_kvlen, sparse_mode):
    """The packed layout: query [T, N, D], key / value [T_kv, N_kv, D]; actual_seq_qlen and
    actual_seq_kvlen are each sequence's cumulative end (the wheel's documentation: lengths
    2 2 2 are passed as 2 4 6).  Causal per sequence as sparse_mode 3 (right-down) or 2
    (left-up) with the compressed 2048 x 2048 mask."""
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise RuntimeError("npu_fusion_attention: TND takes 3-D query, key and value [T, N, D]")
    if query.shape[1] != head_num:
        raise RuntimeError(f"npu_fusion_attention: TND query has {query.shape[1]} heads, head_num {head_num}")
    if head_num % key.shape[1]:
        raise RuntimeError(f"npu_fusion_attention: key heads {key.shape[1]} do not divide head_num {head_num}")
    if actual_seq_qlen is None or actual_seq_kvlen is None:
        raise RuntimeError("npu_fusion_attention: TND needs actual_seq_qlen and actual_seq_kvlen")
    if len(actual_seq_qlen) != len(actual_seq_kvlen):
        raise RuntimeError("npu_fusion_attention: actual_seq_qlen and actual_seq_kvlen differ in length")
    for name, ends, total in (("actual_seq_qlen", actual_seq_qlen, query.shape[0]),
                              ("actual_seq_kvlen", actual_seq_kvlen, key.shape[0])):
        if any(b < a for a, b in zip([0] + list(ends), ends)) or ends[-1] != total:
            raise RuntimeError(f"npu_fusion_attention: {name} must be non-decreasing prefix sums ending at "
                               f"{total}, got {list(ends)}")
    if sparse_mode not in (2, 3):
        raise NotImplementedError(f"the emulation covers TND with sparse_mode 2 and 3, not {sparse_mode}")
    if atten_mask is None or not torch.equal(atten_mask.bool(), torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=atten_mask.device), 1)):
        raise RuntimeError(f"npu_fusion_attention: sparse_mode={sparse_mode} needs the compressed triu [2048, 2048] mask")
    outs, maxes, sums = [], [], []
    for qa, qb, ka, kb in zip([0] + list(actual_seq_qlen), actual_seq_qlen, [0] + list(actual_seq_kvlen),
                              actual_seq_kvlen):
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (query[qa:qb], key[ka:kb], value[ka:kb]))
        sq, sk = qb - qa, kb - ka
        i, j = torch.arange(sq, device=query.device).unsqueeze(1), torch.arange(sk, device=query.device).unsqueeze(0)
        masked = j > i + (sk - sq if sparse_mode == 3 else 0)
        out, row_max, row_sum = _attend(q, k, v, masked, scale, keep_prob, inner_precise)
        outs.append(out[0].permute(1, 0, 2))
        maxes.append(row_max[0, :, :, 0].T)
        sums.append(row_sum[0, :, :, 0].T)
    out = torch.cat(outs).to(query.dtype)
    t = query.shape[0]
    # the meta function's shapes for TND: softmax_max / softmax_sum [T, N, 8] float32
    softmax_max = torch.cat(maxes).unsqueeze(-1).expand(t, head_num, 8).float().detach()
    softmax_sum = torch.cat(sums).unsqueeze(-1).expand(t, head_num, 8).float().detach()
    return out, softmax_max, softmax_sum, torch.empty(0, dtype=query.dtype, device=query.device), 0, 0, 0


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, block_table=None, num_heads=1, scale=1.0,
                                    pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0,
                                    softmax_lse_flag=False, **rest):
    """Inference attention over a paged KV cache (PageAttention), as megatron's dynamic engine
    calls it: query TND ``[T, N, D]``, key / value the cache ``[blocknum, blocksize, KV_N * D]``,
    ``block_table [B, max blocks]`` int32, ``actual_seq_lengths`` the queries' prefix sums (TND),
    ``actual_seq_lengths_kv`` each request's key count, sparse_mode 3 (causal from the end) with
    the compressed [2048, 2048] mask.  The argument rules are the wheel's documentation's
    (torch_npu 2.14.0 ``_op_plugin_docs.py``): PageAttention takes float16 / bfloat16 (int8
    quantised caches are not emulated) and needs actual_seq_lengths_kv and a 2-D block table of
    B rows; with any query longer than 1 (the PromptFlashAttention branch) block_size is 128 to
    512 in multiples of 128, with only decode rows (IncreFlashAttention) at most 512 and a
    multiple of 16.  Other layouts and features are not emulated (NotImplementedError)."""
    _count("npu_fused_infer_attention_score", query, key, value, atten_mask, block_table)
    if any(v is not None for k, v in rest.items() if not k.endswith("_mode")) or pse_shift is not None:
        raise NotImplementedError("the emulation covers PageAttention without quantisation, shared prefixes, "
                                  "padding or pse")
    if input_layout != "TND" or block_table is None:
        raise NotImplementedError("the emulation covers input_layout TND with a block_table (PageAttention)")
    if query.dtype not in (torch.float16, torch.bfloat16) or key.dtype != query.dtype or value.dtype != query.dtype:
        raise RuntimeError(f"npu_fused_infer_attention_score: PageAttention supports key / value float16, bfloat16 "
                           f"and int8 with a query of the same type, got {query.dtype} / {key.dtype}")
    if actual_seq_lengths is None or actual_seq_lengths_kv is None:
        raise RuntimeError("npu_fused_infer_attention_score: TND needs actual_seq_lengths, PageAttention "
                           "actual_seq_lengths_kv")
    ends, kv_lens = [int(x) for x in actual_seq_lengths], [int(x) for x in actual_seq_lengths_kv]
    b = len(ends)
    if len(kv_lens) != b or any(e < a for a, e in zip([0] + ends, ends)) or ends[-1] != query.shape[0]:
        raise RuntimeError(f"npu_fused_infer_attention_score: actual_seq_lengths must be non-decreasing prefix sums "
                           f"ending at T={query.shape[0]} with one kv length per batch, got {ends} / {kv_lens}")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32:
        raise RuntimeError(f"npu_fused_infer_attention_score: block_table must be int32 [B={b}, max blocks], got "
                           f"{tuple(block_table.shape)} {block_table.dtype}")
    if key.dim() != 3 or key.shape != value.shape or key.shape[1] != block_size:
        raise RuntimeError(f"npu_fused_infer_attention_score: the cache must be [blocknum, block_size={block_size}, H] "
                           f"(key and value alike), got {tuple(key.shape)} / {tuple(value.shape)}")
    q_lens = [e - a for a, e in zip([0] + ends, ends)]
    prompt = any(n > 1 for n in q_lens)
    if prompt and not (128 <= block_size <= 512 and block_size % 128 == 0):
        raise RuntimeError(f"npu_fused_infer_attention_score: with PageAttention block_size must be 128 to 512, a "
                           f"multiple of 128, got {block_size}")
    if not prompt and not (0 < block_size <= 512 and block_size % 16 == 0):
        raise RuntimeError(f"npu_fused_infer_attention_score: with PageAttention (decode) block_size must be at most "
                           f"512 and a multiple of 16, got {block_size}")
    if max(kv_lens) > block_table.shape[1] * block_size:
        raise RuntimeError("npu_fused_infer_attention_score: block_table has fewer blocks than actual_seq_lengths_kv")
    if sparse_mode != 3 or atten_mask is None or not torch.equal(
            atten_mask.bool(), torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=atten_mask.device), 1)):
        raise NotImplementedError("the emulation covers sparse_mode 3 with the compressed triu [2048, 2048] mask")
    t, n, d = query.shape
    n_kv = num_key_value_heads or num_heads
    if n != num_heads or num_heads % n_kv or key.shape[2] != n_kv * d:
        raise RuntimeError(f"npu_fused_infer_attention_score: query {tuple(query.shape)}, num_heads {num_heads}, "
                           f"num_key_value_heads {n_kv}, cache H {key.shape[2]}")
    outs = []
    for r, (a, e) in enumerate(zip([0] + ends, ends)):
        if e == a:
            continue
        rows = block_table[r, :-(-kv_lens[r] // block_size)].long()
        k = key[rows].reshape(-1, n_kv, d)[:kv_lens[r]].permute(1, 0, 2).unsqueeze(0)
        v = value[rows].reshape(-1, n_kv, d)[:kv_lens[r]].permute(1, 0, 2).unsqueeze(0)
        q = query[a:e].permute(1, 0, 2).unsqueeze(0)
        i = torch.arange(e - a, device=query.device).unsqueeze(1)
        j = torch.arange(kv_lens[r], device=query.device).unsqueeze(0)
        out, _, _ = _attend(q, k, v, j > i + kv_lens[r] - (e - a), scale, 1.0, inner_precise)
        outs.append(out[0].permute(1, 0, 2))
    out = torch.cat(outs).to(query.dtype)
    lse = torch.empty(0, dtype=torch.float32, device=query.device)
    if softmax_lse_flag:
        raise NotImplementedError("the emulation does not return softmax_lse")
    return out, lse


def npu_rms_norm(x, gamma, epsilon=1e-6):
    _count("npu_rms_norm", x, gamma)
    if x.dim() < gamma.dim():
        raise RuntimeError(f"npu_rms_norm: gamma has more dims than x {tuple(x.shape)}")
    k = gamma.dim()
    if tuple(x.shape[-k:]) != tuple(gamma.shape):
        raise RuntimeError(f"npu_rms_norm: gamma shape {tuple(gamma.shape)} does not match x's trailing dims {tuple(x.shape)}")
    dims = tuple(range(x.dim() - k, x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = (xf * rstd * gamma.float()).to(x.dtype)
    return y, rstd


def npu_swiglu(x, dim=-1):
    _count("npu_swiglu", x)
    if x.shape[dim] % 2:
        raise RuntimeError(f"npu_swiglu: size {x.shape[dim]} of dim {dim} is odd")
    a, b = x.chunk(2, dim=dim)
    return (F.silu(a.float()) * b.float()).to(x.dtype)


def npu_rotary_mul(x, r1, r2, rotary_mode="half", rotate=None):
    _count("npu_rotary_mul", x, r1, r2)
    mode = rotary_mode
    if rotate is not None:
        raise NotImplementedError("the emulation does not cover the rotate matrix")
    if x.dim() != 4:
        raise RuntimeError(f"npu_rotary_mul: x must be 4-D, got {tuple(x.shape)}")
    if mode not in ("half", "interleave"):
        raise RuntimeError(f"npu_rotary_mul: rotary_mode must be 'half' or 'interleave', got {mode!r}")
    if r1.shape != r2.shape or r1.dim() != 4 or r1.shape[-1] != x.shape[-1]:
        raise RuntimeError(f"npu_rotary_mul: cos/sin shapes {tuple(r1.shape)}/{tuple(r2.shape)} "
                           f"do not broadcast to x {tuple(x.shape)}")
    torch.broadcast_shapes(x.shape, r1.shape)
    if mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * r1 + rotated * r2

IMPLEMENTATIONS = {"npu_fused_infer_attention_score": npu_fused_infer_attention_score,
                   "npu_fusion_attention": npu_fusion_attention,
                   "npu_fusion_attention_grad": npu_fusion_attention_grad, "npu_rms_norm": npu_rms_norm,
                   "npu_swiglu": npu_swiglu, "npu_rotary_mul": npu_rotary_mul}


# -- autograd as the wheel's: what each op saves for its backward --------------------------------
# The real kernels are autograd nodes of their own: npu_fusion_attention keeps query, key, value,
# its output and the two [B, N, S, 8] softmax statistics (no [S, S] scores) and its backward is
# npu_fusion_attention_grad; npu_rms_norm keeps its input, gamma and rstd; npu_swiglu its input.
# Autograd through the plain math would keep every intermediate instead (the scores, the
# probabilities, x*rstd, silu(a)), which the device never holds: the emulated device's memory
# statistics would be the CPU math's, not the NPU's.

class _FusionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, atten_mask, head_num, input_layout, scale, pre_tockens, next_tockens,
                inner_precise, sparse_mode):
        out, smax, ssum, sin, *_ = npu_fusion_attention(
            query, key, value, head_num, input_layout, atten_mask=atten_mask, scale=scale,
            pre_tockens=pre_tockens, next_tockens=next_tockens, inner_precise=inner_precise, sparse_mode=sparse_mode)
        smax, ssum = smax.contiguous(), ssum.contiguous()
        ctx.save_for_backward(query, key, value, out, smax, ssum, atten_mask)
        ctx.args = (head_num, input_layout, scale, pre_tockens, next_tockens, inner_precise, sparse_mode)
        ctx.mark_non_differentiable(smax, ssum, sin)
        return out, smax, ssum, sin

    @staticmethod
    def backward(ctx, dy, *_):
        query, key, value, out, smax, ssum, atten_mask = ctx.saved_tensors
        head_num, layout, scale, pre, nxt, inner_precise, sparse_mode = ctx.args
        dq, dk, dv, *_ = torch.ops.npu.npu_fusion_attention_grad(
            query, key, value, dy, head_num, layout, atten_mask=atten_mask, softmax_max=smax, softmax_sum=ssum,
            attention_in=out, scale_value=scale, pre_tockens=pre, next_tockens=nxt, inner_precise=inner_precise,
            sparse_mode=sparse_mode)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _fusion_attention_autograd(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                               atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                               next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                               actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                               softmax_layout="", sink=None, dropout_mask=None, seed=0, offset=0):
    kwargs = dict(pse=pse, padding_mask=padding_mask, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob,
                  pre_tockens=pre_tockens, next_tockens=next_tockens, inner_precise=inner_precise, prefix=prefix,
                  actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode,
                  gen_mask_parallel=gen_mask_parallel, sync=sync, softmax_layout=softmax_layout, sink=sink,
                  dropout_mask=dropout_mask, seed=seed, offset=offset)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    # what the emulated grad kernel covers (dense layouts, no dropout); else autograd through the math
    wheel_like = (grad and input_layout != "TND" and keep_prob == 1.0 and actual_seq_qlen is None
                  and pse is None and padding_mask is None and prefix is None and not softmax_layout
                  and sink is None and dropout_mask is None and sparse_mode in (0, 2))
    if not wheel_like:
        return npu_fusion_attention(query, key, value, head_num, input_layout, **kwargs)
    out, smax, ssum, sin = _FusionAttention.apply(query, key, value, atten_mask, head_num, input_layout, scale,
                                                  pre_tockens, next_tockens, inner_precise, sparse_mode)
    return out, smax, ssum, sin, 0, 0, 0


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, epsilon):
        y, rstd = npu_rms_norm(x, gamma, epsilon)
        ctx.save_for_backward(x, gamma, rstd)
        ctx.mark_non_differentiable(rstd)
        return y, rstd

    @staticmethod
    def backward(ctx, dy, _):
        x, gamma, rstd = ctx.saved_tensors
        dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
        xhat = x.float() * rstd
        g = dy.float() * gamma.float()
        dx = rstd * (g - xhat * (g * xhat).mean(dim=dims, keepdim=True))
        dgamma = (dy.float() * xhat).sum(dim=tuple(range(x.dim() - gamma.dim())))
        return dx.to(x.dtype), dgamma.to(gamma.dtype), None


def _rms_norm_autograd(x, gamma, epsilon=1e-6):
    if not (torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad)):
        return npu_rms_norm(x, gamma, epsilon)
    return _RmsNorm.apply(x, gamma, epsilon)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.save_for_backward(x)
        ctx.dim = dim
        return npu_swiglu(x, dim)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        a, b = x.float().chunk(2, dim=ctx.dim)
        sig = torch.sigmoid(a)
        silu = a * sig
        da = dy.float() * b * (sig + silu * (1 - sig))
        db = dy.float() * silu
        return torch.cat((da, db), dim=ctx.dim).to(x.dtype), None


def _swiglu_autograd(x, dim=-1):
    if not (torch.is_grad_enabled() and x.requires_grad):
        return npu_swiglu(x, dim)
    return _SwiGLU.apply(x, dim)


# the kernels called with autograd on: the wheel's saved tensors and backward (above)
AUTOGRAD = {"npu_fusion_attention": _fusion_attention_autograd, "npu_rms_norm": _rms_norm_autograd,
            "npu_swiglu": _swiglu_autograd}


def define(lib: "torch.library.Library", schemas=None, implementations=None) -> None:
    """Define each op in ``lib`` under its schema with the emulated numerics.  Autograd runs as
    the wheel's where ``AUTOGRAD`` has the op (its own node, its saved tensors), else through
    the plain torch math (CompositeImplicitAutograd)."""
    for name, schema in (schemas or SCHEMAS).items():
        lib.define(schema)
        op = schema.split("(", 1)[0]
        if implementations is None and name in AUTOGRAD:
            lib.impl(op, AUTOGRAD[name], "Autograd")
            lib.impl(op, IMPLEMENTATIONS[name], "CompositeExplicitAutograd")
        else:
            lib.impl(op, (implementations or IMPLEMENTATIONS)[name], "CompositeImplicitAutograd")


def _define_once():
    try:
        torch.ops.npu.npu_rotary_mul.default
        return None  # already defined in this process
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("npu", "FRAGMENT")
    define(lib)
    return lib


_LIB = _define_once()
