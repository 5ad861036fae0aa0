"""Run under torchrun, 2 ranks, with tests/npu_emulation first on PYTHONPATH and
ASCEND_PATCHES_BACKEND=npu: what the emulated NPU refuses and allows, against what hardware
(torch on a CUDA device, torch_npu on an NPU) does.  Each check reports "ok" or what went
wrong; rank 0 prints RESULT {...}.

Expected, from torch's own device rules: a tensor made on the device reports device type
``npu``; an op mixing it with a CPU tensor of one or more dimensions raises, a 0-dim CPU tensor
(a scalar) does not; ``.cpu()`` / ``.npu()`` / ``.to`` copy; autograd runs on it; torch_npu's
kernels refuse CPU tensors; the device's generator is its own (drawing on the CPU does not move
it); ProcessGroupHCCL reduces npu tensors and refuses CPU ones; a gloo group refuses npu ones.
"""

import json

import torch
import torch.distributed as dist

import ascend_patches  # noqa: F401  (imports torch_npu, which installs the device)
import torch_npu

dist.init_process_group("hccl")
rank = dist.get_rank()
results = {}


def check(name):
    def run(fn):
        try:
            fn()
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001  (a check's failure is its result)
            results[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return run


def raises(fn, *words):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        assert all(w in str(e) for w in words), str(e)[:300]
        return
    raise AssertionError("did not raise")


@check("a device of its own")
def _():
    x = torch.randn(3, 4, device="npu")
    assert x.device.type == "npu" and x.is_npu and not x.is_cpu, x.device
    assert torch.device(torch.zeros(2).npu().device).type == "npu"
    assert torch.empty(2, device="cuda").device.type == "npu"  # transfer_to_npu's redirect
    assert torch.nn.Linear(2, 2).cuda().weight.device.type == "npu"


@check("factories give what was asked")
def _():
    assert torch.arange(0, 10, device="npu").tolist() == list(range(10))  # came back empty before
    assert torch.arange(4, device="cuda").device.type == "npu" and torch.arange(4, device="npu").shape == (4,)
    assert torch.arange(1, 10, 2, dtype=torch.float32, device="npu").tolist() == [1.0, 3.0, 5.0, 7.0, 9.0]
    # an out= tensor its kernel would resize: refused in one line, not a wrapper of the old size
    raises(lambda: torch.cumsum(torch.ones(3, device="npu"), 0, out=torch.empty(0, device="npu")), "resized")


@check("a tensor formats and has an address as on hardware")
def _():
    t = torch.arange(6, device="npu")
    assert f"T{t[4]}" == "T4" and f"{t[2]:>3}" == "  2"  # a 0-dim tensor formats as its value
    a, b = torch.ones(4, device="npu"), torch.ones(4, device="npu")
    assert a.data_ptr() != 0 and a.data_ptr() != b.data_ptr()  # each tensor its own memory
    assert a[2:].data_ptr() == a.data_ptr() + 2 * a.element_size()  # a view points into its base


@check("mixing devices raises")
def _():
    x = torch.ones(3, device="npu")
    raises(lambda: x + torch.ones(3), "npu:0", "cpu")
    raises(lambda: torch.ones(3) * x, "npu:0", "cpu")
    raises(lambda: torch.nn.Linear(3, 3)(x), "npu:0", "cpu")
    assert (x + torch.tensor(2.0)).device.type == "npu"  # a 0-dim CPU tensor is a scalar


@check("copies between devices")
def _():
    c = torch.arange(6.0)
    n = c.npu()
    n.add_(1)
    assert torch.equal(c, torch.arange(6.0)), "npu() must copy"
    back = n.cpu()
    assert type(back) is torch.Tensor and back.device.type == "cpu" and torch.equal(back, c + 1)
    back.zero_()
    assert n.sum().item() == 21.0, "cpu() must copy"
    n.copy_(torch.full((6,), 7.0))
    assert n.sum().item() == 42.0


@check("autograd and views")
def _():
    w = torch.randn(4, 3, device="npu", requires_grad=True)
    x = torch.randn(2, 4, device="npu")
    (x @ w).square().sum().backward()
    ref = 2 * x.cpu().T @ (x.cpu() @ w.detach().cpu())
    assert w.grad.device.type == "npu" and torch.allclose(w.grad.cpu(), ref, rtol=1e-5, atol=1e-6)
    v = w.detach().view(12)
    v[0] = 5.0
    assert w[0, 0].item() == 5.0, "a view shares its base's data"


@check("param.data = a view of a buffer follows the buffer")
def _():
    p = torch.nn.Parameter(torch.zeros(2, 3, device="npu"))
    buffer = torch.zeros(10, device="npu")
    p.data = buffer[4:10].view(2, 3)  # megatron's DDP and distributed optimizer do this
    buffer.fill_(1.0)
    assert p.sum().item() == 6.0
    p.data.add_(1.0)
    assert buffer[4:].sum().item() == 12.0 and buffer[:4].sum().item() == 4.0


@check("torch_npu kernels refuse CPU tensors")
def _():
    raises(lambda: torch_npu.npu_rms_norm(torch.randn(2, 4), torch.ones(4)), "npu_rms_norm", "cpu")
    out = torch_npu.npu_rms_norm(torch.randn(2, 4, device="npu"), torch.ones(4, device="npu"))[0]
    assert out.device.type == "npu"


@check("the device's generator is its own")
def _():
    torch.npu.manual_seed(7)
    state = torch.npu.get_rng_state()
    torch.rand(100)  # the CPU's generator
    assert torch.equal(torch.npu.get_rng_state(), state), "a CPU draw moved the NPU generator"
    a = torch.rand(4, device="npu")
    torch.npu.set_rng_state(state)
    assert torch.equal(torch.rand(4, device="npu").cpu(), a.cpu())
    assert not torch.equal(torch.npu.get_rng_state(), torch.get_rng_state())


@check("hccl reduces npu tensors")
def _():
    t = torch.full((3,), float(rank + 1), device="npu")
    dist.all_reduce(t)
    assert t.device.type == "npu" and t.tolist() == [3.0, 3.0, 3.0], t
    out = torch.empty(6, device="npu")  # flat, as megatron gathers (gloo has no 2-D output)
    dist.all_gather_into_tensor(out, t)
    assert out.sum().item() == 18.0


@check("hccl refuses CPU tensors")
def _():
    raises(lambda: dist.all_reduce(torch.ones(3)), "ProcessGroupHCCL", "cpu")


@check("gloo refuses npu tensors")
def _():
    gloo = dist.new_group(backend="gloo")
    raises(lambda: dist.all_reduce(torch.ones(3, device="npu"), group=gloo))


if rank == 0:
    print("RESULT " + json.dumps(results), flush=True)
dist.barrier()
dist.destroy_process_group()
