"""Model FLOPs, tokens/s, TFLOP/s and MFU, by the convention in docs/llama2.md:
training FLOPs per token = 6 * N_dense + 12 * L * d_head * n_heads * seq, where N_dense
counts every matrix the token passes through (the output layer included, the embedding
lookup not).  MFU = achieved model FLOP/s / the device's peak.

The peak is the device's published dense figure (no 2:4 sparsity) for the dtype trained, read
from the name the device reports; docs/mfu_peaks.md cites each.  A chip or dtype with no cited
figure gives MFU "n/a" and the reason, never another chip's peak.  A CPU has no published
peak, so its "peak" is measured: the GEMM rate of this machine, in the dtype trained, at the
start of the run ("CPU-MFU").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# (chip, does the reported device name belong to it, {dtype: dense TFLOP/s}); the first chip
# that claims a name wins, so the narrower names come first.  "fp32" is the CUDA cores' rate and
# "tf32" the tensor cores' rate for float32 matmuls, used where torch allows TF32.
# Sources: docs/mfu_peaks.md.
PEAKS = (
    ("Ascend910B1", lambda n: n == "Ascend910B1", {"bf16": 373.88}),
    ("Ascend910B2", lambda n: n == "Ascend910B2", {"bf16": 353.8944}),
    ("Ascend910B3", lambda n: n == "Ascend910B3", {"bf16": 294.912}),
    ("Ascend910B4", lambda n: n == "Ascend910B4", {"bf16": 245.76}),
    ("Ascend910_9362", lambda n: n == "Ascend910_9362", {"bf16": 353.8944}),
    ("Ascend910_9392", lambda n: n == "Ascend910_9392", {"bf16": 353.8944}),
    ("A100", lambda n: "A100" in n, {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("H100 NVL", lambda n: "H100" in n and "NVL" in n, {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", lambda n: "H100" in n and "PCIe" in n, {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    ("H100 SXM", lambda n: "H100" in n, {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("H200 NVL", lambda n: "H200" in n and "NVL" in n, {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200 SXM", lambda n: "H200" in n, {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("B200", lambda n: "B200" in n and "GB200" not in n, {"bf16": 2250.0, "fp16": 2250.0}),
)
_DTYPE_KEY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dense_params(s, vocab_size: int) -> int:
    h, f, L = s.hidden_size, s.ffn_hidden_size, s.num_layers
    kv = s.num_query_groups * s.kv_channels
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f
    return L * per_layer + h * vocab_size


def train_flops_per_token(s, seq_length: int, vocab_size: int) -> float:
    """Per token of full rows of ``seq_length``, each attended whole (``Work.flops`` per token)."""
    return 6.0 * dense_params(s, vocab_size) + attention_flops_coefficient(s) * seq_length


def attention_flops_coefficient(s) -> float:
    """Training attention FLOPs per (query, key) pair over the layers: QK^T and AV, forward and
    backward (x 3), 2 FLOPs per multiply-add: 12 x L x d_head x n_heads."""
    return 12.0 * s.num_layers * s.kv_channels * s.num_attention_heads


@dataclass
class Work:
    """What one or more micro-batches cost: ``tokens``, the real ones (a sample's or a document's,
    never padding); ``positions``, every position the model ran (a padded or trimmed row's
    length, a packed row's, its tail padding included); ``attention``, the (query, key) pairs
    attended, the sum of s^2 over each sequence as the model attended it (a padded or trimmed
    row whole, each packed sequence on its own, a packed row's tail padding being one)."""

    tokens: int = 0
    positions: int = 0
    attention: int = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.tokens + other.tokens, self.positions + other.positions, self.attention + other.attention)

    def flops(self, shape, vocab_size: int) -> float:
        """Training FLOPs of this work: the matrices over every position run, attention over the
        pairs attended (docs/llama2.md's convention, per sequence)."""
        return 6.0 * dense_params(shape, vocab_size) * self.positions + attention_flops_coefficient(shape) * self.attention


def batch_work(batch: dict, instruction: bool) -> Work:
    """The work of one micro-batch as the model receives it (before a context-parallel split).
    Instruction samples are right-padded and their loss runs to their last token, so a row's
    real tokens end at its last loss-bearing position, and a packed row's padding is the one
    sequence without loss; pretraining rows (GPTDataset) hold no padding."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].long()
        lengths = cu[1:] - cu[:-1]
        real = lengths
        if instruction:  # a sequence's loss-bearing positions, summed per sequence
            sequence = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            bearing = torch.zeros(len(lengths)).index_add_(0, sequence, (mask.reshape(-1) > 0).float())
            real = lengths[bearing > 0]
        return Work(int(real.sum()), tokens.numel(), int((lengths * lengths).sum()))
    rows, length = tokens.shape
    if instruction:
        bearing = mask.reshape(rows, length) > 0
        ends = torch.where(bearing.any(1), length - bearing.flip(1).float().argmax(1), torch.zeros(rows, dtype=torch.long))
        real = int(ends.sum())
    else:
        real = tokens.numel()
    return Work(real, tokens.numel(), rows * length * length)


class WorkCounter:
    """Counts the work of the micro-batches drawn from a data iterator, for the step's metrics."""

    def __init__(self, instruction: bool):
        self.instruction, self.work = instruction, Work()

    def wrap(self, data):
        """The iterator (or, with virtual pipeline stages, the first of the per-chunk iterators,
        which all draw the same batches) counted as it is drawn."""
        if isinstance(data, list):
            return [self.wrap(data[0])] + data[1:]

        def counted():
            for batch in data:
                self.work = self.work + batch_work(batch, self.instruction)
                yield batch
        return counted()

    def take(self) -> Work:
        """The work drawn since the last call."""
        work, self.work = self.work, Work()
        return work


def measured_gemm_tflops(dtype=torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """The GEMM rate at ``n``: its operands come from a generator of their own, never the default
    one, which on the CPU is dropout's stream (a draw here, at a resumed run's start or between
    steps, would shift every later dropout mask)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, generator=g)
    b = torch.randn(n, n, dtype=dtype, generator=g)
    a @ b  # warm up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def device_name(backend: str) -> str:
    mod = torch.npu if backend == "npu" else torch.cuda  # torch.npu exists once torch_npu imports
    return mod.get_device_name()


def published_peak(name: str, dtype=torch.bfloat16, allow_tf32: bool = False) -> tuple:
    """(dense TFLOP/s or None, where it came from or why there is none) for a device name."""
    key = _DTYPE_KEY.get(dtype, str(dtype).replace("torch.", ""))
    if key == "fp32" and allow_tf32:
        key = "tf32"
    for chip, claims, peaks in PEAKS:
        if claims(name):
            if key not in peaks:
                return None, f"no cited {key} peak for {chip} (docs/mfu_peaks.md); pass --peak-tflops"
            return peaks[key], f"published dense {key} peak of {chip}"
    return None, f"no cited peak for device {name!r} (docs/mfu_peaks.md); pass --peak-tflops"


def peak_tflops(backend: str, dtype=torch.bfloat16, override: float = None) -> tuple:
    """(peak TFLOP/s per device or None, where the number came from or why there is none)."""
    if override:
        return override, "--peak-tflops"
    if backend == "cpu":
        return measured_gemm_tflops(dtype), f"measured {str(dtype).replace('torch.', '')} GEMM on this CPU"
    allow_tf32 = backend == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return published_peak(device_name(backend), dtype, allow_tf32)


class Meter:
    """Per-step tokens/s per device (real tokens), TFLOP/s per device and MFU (the FLOPs of the
    work computed: ``Work.flops``)."""

    def __init__(self, shape, vocab_size: int, peak: float, devices: int):
        self.shape, self.vocab_size, self.peak, self.devices = shape, vocab_size, peak, devices
        self.t = time.perf_counter()

    def reset(self):
        """Start the next step's clock now (after a save or an evaluation)."""
        self.t = time.perf_counter()

    def step(self, work: Work) -> dict:
        """``work``: the whole step's, every data-parallel rank's summed."""
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        flops = work.flops(self.shape, self.vocab_size)
        tflops = flops / dt / self.devices / 1e12
        out = {"step_time_s": dt, "tokens": work.tokens, "flops": flops,
               "tokens_per_s_per_device": work.tokens / dt / self.devices, "tflops_per_device": tflops,
               "mfu": tflops / self.peak if self.peak else None}
        out.update(device_memory())
        return out


def process_memory_gib() -> dict:
    """This process's resident memory now and its high-water mark (Linux /proc), in GiB."""
    out = {}
    try:
        for line in open("/proc/self/status"):
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss_gib" if line.startswith("VmRSS") else "peak_rss_gib"] = int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return out


def tensor_memory_gib() -> float:
    """The bytes of every distinct tensor storage the process holds, in GiB: each tensor the
    garbage collector tracks, and its ``.grad`` (a C++ member with no Python object until read),
    counted once per storage.  Between steps that is the model state: parameters, gradients,
    optimizer state and the optimizers' flat buffers."""
    import gc

    seen = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
            for t in (obj, obj.grad) if obj.is_leaf and obj.requires_grad else (obj,):
                if t is not None and t.device.type != "meta":
                    storage = t.untyped_storage()
                    seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except (RuntimeError, ReferenceError):  # a tensor subclass without storage; a dead weak proxy
            continue
    return sum(seen.values()) / 2 ** 30


def device_memory() -> dict:
    """Peak device memory where the device reports it (CUDA, NPU); on a CPU, where the model
    lives in host memory, the process's resident memory."""
    import ascend_patches

    backend = ascend_patches.settings().backend
    if backend == "cpu":
        return process_memory_gib()
    mod = torch.npu if backend == "npu" else torch.cuda
    return {"max_memory_allocated_gib": mod.max_memory_allocated() / 2 ** 30,
            "memory_reserved_gib": mod.memory_reserved() / 2 ** 30}
