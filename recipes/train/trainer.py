"""The built-in engine of the pretrain recipe: stock megatron.core parts in a short loop.

``GPTModel`` chunks -> megatron ``DistributedDataParallel`` -> ``get_megatron_optimizer`` +
``OptimizerParamScheduler`` -> ``get_forward_backward_func`` (1F1B / interleaved pipeline
schedules) each step, checkpoints through ``dist_checkpointing`` (``recipes.model.checkpointing``).
The other engines (stock Megatron-LM's ``pretrain()``, DeepSpeed) take the same
``RunSettings`` and replace ``Trainer`` as a whole.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import ascend_patches
from recipes.model import llama2, parallel
from recipes.train import throughput, training, weights
from recipes.model import checkpointing
from recipes.train.run_settings import RunSettings


class MetricsLog:
    """The JSONL metrics file, one record per iteration, written by one rank.  A run that
    starts at iteration ``start`` first drops the records after it (an interrupted run's
    iterations, which this run repeats), so every iteration appears once."""

    def __init__(self, path: Optional[str], enabled: bool, start: int = 0):
        self.path, self.enabled, self.start, self.file = path, enabled and bool(path), start, None

    def __enter__(self):
        if self.enabled:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._truncate()
            self.file = open(self.path, "a")
        return self

    def _truncate(self) -> None:
        path = Path(self.path)
        if not path.is_file():
            return
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        kept = [line for line, it in ((line, _iteration_of(line)) for line in lines) if it is not None and it <= self.start]
        if len(kept) == len(lines):
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        print(f"{path}: dropped {len(lines) - len(kept)} records after iteration {self.start} "
              f"(a run this one replaces), kept {len(kept)}", flush=True)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def __exit__(self, *exc):
        if self.file:
            self.file.close()
        return False


def _iteration_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return (f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s" if rem >= 60 else f"{rem}s")


def dp_sum(values, group) -> list:
    """Sums over ``group``, reduced on the accelerator (HCCL and NCCL reduce device tensors only)."""
    t = torch.tensor(values, dtype=torch.float64, device=ascend_patches.device())
    dist.all_reduce(t, group=group)
    return t.tolist()


def dp_mean(value, group) -> float:
    return dp_sum([0.0 if value is None else value], group)[0] / dist.get_world_size(group)


class Trainer:
    """``run()`` = ``setup()`` -> ``resume()`` -> ``train()``; ``train()`` repeats ``step()``
    with ``evaluate()`` and ``save()`` where their intervals fall."""

    def __init__(self, s: RunSettings):
        self.s = s
        self.weights = weights.for_run(s)

    def run(self):
        self.setup()
        self.resume()
        self.train()
        parallel.destroy()
        return self.models

    # -- building ----------------------------------------------------------------------
    def setup(self) -> None:
        s, L = self.s, self.s.layout
        self.memory_at_start = throughput.process_memory_gib().get("rss_gib")  # before the model: the baseline
        parallel.init_distributed(L.tp, L.pp, L.vpp, seed=s.seed, cp=L.cp)
        if s.compile_fused_ops:
            ascend_patches.configure(compile_ops=True)  # a clear error off the CPU
        self.on_cpu = ascend_patches.settings().backend == "cpu"
        self.heap_note = ascend_patches.keep_freed_memory() if self.on_cpu else None
        chunks = self.weights.prepare(self._model_chunks())
        self.models = [training.wrap_ddp(m, use_distributed_optimizer=L.distributed_optimizer, chunk=i,
                                         overlap_grad_reduce=L.overlap_grad_reduce,
                                         overlap_param_gather=L.overlap_param_gather) for i, m in enumerate(chunks)]
        o = s.optim
        self.optimizer = training.build_optimizer(
            self.models, lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad, bf16=s.bf16, fp16=s.fp16,
            betas=o.betas, eps=o.eps, use_distributed_optimizer=L.distributed_optimizer,
            initial_loss_scale=o.initial_loss_scale, min_lr=o.min_lr, **s.offload.optimizer_config())
        training.attach_grad_sync(self.models, self.optimizer)
        self.scheduler = training.build_scheduler(self.optimizer, o, s.train_iters, s.batches.global_batch)

    def _model_chunks(self):
        """One model chunk per virtual pipeline stage (interleaved schedule), or just one."""
        from megatron.core import parallel_state as ps

        s, L = self.s, self.s.layout
        config = llama2.transformer_config(
            s.shape, tensor_model_parallel_size=L.tp, pipeline_model_parallel_size=L.pp,
            virtual_pipeline_model_parallel_size=L.vpp, sequence_parallel=L.sequence_parallel,
            context_parallel_size=L.cp, cp_comm_type=L.cp_comm_type if L.cp > 1 else None,
            pipeline_dtype=s.dtype, bf16=s.bf16, fp16=s.fp16, params_dtype=s.dtype,
            hidden_dropout=s.hidden_dropout, attention_dropout=s.attention_dropout,
            gradient_accumulation_fusion=s.gradient_accumulation_fusion, **llama2.initialisation(s.use_cpu_initialization),
            **s.recompute.config(), **s.offload.transformer_config(),
            **llama2.pipeline_split(s.shape.num_layers, L.pp))
        chunks = []
        for v in range(L.vpp or 1):
            kw = {"vp_stage": v} if L.vpp else {}
            model = llama2.build_model(s.shape, config=config, vocab_size=s.padded_vocab,
                                       pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, **kw),
                                       post_process=ps.is_pipeline_last_stage(ignore_virtual=False, **kw),
                                       vp_stage=v if L.vpp else None)
            chunks.append(training.wrap_float16(model))
        return chunks

    def resume(self) -> None:
        from megatron.core import parallel_state as ps

        self.progress = self.weights.load(self.models, self.optimizer, self.scheduler)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        data, self.valid = training.build_data(self.s, self.dp_rank, self.dp_size,
                                               self.progress["consumed_samples"], len(self.models))
        self.data = self._counted(data)

    def _counted(self, data):
        """The training batches, their work (real tokens, positions, attention) counted as drawn."""
        self.work = throughput.WorkCounter(self.s.data.instruction)
        return self.work.wrap(data)

    def _step_work(self, group) -> "throughput.Work":
        """This step's work over the data-parallel ranks (each counted its own micro-batches)."""
        w = self.work.take()
        return throughput.Work(*(int(x) for x in dp_sum([w.tokens, w.positions, w.attention], group)))

    # -- the loop ----------------------------------------------------------------------
    def train(self) -> None:
        s = self.s
        self.rank, self.last_rank = dist.get_rank(), dist.get_world_size() - 1
        self._announce()
        peak, self.peak_src = throughput.peak_tflops(ascend_patches.settings().backend, s.dtype, s.logging.peak_tflops)
        self.meter = throughput.Meter(s.shape, s.padded_vocab, peak, dist.get_world_size())
        self.started, self.first_iteration, self.records = time.perf_counter(), self.progress["iteration"], []
        self.param_gather = training.ParamGatherOverlap(self.models)  # --overlap-param-gather's hooks
        with MetricsLog(s.logging.metrics_file, self.rank == self.last_rank, start=self.first_iteration) as log:
            while self.progress["iteration"] < s.stop_at:
                record = self.step()
                self.param_gather.after_step()
                if s.logging.tensor_memory:
                    record["tensor_memory_gib"] = throughput.tensor_memory_gib()
                record.update(self.evaluate())
                self._log(record, log)
                self.save()
                self.meter.reset()  # evaluation and saving are not training throughput
        self.param_gather.end()
        self._summary()

    def step(self) -> dict:
        from megatron.core import parallel_state as ps

        s, it = self.s, self.progress["iteration"] + 1
        every = s.logging.measure_peak_every if self.on_cpu and not s.logging.peak_tflops else 0
        if every and it > 1 and (it - 1) % every == 0:
            self.meter.peak = throughput.measured_gemm_tflops(s.dtype)
            self.meter.reset()
        try:
            loss, grad_norm = training.train_step(self.models, self.optimizer, self.data, s.batches.num_microbatches,
                                                  s.batches.seq_length, s.batches.micro, packed=s.data.packed)
        except FloatingPointError as e:
            raise FloatingPointError(f"iteration {it}: {e}; the last checkpoint is untouched") from None
        self.scheduler.step(increment=s.batches.global_batch)
        self.progress = {"iteration": it, "consumed_samples": self.progress["consumed_samples"] + s.batches.global_batch}
        m = self.meter.step(self._step_work(ps.get_data_parallel_group()))
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            loss = dp_mean(loss, ps.get_data_parallel_group())
        return {"iteration": it, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": None if grad_norm is None else float(grad_norm), **m, "peak_tflops": self.meter.peak,
                "consumed_samples": self.progress["consumed_samples"], **self._baseline()}

    def _baseline(self) -> dict:
        return {"rss_at_start_gib": self.memory_at_start} if self.memory_at_start is not None else {}

    def evaluate(self) -> dict:
        """{"val_loss": ...} on the iterations --eval-interval names (last pipeline stage), else {}."""
        from megatron.core import parallel_state as ps

        s, it = self.s, self.progress["iteration"]
        if not (s.logging.eval_interval and it % s.logging.eval_interval == 0):
            return {}
        with self.param_gather.gathered():
            val = training.evaluate(self.s, self.models, self.valid, self.dp_rank, self.dp_size)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and val is not None:
            return {"val_loss": dp_mean(val, ps.get_data_parallel_group())}
        return {}

    def save(self) -> None:
        s, it = self.s, self.progress["iteration"]
        if s.save and ((s.save_interval and it % s.save_interval == 0) or it == s.stop_at):
            self.param_gather.before_save()
            self.weights.save(it, self.models, self.optimizer, self.scheduler, self.progress)
            if self.rank == 0:
                print(f"saved {checkpointing.iter_dir(s.save, it)}", flush=True)

    # -- output ------------------------------------------------------------------------
    def _announce(self) -> None:
        if self.rank != 0:
            return
        s = self.s
        print(ascend_patches.report().splitlines()[1], flush=True)
        for note in (s.resume.note, s.data.note):
            if note:
                print(note, flush=True)
        if self.heap_note:
            print(f"CPU allocator: {self.heap_note}", flush=True)
        print(f"{s.describe()}; gradient accumulation fusion {'on' if s.gradient_accumulation_fusion else 'off'}; "
              f"compiled CPU ops {'on' if s.compile_fused_ops else 'off'}", flush=True)
        on_rank = sum(llama2.count_parameters(checkpointing.unwrap(m)) for m in self.models)
        where = sorted({str(p.device) for m in self.models for p in m.parameters()})
        print(f"parameters: {on_rank:,} on rank 0 (its tensor and pipeline parallel shard), on {', '.join(where)}",
              flush=True)

    def _log(self, record: dict, log: MetricsLog) -> None:
        if self.rank != self.last_rank:
            return
        it, s = record["iteration"], self.s
        self.records.append(record)
        if it % s.logging.log_interval == 0 or it == 1:
            val = f" | val loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            done = it - self.first_iteration
            eta = (time.perf_counter() - self.started) / done * (s.stop_at - it)
            norm = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"  # DeepSpeed ZeRO-0: not kept
            mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.2f}%"  # no cited peak: says why
            print(f"iteration {it:6d}/{s.train_iters} | loss {record['loss']:.6f}{val} | lr {record['lr']:.3e} | "
                  f"grad norm {norm} | {record['tokens_per_s_per_device']:,.0f} tokens/s/device | "
                  f"{record['tflops_per_device']:.4f} TFLOP/s/device | MFU {mfu} ({self.peak_src}) | "
                  f"ETA {_duration(eta)}", flush=True)
        log.write(record)

    def _summary(self) -> None:
        """One line at the end, from the rank that has the loss."""
        if self.rank != self.last_rank or not self.records:
            return
        first, last = self.records[0], self.records[-1]
        rates = sorted(r["tokens_per_s_per_device"] for r in self.records)
        saved = f"; checkpoint {checkpointing.iter_dir(self.s.save, last['iteration'])}" if self.s.save else ""
        print(f"done: iterations {first['iteration']}-{last['iteration']} in {_duration(time.perf_counter() - self.started)}"
              f"; loss {first['loss']:.4f} -> {last['loss']:.4f}; median {rates[len(rates) // 2]:,.0f} tokens/s/device"
              f"{saved}", flush=True)
