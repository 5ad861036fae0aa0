"""The CPU's linear layers at decode-sized row counts: MKL's packed GEMM.

A decode step multiplies each weight by as many rows as it has requests.  For 4 to 16 rows MKL's
plain ``sgemm`` (what ``F.linear`` calls) re-packs the whole weight into its panel layout on
every call, one more pass over memory than the product itself.  ``cblas_sgemm_pack`` does that
once; torch exposes it as ``torch.ops.mkl._mkl_reorder_linear_weight`` and
``torch.ops.mkl._mkl_linear``, the pair inductor's CPU freezing uses for float32 linears.  A pack
serves one row count, so rows are padded to ``PACK_ROWS``.  Measured here (2 CPUs, float32, one
weight 32000 x 512, LLaMA-2's output layer shape in bench_serve's model): 16 rows 5.0 ms plain,
2.6 ms packed; 4 to 15 rows 3.0 to 6.7 ms plain, 2.6 to 2.9 ms padded and packed; 1 and 2 rows
1.3 to 1.5 ms either way (a GEMV: left to ``F.linear``).  vLLM's CPU build prepacks its weights
too (oneDNN).

The packs are made for a model's weights by ``pack`` (``recipes.serve`` and the engine path of
``recipes.generate``, through ``recipes.infer.dynamic.pack_gemms``, once the weights are final,
on the CPU backend only, when they fit in half the free memory) and the linear patch
(``inference_linear``) reads them under no_grad.  A weight changed after ``pack`` would leave a
stale pack: ``forget(model)`` drops them.  NPU and CUDA: not used (their GEMMs are the vendors'
own kernels).
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

PACK_ROWS = 16  # the row count packs are made for; fewer rows are padded up to it
MIN_ROWS = 4    # under this a product is a GEMV, as fast plain

_packs = WeakIdKeyDictionary()  # weight -> its pack


def unavailable() -> str:
    """Why packed GEMMs cannot run in this torch ('' when they can)."""
    if not torch.backends.mkl.is_available():
        return "this torch has no MKL"
    if not hasattr(torch.ops.mkl, "_mkl_linear"):
        return "this torch has no torch.ops.mkl._mkl_linear"
    return ""


def packable(model) -> list:
    """The float32 CPU weights of ``model``'s tensor-parallel linear layers (and the output
    layer's, shared embedding included), each once."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    found = {}
    for module in model.modules():
        weights = []
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            weights.append(module.weight)
        if getattr(module, "share_embeddings_and_output_weights", False) and hasattr(
                module, "shared_embedding_or_output_weight"):  # the output layer is given the embedding's
            weights.append(module.shared_embedding_or_output_weight())
        for w in weights:
            if w is not None and w.dim() == 2 and w.dtype == torch.float32 and w.device.type == "cpu":
                found[id(w)] = w
    return list(found.values())


def pack(model, budget: int, threads: int) -> int:
    """Pack ``model``'s float32 CPU linear weights for GEMMs on ``threads`` intra-op threads; the
    bytes the packs take, or -1 (and no packs) when they would take more than ``budget`` bytes.
    MKL's packed layout pads the weight's panels: measured 1.06x to 1.29x for LLaMA-2 7B's
    shapes, 1.4x to 9x for bench_serve's small ones (a few MB each at least).

    A pack keeps the thread count it was made with: made on 1 thread, a 16-row product with
    32000 x 512 took 8.7 ms on 2 threads, against 3.3 ms for one made on 2.  So the packing runs
    in a thread of its own with ``threads`` threads (the engine's count, which ``recipes.serve``'s
    main thread, keeping one, does not have; that thread's OpenMP team ends with it)."""
    why = unavailable()
    if why:
        raise RuntimeError(f"packed GEMMs: {why}")
    done = {}

    def run():
        torch.set_num_threads(threads)
        total, made = 0, []
        with torch.no_grad():
            for w in packable(model):
                if w not in _packs:
                    _packs[w] = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), PACK_ROWS)
                    made.append(w)
                total += _packs[w].numel() * _packs[w].element_size()
                if total > budget:
                    for m in made:
                        del _packs[m]
                    total = -1
                    break
        done["total"] = total

    worker = threading.Thread(target=run, name="pack-gemm-weights")
    worker.start()
    worker.join()
    if "total" not in done:
        raise RuntimeError("packed GEMMs: packing the weights failed (see the traceback above)")
    return done["total"]


def forget(model) -> None:
    for w in packable(model):
        _packs.pop(w, None)


def linear(x, weight, bias: Optional[torch.Tensor] = None):
    """``F.linear``, through the weight's pack when it has one and ``x`` has 4 to 16 rows."""
    packed = _packs.get(weight) if _packs else None
    if packed is None:
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if not MIN_ROWS <= rows <= PACK_ROWS or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, k)
    if rows < PACK_ROWS:
        x2 = torch.cat([x2, x2.new_zeros(PACK_ROWS - rows, k)])
    return _packed_product(x2, packed, weight, bias)[:rows].view(*x.shape[:-1], weight.shape[0])


def _packed_product(x, packed, weight, bias):
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, PACK_ROWS)
