"""Context-parallel attention for megatron's ``DotProductAttention`` (the local spec), which
stock megatron-core refuses without Transformer Engine.

Megatron splits each sequence into 2N chunks over the N ranks of the context-parallel group
(``get_batch_on_this_cp_rank``): rank r holds chunks r and 2N-1-r, so every rank carries the
same share of the causal triangle.  ``ring_attention`` passes K/V around the ring with
point-to-point sends while each rank attends its queries to the block it holds, and merges the
blocks by their log-sum-exp; the backward pass goes round the ring once more, the K/V gradients
travelling with their K/V and returning home at the end.  With rank r's chunks in local order
(r, 2N-1-r), every block is one of three shapes:

- its own K/V: causal over the local tokens (local order is global order);
- K/V from a rank s < r: all local queries against the first K/V chunk (chunk s precedes both
  of r's; chunk 2N-1-s follows both);
- K/V from a rank s > r: the second local query chunk (2N-1-r) against both K/V chunks.

Each block's attention and its log-sum-exp come from the backend:

- NPU: ``npu_fusion_attention`` in BNSD layout, its ``softmax_max`` / ``softmax_sum`` outputs
  giving the log-sum-exp (max + log sum), and ``npu_fusion_attention_grad`` for the backward,
  handed the merged statistics (max = the merged log-sum-exp, sum = 1);
- CUDA and CPU: the block's scores in float32, one block at a time (no s x s mask is kept).

GQA: K/V stay at their own head count; the query heads of a group share them.

Megatron's ``cp_comm_type`` "a2a" (MindSpeed's ulysses_cp_algo) takes ``ulysses_attention``
instead: one all-to-all gives each rank the whole sequence for 1/N of the heads (N must divide
the heads and K/V groups), the backend's flash attention runs on it causally, and a second
all-to-all returns each rank its own tokens.

Attention dropout under context parallelism is refused: each block's dropout mask would have
to be drawn from the positions it covers to match one process, which is not built.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .. import _state
from .npu_masks import compressed_causal_mask

RING = "p2p"  # megatron's cp_comm_type for ring attention (Megatron-LM's --cp-comm-type p2p, its default)
ULYSSES = "a2a"  # all-to-all over heads (DeepSpeed-Ulysses; MindSpeed's ulysses_cp_algo)


# ---- one block: attention and its log-sum-exp, forward and backward, per backend ----------------

def _heads(q: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[s, b, n, d] -> [b, groups, n // groups, s, d]."""
    s, b, n, d = q.shape
    return q.to(dtype).permute(1, 2, 0, 3).reshape(b, groups, n // groups, s, d)


BLOCK_ROWS = 512  # query rows per pass of the torch blocks: bounds the transient scores at rows x keys


def _row_chunks(q, k, v, causal: bool):
    """(row slice, keys, values, causal mask or None) per BLOCK_ROWS query rows; a causal block
    (square, local order = global order) sees only the keys up to its last row."""
    sq = q.shape[-2]
    for a in range(0, sq, BLOCK_ROWS):
        b = min(a + BLOCK_ROWS, sq)
        if not causal:
            yield slice(a, b), k, v, None
            continue
        i = torch.arange(a, b, device=q.device).unsqueeze(1)
        yield slice(a, b), k[..., :b, :], v[..., :b, :], torch.arange(b, device=q.device).unsqueeze(0) > i


def _scores(q, k, masked, scale: float):
    scores = (q @ k.transpose(-1, -2)) * scale  # [b, g, rep, rows, keys]
    return scores if masked is None else scores.masked_fill(masked, float("-inf"))


def block_forward_torch(q, k, v, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [b, g, rep, sq, d], k/v [b, g, 1, sk, d] (float32) -> out [b, g, rep, sq, d], lse [b, g, rep, sq]."""
    out, lse = torch.empty_like(q), torch.empty(q.shape[:-1], device=q.device)
    for rows, kk, vv, masked in _row_chunks(q, k, v, causal):
        scores = _scores(q[..., rows, :], kk, masked, scale)
        lse[..., rows] = torch.logsumexp(scores, -1)
        out[..., rows, :] = torch.exp(scores - lse[..., rows].unsqueeze(-1)) @ vv
    return out, lse


def block_backward_torch(dout, q, k, v, lse, delta, causal: bool, scale: float, out=None):
    """The block's share of dq, dk, dv given the merged output's lse and delta = rowsum(dout * out)."""
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows, kk, vv, masked in _row_chunks(q, k, v, causal):
        keys = slice(0, kk.shape[-2])
        p = torch.exp(_scores(q[..., rows, :], kk, masked, scale) - lse[..., rows].unsqueeze(-1))
        dv[..., keys, :] += (p.transpose(-1, -2) @ dout[..., rows, :]).sum(2, keepdim=True)
        ds = p * (dout[..., rows, :] @ vv.transpose(-1, -2) - delta[..., rows].unsqueeze(-1))
        dq[..., rows, :] = (ds @ kk) * scale
        dk[..., keys, :] += (ds.transpose(-1, -2) @ q[..., rows, :]).sum(2, keepdim=True) * scale
    return dq, dk, dv


def _npu_layout(q, k, v):
    b, g, rep, s, d = q.shape
    return q.reshape(b, g * rep, s, d), k.squeeze(2), v.squeeze(2), g * rep


def block_forward_npu(q, k, v, causal: bool, scale: float):
    import torch_npu

    b, g, rep, s, d = q.shape
    qn, kn, vn, n = _npu_layout(q, k, v)
    mask = compressed_causal_mask(q.device) if causal else None
    out, smax, ssum = torch_npu.npu_fusion_attention(
        qn, kn, vn, n, "BNSD", atten_mask=mask, scale=scale, keep_prob=1.0, sparse_mode=2 if causal else 0)[:3]
    lse = smax[..., 0] + torch.log(ssum[..., 0])  # [b, n, s]: the wheel's max and sum, replicated 8 wide
    return out.float().reshape(b, g, rep, s, d), lse.reshape(b, g, rep, s)


def block_backward_npu(dout, q, k, v, lse, delta, causal: bool, scale: float, out=None):
    import torch_npu

    b, g, rep, s, d = q.shape
    qn, kn, vn, n = _npu_layout(q, k, v)
    stats = lse.reshape(b, n, s, 1).expand(b, n, s, 8).contiguous()
    mask = compressed_causal_mask(q.device) if causal else None
    dq, dk, dv = torch_npu.npu_fusion_attention_grad(
        qn, kn, vn, dout.reshape(b, n, s, d).to(q.dtype), n, "BNSD", atten_mask=mask, softmax_max=stats,
        softmax_sum=torch.ones_like(stats), attention_in=out.reshape(b, n, s, d).to(q.dtype), scale_value=scale,
        keep_prob=1.0, sparse_mode=2 if causal else 0)[:3]
    return dq.float().reshape(q.shape), dk.float().unsqueeze(2), dv.float().unsqueeze(2)


def _block_ops(dtype: torch.dtype):
    """(forward, backward, the dtype blocks take): the NPU kernels take the model's dtype; the torch
    blocks compute in float32."""
    if _state.backend() == "npu":
        return block_forward_npu, block_backward_npu, dtype
    return block_forward_torch, block_backward_torch, torch.float32


# ---- the ring ---------------------------------------------------------------------------------

def _exchange(send: torch.Tensor, group, ranks) -> Tuple[torch.Tensor, list]:
    """Start sending ``send`` to the next rank of the ring and receiving the previous rank's, as
    one ``batch_isend_irecv``.  HCCL and NCCL run a rank's point-to-point operations in posting
    order and a send completes only once its receive runs on the peer: posted ungrouped, a
    send-then-receive on every rank waits for ever (gloo buffers the send, so a CPU test does not
    see it); a batch runs its sends and receives together.  They ignore tags too: two exchanges
    in flight (the backward's K/V and their gradients) match in the order they were posted,
    the same on every rank."""
    r, n = dist.get_rank(group), len(ranks)
    recv = torch.empty_like(send)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, ranks[(r + 1) % n], group),
                                   dist.P2POp(dist.irecv, recv, ranks[(r - 1) % n], group)])
    return recv, reqs


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


def _block_for(src: int, r: int, c: int):
    """(query slice, K/V slice, causal) of the block rank r meets when it holds rank src's K/V."""
    if src == r:
        return slice(None), slice(None), True
    if src < r:
        return slice(None), slice(0, c), False
    return slice(c, None), slice(None), False


def _merge(out, lse, qs, o_b, lse_b):
    """Merge a block's (o_b, lse_b) into rows ``qs`` of the running (out, lse), in place."""
    old = lse[..., qs]
    new = torch.logaddexp(old, lse_b)
    out[..., qs, :] = out[..., qs, :] * torch.exp(old - new).unsqueeze(-1) + o_b * torch.exp(lse_b - new).unsqueeze(-1)
    lse[..., qs] = new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group, ranks):
        fwd, _, work = _block_ops(q.dtype)
        groups = k.shape[2]
        qh, kh, vh = (_heads(t, groups, work) for t in (q, k, v))
        r, n = dist.get_rank(group), len(ranks)
        c = qh.shape[3] // 2
        out = torch.zeros(qh.shape, device=qh.device)  # float32 accumulators
        lse = torch.full(qh.shape[:-1], float("-inf"), device=qh.device)
        kv = torch.stack([kh, vh])
        for step in range(n):
            if step < n - 1:
                nxt, reqs = _exchange(kv, group, ranks)
            qs, ks, causal = _block_for((r - step) % n, r, c)
            o_b, lse_b = fwd(qh[..., qs, :], kv[0][..., ks, :], kv[1][..., ks, :], causal, scale)
            _merge(out, lse, qs, o_b, lse_b)
            if step < n - 1:
                _wait(reqs)
                kv = nxt
        ctx.save_for_backward(qh, kh, vh, out, lse)
        ctx.scale, ctx.group, ctx.ranks, ctx.shapes = scale, group, ranks, (q.shape, k.shape, q.dtype)
        s, b, heads, d = q.shape
        return out.reshape(b, heads, s, d).permute(2, 0, 1, 3).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        qh, kh, vh, out, lse = ctx.saved_tensors
        (qshape, kshape, dtype), group, ranks = ctx.shapes, ctx.group, ctx.ranks
        r, n = dist.get_rank(group), len(ranks)
        c = qh.shape[3] // 2
        _, bwd, _ = _block_ops(dtype)
        do = _heads(dout.reshape(qshape), kshape[2], torch.float32)
        delta = (do * out).sum(-1)
        dq = torch.zeros(qh.shape, device=qh.device)
        kv, dkv = torch.stack([kh, vh]), torch.zeros(2, *kh.shape, device=kh.device)  # dkv: float32
        for step in range(n):
            if step < n - 1:  # K/V travel on while this block computes; their gradients once it is done
                nxt, reqs = _exchange(kv, group, ranks)
            qs, ks, causal = _block_for((r - step) % n, r, c)
            dq_b, dk_b, dv_b = bwd(do[..., qs, :], qh[..., qs, :], kv[0][..., ks, :], kv[1][..., ks, :],
                                   lse[..., qs], delta[..., qs], causal, ctx.scale, out=out[..., qs, :])
            dq[..., qs, :] += dq_b
            dkv[0][..., ks, :] += dk_b
            dkv[1][..., ks, :] += dv_b
            if step < n - 1:
                nxt_d, reqs_d = _exchange(dkv, group, ranks)  # posted after K/V's: matched after them
                _wait(reqs + reqs_d)
                kv, dkv = nxt, nxt_d
        if n > 1:  # the gradients held now are the next rank's K/V's: send them home
            dkv, reqs = _exchange(dkv, group, ranks)
            _wait(reqs)

        def back(t, shape):
            sb, bb, hb, db = shape
            return t.reshape(bb, hb, sb, db).permute(2, 0, 1, 3).to(dtype)

        return back(dq, qshape), back(dkv[0], kshape), back(dkv[1], kshape), None, None, None


def ring_attention(q, k, v, scale: float, group, ranks) -> torch.Tensor:
    """q: [s, b, n, d], k, v: [s, b, ng, d], this rank's chunks (r, 2N-1-r) of each sequence in
    megatron's load-balanced split over ``group`` (global ``ranks`` in ring order). Causal
    attention over the whole sequence; returns [s, b, n*d]."""
    s = q.shape[0]
    if s % 2:
        raise ValueError(f"ring attention: the {s} local tokens are not the two equal chunks megatron's "
                         "context-parallel split gives (seq-length must be a multiple of 2 x context-parallel-size)")
    return _RingAttention.apply(q, k, v, scale, group, tuple(ranks)).reshape(s, q.shape[1], -1)


# ---- Ulysses: all-to-all over heads ----------------------------------------------------------

class _AllToAll(torch.autograd.Function):
    """Equal chunks of dim 0 exchanged over the group (chunk j to rank j); its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def _chunk_order(n: int, device) -> torch.Tensor:
    """Index of global chunk g among the gathered [rank j: chunks j, 2n-1-j] pairs, for g in 0..2n-1,
    on ``device`` (the tensor it indexes: no host-to-device copy per call)."""
    return torch.tensor([2 * g for g in range(n)] + [2 * (2 * n - 1 - g) + 1 for g in range(n, 2 * n)],
                        device=device)


def _gather_sequence(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """[t, b, heads, d], this rank's chunks -> [n t, b, heads / n, d]: the whole sequence in global
    order for this rank's share of the heads."""
    t, b, h, d = x.shape
    parts = _AllToAll.apply(x.view(t, b, n, h // n, d).permute(2, 0, 1, 3, 4), group)  # [source, t, b, h/n, d]
    return parts.reshape(2 * n, t // 2, b, h // n, d)[_chunk_order(n, x.device)].reshape(n * t, b, h // n, d)


def _scatter_sequence(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """The inverse of ``_gather_sequence``: [n t, b, heads / n, d] -> [t, b, heads, d]."""
    s, b, h, d = x.shape
    t = s // n
    pairs = x.reshape(2 * n, t // 2, b, h, d)[torch.argsort(_chunk_order(n, x.device))].reshape(n, t, b, h, d)
    return _AllToAll.apply(pairs, group).permute(1, 2, 0, 3, 4).reshape(t, b, n * h, d)


def ulysses_attention(q, k, v, scale: float, group, attend) -> torch.Tensor:
    """q: [t, b, n, d], k, v: [t, b, ng, d], this rank's chunks (r, 2N-1-r) as megatron splits
    them; each rank gathers the whole sequence for n/N query heads (and ng/N K/V heads) by one
    all-to-all, attends causally with ``attend`` (the backend's flash attention), and scatters
    back.  Returns [t, b, n*d]."""
    n = dist.get_world_size(group)
    full = [_gather_sequence(x, group, n) for x in (q, k, v)]
    out = attend(*full, True, None, scale, 0.0)  # [s, b, (n/N) d]
    s, b = out.shape[:2]
    return _scatter_sequence(out.view(s, b, q.shape[2] // n, -1), group, n).reshape(q.shape[0], b, -1)


def causal_mask_for_rank(s_local: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """The causal mask megatron's data path slices for this rank ([s_local, s_local * cp_size],
    True = masked): query rows of chunks r and 2N-1-r against every key."""
    c = s_local // 2
    pos = torch.cat([torch.arange(cp_rank * c, (cp_rank + 1) * c),
                     torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c)])
    keys = torch.arange(s_local * cp_size)
    return (keys.unsqueeze(0) > pos.unsqueeze(1)).to(device)


class _CheckedMask:
    """The last attention mask found causal for this rank: every layer of one forward is handed
    the same mask tensor, so it is built and compared (a host sync) once per batch, not once per
    layer.  Held weakly, and keyed by the tensor's version counter, so a mask written in place
    or a new batch's mask is checked again."""

    ref, key = None, None


def _causal_for_rank(mask: torch.Tensor, s_local: int, cp_size: int, cp_rank: int) -> bool:
    key = (mask._version, tuple(mask.shape), s_local, cp_size, cp_rank)
    if _CheckedMask.ref is not None and _CheckedMask.ref() is mask and _CheckedMask.key == key:
        return True
    want = causal_mask_for_rank(s_local, cp_size, cp_rank, mask.device)
    if mask.shape[-2:] != want.shape or not bool((mask.bool() == want).all()):
        return False
    _CheckedMask.ref, _CheckedMask.key = weakref.ref(mask), key
    return True


def refusal(config, cp_comm_type: Optional[str], attention_dropout: float) -> Optional[str]:
    """Why this attention cannot run under the config's context parallelism, or None."""
    problems = []
    cp, tp = config.context_parallel_size, config.tensor_model_parallel_size
    if cp_comm_type not in (None, RING, ULYSSES):
        problems.append(f"cp_comm_type={cp_comm_type!r} (built: {RING!r}, ring attention, and {ULYSSES!r}, "
                        f"all-to-all over heads; use --cp-comm-type {RING} or {ULYSSES})")
    groups = config.num_query_groups or config.num_attention_heads
    if cp_comm_type == ULYSSES and (config.num_attention_heads // tp % cp or groups // tp % cp):
        problems.append(f"cp_comm_type={ULYSSES!r} splits heads over the CP group: {config.num_attention_heads} "
                        f"attention heads and {groups} query groups per TP {tp} are not multiples of CP {cp} "
                        f"(use --cp-comm-type {RING})")
    if attention_dropout > 0:
        problems.append(f"attention dropout {attention_dropout} (set --attention-dropout 0)")
    if problems:
        return ("ascend_patches context-parallel attention (context_parallel_size="
                f"{config.context_parallel_size}) cannot serve: " + "; ".join(problems))
    return None


# ---- megatron's DotProductAttention ----------------------------------------------------------

def dot_product_attention_init(original):
    """Wrap ``DotProductAttention.__init__``, which asserts ``context_parallel_size == 1``: under
    context parallelism the layer is built from a copy of its config at size 1 and then given
    the real one (nothing else in the constructor reads the size), after refusing what the ring
    does not serve (another ``cp_comm_type``, attention dropout)."""
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        config = bound.arguments["config"]
        if config.context_parallel_size == 1:
            return original(self, *args, **kwargs)
        dropout = bound.arguments.get("attention_dropout")
        reason = refusal(config, bound.arguments.get("cp_comm_type"),
                         config.attention_dropout if dropout is None else dropout)
        if reason:
            raise ValueError(reason)
        bound.arguments["config"] = copy.copy(config)
        bound.arguments["config"].context_parallel_size = 1
        original(*bound.args, **bound.kwargs)
        self.config = config
        self.cp_comm_type = bound.arguments.get("cp_comm_type") or RING

    return __init__


def _group(module):
    from megatron.core import parallel_state

    group = getattr(getattr(module, "pg_collection", None), "cp", None) or parallel_state.get_context_parallel_group()
    return group, dist.get_process_group_ranks(group)


def forward(module, query, key, value, attention_mask, mask_type, scale: float, attend) -> torch.Tensor:
    """The layer's forward under context parallelism: causal self-attention over the whole
    sequence by ``ring_attention`` (cp_comm_type p2p) or ``ulysses_attention`` (a2a, through
    ``attend``, the backend's flash attention), or a ValueError naming what it cannot serve."""
    from megatron.core.transformer.enums import AttnMaskType

    group, ranks = _group(module)
    s = query.shape[0]
    problems = []
    if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
        problems.append(f"attn_mask_type={mask_type.name} (only causal)")
    if key.shape[0] != s:
        problems.append(f"{key.shape[0]} keys for {s} queries (self-attention over this rank's chunks only; "
                        "no KV cache)")
    if attention_mask is not None and not _causal_for_rank(attention_mask, s, len(ranks), dist.get_rank(group)):
        problems.append(f"an attention mask {tuple(attention_mask.shape)} other than the causal one (document "
                        "masks under context parallelism are not built)")
    if problems:
        raise ValueError("ascend_patches context-parallel attention cannot serve this batch: " + "; ".join(problems))
    if getattr(module, "cp_comm_type", RING) == ULYSSES:
        return ulysses_attention(query, key, value, scale, group, attend)
    return ring_attention(query, key, value, scale, group, ranks)
