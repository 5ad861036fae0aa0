"""Where a step's time goes, per kind of work: GEMM, attention, norm, RoPE, SwiGLU, loss,
optimizer and the rest, from one profiled call.

The profiler's Python tracer gives every forward op the frames and modules it ran under
(innermost first decides: the attention module's softmax is attention, a linear's matmul
is GEMM); a backward op takes the kind of the forward op whose autograd node runs it (the
node's sequence number is the forward op's).  Matrix products count as GEMM wherever they
run except inside attention, so the GEMM line is the linear layers' and the logits' work.
Times are the ops' own (self) CPU time; Python's own time, which the tracer inflates, is
reported as one line apart from the ops.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
                      "aten::addmm_", "aten::_addmm_activation", "aten::mkldnn_matmul"})
# (kind, substrings of a frame or module name); the innermost frame that matches decides
KINDS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("attention", ("DotProductAttention", "dot_product_attention", "flash_attention", "scaled_dot_product",
                   "LlamaAttention", "sdpa_attention", "eager_attention")),
    ("rope", ("rope", "rotary", "Rotary")),
    ("norm", ("Norm", "norm.py", "rms_norm", "RMSNorm")),
    ("loss", ("cross_entropy", "compute_language_model_loss", "lm_loss", "loss_utils", "ForCausalLMLoss")),
    ("swiglu", ("swiglu", "nn.Module: MLP", "LlamaMLP", "mlp.py", "activation")),
    ("embedding", ("Embedding",)),
    ("optimizer", ("optimizer", "optim/", "clip_grad", "adamw", "multi_tensor")),
    ("linear (non-GEMM)", ("ParallelLinear", "layers.py", "grad_accum", "nn.Module: Linear", "linear.py")),
    ("DDP grad buffers", ("distributed/", "param_and_grad_buffer", "finalize_model_grads")),
)
ORDER = ("GEMM", "attention", "norm", "rope", "swiglu", "loss", "embedding", "linear (non-GEMM)", "optimizer",
         "DDP grad buffers", "autograd (grad accumulation, views)", "other ops", "Python (tracer-inflated)")


def _is_python(name: str) -> bool:
    return ".py(" in name or name.startswith("nn.Module:") or name.startswith("<built-in")


def _scope_kind(event) -> Optional[str]:
    e = event.cpu_parent
    while e is not None:
        if _is_python(e.name):
            for kind, keys in KINDS:
                if any(k in e.name for k in keys):
                    return kind
        e = e.cpu_parent
    return None


def _backward_node(event):
    e = event
    while e is not None:
        if e.cpu_parent is not None and e.cpu_parent.name.startswith("autograd::engine::evaluate_function:"):
            return e
        e = e.cpu_parent
    return None


def breakdown(fn: Callable[[], None]) -> Tuple[Dict[str, float], float]:
    """({kind: seconds of own CPU time}, profiled wall seconds) for one call of ``fn``."""
    import time

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
    events = list(prof.events())
    forward_kind: Dict[int, str] = {}
    for e in events:
        if e.name.startswith("aten::") and e.sequence_nr >= 0 and e.fwd_thread == 0:
            forward_kind.setdefault(e.sequence_nr, _scope_kind(e) or "other ops")
    out: Dict[str, float] = {k: 0.0 for k in ORDER}
    for e in events:
        own = e.self_cpu_time_total / 1e6
        if _is_python(e.name):
            out["Python (tracer-inflated)"] += own
            continue
        node = _backward_node(e)
        if node is not None:
            kind = forward_kind.get(node.sequence_nr) if node.sequence_nr >= 0 else None
            # a custom autograd.Function's backward has no aten forward op: its own frames decide
            kind = kind or _scope_kind(e) or "autograd (grad accumulation, views)"
        elif e.name.startswith("autograd::engine::evaluate_function:"):
            kind = "autograd (grad accumulation, views)"
        else:
            kind = _scope_kind(e) or "other ops"
        if e.name in GEMM_OPS and kind != "attention":
            kind = "GEMM"
        out[kind] += own
    return out, wall


def table(rows: Dict[str, Dict[str, float]], walls: Dict[str, float]) -> str:
    """Side by side: seconds and share of each configuration's profiled total."""
    names = list(rows)
    lines = [f"  {'kind':<38}" + "".join(f"{n:>24}" for n in names)]
    for kind in ORDER:
        if not any(rows[n][kind] for n in names):
            continue
        cells = []
        for n in names:
            total = sum(rows[n].values())
            cells.append(f"{rows[n][kind] * 1e3:10.0f} ms {100 * rows[n][kind] / total:5.1f} %  ")
        lines.append(f"  {kind:<38}" + "".join(f"{c:>24}" for c in cells))
    lines.append(f"  {'sum of own times':<38}" + "".join(f"{sum(rows[n].values()) * 1e3:10.0f} ms{'':>11}"
                                                      for n in names))
    lines.append(f"  {'profiled wall time':<38}" + "".join(f"{walls[n] * 1e3:10.0f} ms{'':>11}" for n in names))
    return "\n".join(lines)
