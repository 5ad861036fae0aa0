"""Every patch ascend_patches makes, declared in one table.

Groups: ``device`` (make megatron run on the accelerator at hand), ``collectives``
(process-group backend, reduce-scatter on gloo), ``ops`` (fused kernels).
"""

from __future__ import annotations

from functools import partial

from .collectives import all_gather_into_tensor_wrapper, backend_name_wrapper, reduce_scatter_wrapper
from . import distrib_optimizer, engine_threads, with_deepspeed
from .device import (checkpoint_writer, cpu, cuda_queries, megatron_lm, megatron_lm_convert, npu, rng,
                     torch_compat, transformer_engine)
from .ops import (adamw, context_parallel, decode_layer, flash_attention, grad_accum, inference_linear, multi_tensor,
                  paged_attention, rms_norm, rope, swiglu)
from .registry import Patch, Registry
from .versions import for_megatron_core

CPU, NPU = frozenset({"cpu"}), frozenset({"npu"})
_NPU_RNG_WHY = ("megatron's private RNG helpers index torch.cuda.default_generators, which transfer_to_npu "
                "aliases to the NPU's only from torch_npu 2.14, and only after the device initialises")

REGISTRY = Registry()
_ = REGISTRY.declare

for p in cpu.patches():
    _(p)

_(Patch("device.rng_get_cpu", "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
        replacement=rng.get_state_cpu, backends=CPU, group="device",
        why="megatron's RNG tracker reads torch.cuda.default_generators directly"))
_(Patch("device.rng_set_cpu", "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
        replacement=rng.set_state_cpu, backends=CPU, group="device",
        why="megatron's RNG tracker writes torch.cuda.default_generators directly"))
_(Patch("device.rng_get_npu", "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
        replacement=rng.get_state_npu, backends=NPU, group="device",
        why=_NPU_RNG_WHY))
_(Patch("device.rng_set_npu", "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
        replacement=rng.set_state_npu, backends=NPU, group="device",
        why=_NPU_RNG_WHY))
_(Patch("device.rng_fork_cpu", "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork",
        replacement=megatron_lm.cpu_fork, backends=CPU, group="device", sweep=False,
        why="one generator holds the CPU's host and tracker streams: the fork parks the host stream, so it "
            "cannot change inside (megatron's check compared the generator with itself)"))
for _tuple, _name in (("_FLOAT_TYPES", "FloatTensor"), ("_HALF_TYPES", "HalfTensor"), ("_BF16_TYPES", "BFloat16Tensor")):
    _(Patch(f"npu.module.{_tuple}", f"megatron.core.transformer.module:{_tuple}",
            wrapper=npu.with_npu_tensor_type(_name), backends=NPU, group="device", sweep=False,
            why=f"Float16Module converts its inputs by isinstance against {_tuple}, built at megatron's import: "
                f"torch.npu.{_name} added, so the import order does not matter"))
_(Patch("npu.jit_fuser", "megatron.core.jit:jit_fuser", wrapper=npu.eager_jit_fuser, backends=NPU, group="device",
        sweep=False,  # its own sweep, over megatron's modules only: torch.compile is bound everywhere
        why="torch.compile has no NPU code generator without triton-ascend: megatron's fused functions run as "
            "written (those compiled before the import too), as MindSpeed's adaptor does"))
_(Patch("npu.Tensor.type", "torch:Tensor.type", wrapper=cpu.tensor_type_wrapper, backends=NPU,
        group="device", sweep=False,
        why="megatron compares type strings with 'torch.cuda.FloatTensor' (megatron callers only)"))

_(Patch("device.te_cpu_offload_flag", "megatron.core.extensions.transformer_engine:cpu_offload",
        wrapper=transformer_engine.te_cpu_offload_flag, group="device", sweep=False,
        after="megatron.core.pipeline_parallel.fine_grained_activation_offload",  # the releases that offload
        why="fine-grained activation offloading (0.16+) flips TE's CPUOffloadEnabled and raises without TE, "
            "though the local layers never read it"))
_(Patch("device.offload_no_parameters",
        "megatron.core.pipeline_parallel.fine_grained_activation_offload:ChunkOffloadHandler"
        ".tensor_need_offloading_checker", wrapper=transformer_engine.parameters_not_offloaded, group="device",
        why="the local layers save their weights for the backward; copying a parameter to the host and back "
            "frees nothing (TE marks its weights not offloadable)"))
_(Patch("device.checkpoint_without_output_fp8", "megatron.core.tensor_parallel.random:CheckpointWithoutOutput.__init__",
        wrapper=transformer_engine.checkpoint_without_output_init_wrapper, group="device", sweep=False,
        why="fp8=False reads as FP8 (`fp8 is not None`), and the FP8 path calls TE's FP8GlobalStateManager, absent "
            "without TE: --recompute-modules layernorm failed with NameError"))
_(Patch("device.fs_writer_metadata_path", "torch.distributed.checkpoint.filesystem:FileSystemWriter.metadata_path",
        replacement=torch_compat.MetadataPath(), create=True, sweep=False, group="device",
        after="megatron.core.dist_checkpointing",
        why="megatron-core 0.16's remove_sharded_tensors reads FileSystemWriter.metadata_path, which torch 2.13 "
            "dropped"))

_(Patch("collectives.reduce_scatter_tensor", "torch.distributed:reduce_scatter_tensor",
        wrapper=reduce_scatter_wrapper, backends=CPU, group="collectives",
        why="gloo has no reduce-scatter (distributed optimizer, sequence parallelism)"))
_(Patch("collectives.reduce_scatter_base", "torch.distributed:_reduce_scatter_base",
        wrapper=reduce_scatter_wrapper, backends=CPU, group="collectives",
        why="gloo has no reduce-scatter (older megatron code path)"))
for _fn in ("all_gather_into_tensor", "_all_gather_base"):
    _(Patch(f"collectives.{_fn.lstrip('_')}", f"torch.distributed:{_fn}", wrapper=all_gather_into_tensor_wrapper,
            group="collectives", why="gloo wants the output shaped [world * d0, ...]; megatron passes flat 1-D "
                                      "outputs (NCCL and HCCL take any)"))
_(Patch("collectives.init_process_group", "torch.distributed:init_process_group",
        wrapper=partial(backend_name_wrapper, accelerator_backend="gloo"), backends=CPU,
        group="collectives", why="Megatron-LM scripts ask for 'nccl'; the CPU needs 'gloo'"))
_(Patch("collectives.new_group", "torch.distributed:new_group",
        wrapper=partial(backend_name_wrapper, accelerator_backend="gloo"), backends=CPU,
        group="collectives", why="Megatron-LM scripts ask for 'nccl'; the CPU needs 'gloo'"))

_(Patch("device.checkpoint_writer_queue",
        for_megatron_core({"<0.17": "megatron.core.dist_checkpointing.strategies.filesystem_async:_get_write_results_queue",
                           ">=0.17": "megatron.core.dist_checkpointing.strategies.filesystem_async:get_write_results_queue"}),
        wrapper=checkpoint_writer.results_queue_wrapper, group="device",
        why="the torch_dist writer's manager process outlived a killed rank; started so it dies with it"))
_(Patch("device.te_min_version", "megatron.core.utils:is_te_min_version",
        wrapper=transformer_engine.is_te_min_version_wrapper, group="device",
        why="without Transformer Engine it raised TypeError (None >= Version); no minimum of an absent TE is met"))

# opt-in test mode: Megatron-Core's unit tests run their CUDA-only tests off CUDA
_(Patch("device.test_mode.is_available", "torch.cuda:is_available",
        wrapper=cuda_queries.answer(cuda_queries.TEST_MODE, lambda: True), backends=CPU | NPU, group="device",
        sweep=False, option="answer_cuda_queries",
        why="test mode: True for megatron.* and tests.* callers, so their CUDA-only tests run here"))
_(Patch("device.test_mode.device_count", "torch.cuda:device_count",
        wrapper=cuda_queries.answer(cuda_queries.TEST_MODE, cuda_queries.local_world_size), backends=CPU | NPU,
        group="device", sweep=False, option="answer_cuda_queries",
        why="test mode: one device per local rank for megatron.* and tests.* callers"))
_(Patch("device.test_mode.device_capability", "torch.cuda:get_device_capability",
        wrapper=cuda_queries.answer(cuda_queries.TEST_MODE, lambda: (0, 0)), backends=CPU | NPU, group="device",
        sweep=False, option="answer_cuda_queries",
        why="test mode: a device with no CUDA architecture, (0, 0), for callers told a device is there "
            "(they read it next; off CUDA it raises)"))

# Megatron-LM's training package (a checkout's megatron/training, megatron/legacy)
_(Patch("megatron_lm.cuda_is_available", "torch.cuda:is_available",
        wrapper=cuda_queries.answer(cuda_queries.MEGATRON_LM_INIT, lambda: True), backends=CPU, group="megatron_lm",
        sweep=False, why="initialize_megatron asserts CUDA: True for megatron.training.initialize's callers only"))
_(Patch("megatron_lm.cuda_device_count", "torch.cuda:device_count",
        wrapper=cuda_queries.answer(cuda_queries.MEGATRON_LM_INIT, lambda: 1), backends=CPU, group="megatron_lm",
        sweep=False, why="Megatron-LM builds model-parallel groups and seeds the TP RNG only if device_count() > 0: "
                         "1 (the CPU) for megatron.training.initialize's callers only"))
_(Patch("megatron_lm.device_arch_version", "megatron.training.utils:get_device_arch_version",
        replacement=megatron_lm.no_gpu_arch_version, backends=CPU | NPU, group="megatron_lm",
        why="reads CUDA device properties; off CUDA there is no GPU architecture (0)"))
_(Patch("megatron_lm.device_max_connections", "megatron.training.arguments:validate_args",
        wrapper=megatron_lm.validate_args_wrapper, backends=CPU, group="megatron_lm",
        why="CUDA_DEVICE_MAX_CONNECTIONS=1 (one in-order queue) is how a CPU runs already: the default"))
_(Patch("megatron_lm.data_loader_seed", "megatron.training.datasets.data_samplers:build_pretraining_data_loader",
        wrapper=megatron_lm.data_loader_wrapper, backends=CPU, group="megatron_lm",
        why="a DataLoader's seed draw would advance dropout's stream (the CPU's one generator) after a "
            "resume: Megatron-LM's loaders draw from a host generator, as from the CPU's on a GPU"))
_(Patch("megatron_lm.fused_kernels", "megatron.legacy.fused_kernels:load", replacement=megatron_lm.fused_kernels_load,
        backends=CPU | NPU, group="megatron_lm",
        why="builds no kernel in Megatron-LM 0.16, only probes nvcc (absent off CUDA) and writes beside itself"))
_(Patch("megatron_lm.compile_helpers", "megatron.core.datasets.utils:compile_helpers",
        wrapper=megatron_lm.compile_helpers_wrapper, group="megatron_lm",
        why="PyPI's megatron-core ships the built dataset helpers and no Makefile: nothing to make"))
_(Patch("megatron_lm.convert_te_check", "saver_base:MegatronCheckpointSaverBase.insert_megatron_path_and_check_te",
        wrapper=megatron_lm_convert.check_te_wrapper, group="megatron_lm", sweep=False,
        why="tools/checkpoint's saver asserts Transformer Engine even with --saver-transformer-impl local"))
_(Patch("megatron_lm.convert_dp_groups", "saver_base:MegatronCheckpointSaverBase.initialize_megatron_env",
        wrapper=megatron_lm_convert.saver_env_wrapper, group="megatron_lm", sweep=False,
        why="the saver fakes TP/EP groups but no data-parallel one, which GPTModel asks for (size 1 here)"))
_(Patch("megatron_lm.convert_transformers_version", "loader_llama_mistral:verify_transformers_version",
        replacement=megatron_lm_convert.verify_transformers_version, group="megatron_lm",
        why="the loader's check reads minor >= 31 alone, so transformers 5.x fails it; 4.31+ compared as a version"))
_(Patch("megatron_lm.legacy_norm_1p", "megatron.legacy.model.utils:get_norm",
        wrapper=megatron_lm_convert.legacy_norm_wrapper, group="megatron_lm",
        why="the legacy model reads args.apply_layernorm_1p, which 0.16's parser no longer defines (default False)"))

_(Patch("flash_attention", "megatron.core.transformer.dot_product_attention:DotProductAttention.forward",
        wrapper=flash_attention.dot_product_attention_forward,
        why="npu_fusion_attention / SDPA flash kernel instead of baddbmm + softmax + bmm; packed (THD) "
            "batches, which stock refuses without Transformer Engine, per sequence (TND on the NPU)"))
_(Patch("flash_attention.context_parallel", "megatron.core.transformer.dot_product_attention:DotProductAttention.__init__",
        wrapper=context_parallel.dot_product_attention_init, requires=("flash_attention",),
        why="context parallelism, which stock refuses without Transformer Engine: ring attention over the CP "
            "group (K/V passed point to point, blocks merged by log-sum-exp) or Ulysses (cp_comm_type a2a) in "
            "the wrapped forward"))
_(Patch("rms_norm", "megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__",
        wrapper=rms_norm.wrapped_torch_norm_new,
        why="npu_rms_norm / fused rms_norm for every norm the local spec builds (layers and final); a "
            "LayerNorm under sequence parallelism, refused by stock without TE, gets its parameters marked"))
_(Patch("swiglu", "megatron.core.transformer.mlp:MLP.forward", wrapper=swiglu.mlp_forward,
        why="npu_swiglu / one-pass SwiGLU, with or without bias_activation_fusion"))
_(Patch("rope", "megatron.core.models.common.embeddings.rope_utils:_apply_rotary_pos_emb_bshd",
        wrapper=rope.apply_rotary_pos_emb_bshd,
        why="npu_rotary_mul / RoPE with cos-sin computed once per forward"))
_(Patch("rope.fusion", "megatron.core.models.common.embeddings.rope_utils:fused_apply_rotary_pos_emb",
        wrapper=rope.fused_rope_slot, requires=("rope",), sweep=False,
        why="fills apply_rope_fusion's kernel slot where Transformer Engine is absent (Megatron-LM turns it on)"))
_(Patch("rope.fusion_thd", "megatron.core.models.common.embeddings.rope_utils:fused_apply_rotary_pos_emb_thd",
        wrapper=rope.fused_rope_thd_slot, requires=("rope",), sweep=False,
        why="fills the packed (THD) RoPE kernel slot where Transformer Engine is absent: positions restart "
            "at each sequence, one fused call per pack"))
_(Patch("adamw", "megatron.core.optimizer:Adam", replacement=adamw.FusedAdamW, sweep=False,
        why="torch AdamW(fused=True) where megatron builds its optimizer: one _fused_adamw_ kernel per step "
            "(CUDA's, the CPU's, torch-npu's NPU kernel)"))
_(Patch("adamw.select", "megatron.core.optimizer:USING_PYTORCH_OPTIMIZER", replacement=False, sweep=False,
        requires=("adamw",), create=True,
        why="makes megatron take its Apex-style Adam slot, which 'adamw' fills (0.15+; 0.14 has no switch and "
            "always takes the slot)"))
_(Patch("distrib_optimizer.state_dict", "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.state_dict",
        wrapper=distrib_optimizer.state_dict_wrapper, group="device",
        why="without Apex/TE, loading a distributed-optimizer checkpoint asks an optimizer that has not stepped "
            "for its step count and asserts (assert len(steps) == 1): it has taken 0 steps"))
_(Patch("distrib_optimizer.load_state_dict",
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
        wrapper=distrib_optimizer.load_state_dict_wrapper, group="device",
        why="without Apex/TE, a loaded distributed optimizer gives every parameter one shared step tensor, which "
            "torch's fused/foreach Adam advances once per parameter per step: each gets its own"))
_(Patch("distrib_optimizer.set_param_state",
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main_param_and_optimizer_states",
        wrapper=distrib_optimizer.set_param_state_wrapper, group="device",
        why="without Apex/TE, loading overwrote the checkpoint's step with the load template's 0 (the param state "
            "keeps none) and copied into fp32 main params (views of leaves) outside no_grad"))
_(Patch("multi_tensor_l2norm", "megatron.core.utils:local_multi_tensor_l2_norm",
        replacement=multi_tensor.multi_tensor_l2_norm,
        why="torch._foreach_norm instead of one torch.norm per tensor (grad clipping without Apex)"))
_(Patch("multi_tensor_scale", "megatron.core.utils:local_multi_tensor_scale",
        wrapper=multi_tensor.multi_tensor_scale_wrapper,
        why="torch._foreach_mul_ in place instead of dst.copy_(src * scale) per tensor"))

_(Patch("grad_accum_fusion.kernel", "megatron.core.tensor_parallel.layers:fused_weight_gradient_mlp_cuda",
        replacement=grad_accum.CpuWgradAccum, backends=CPU, create=True, sweep=False,
        why="gradient_accumulation_fusion's wgrad GEMM is Apex CUDA-only; on the CPU it accumulates into main_grad"))
_(Patch("grad_accum_fusion.available", "megatron.core.tensor_parallel.layers:_grad_accum_fusion_available",
        replacement=True, backends=CPU, sweep=False, requires=("grad_accum_fusion.kernel",),
        why="lets megatron accept gradient_accumulation_fusion=True, which the kernel above serves"))
_(Patch("grad_accum_fusion.embedding_init", "megatron.core.tensor_parallel.layers:VocabParallelEmbedding.__init__",
        wrapper=grad_accum.vocab_embedding_init,
        why="notes the config's gradient_accumulation_fusion on the embedding, which keeps no config"))
_(Patch("grad_accum_fusion.embedding", "megatron.core.tensor_parallel.layers:VocabParallelEmbedding.forward",
        wrapper=grad_accum.vocab_embedding_forward,
        why="the embedding gradient index-adds into main_grad instead of a zero-filled [vocab, hidden] tensor"))

_(Patch("inference.linear", "megatron.core.tensor_parallel.layers:linear_with_grad_accumulation_and_async_allreduce",
        wrapper=inference_linear.linear_wrapper,
        why="under no_grad (generation, evaluation) one matmul instead of an autograd Function per layer"))
for _fn, _forward in (("copy_to_tensor_model_parallel_region", "identity"),
                      ("reduce_from_tensor_model_parallel_region", "_reduce"),
                      ("gather_from_tensor_model_parallel_region", "_gather_along_last_dim")):
    _(Patch(f"inference.{_fn}", f"megatron.core.tensor_parallel.mappings:{_fn}",
            wrapper=inference_linear.region_wrapper(_forward),
            why="under no_grad the region's forward collective without an autograd Function"))
_(Patch("decode_layer", "megatron.core.transformer.transformer_layer:TransformerLayer.forward",
        wrapper=decode_layer.transformer_layer_forward,
        why="KV-cached one-token decode steps as one fused function instead of ~40 module calls per layer"))
_(Patch("decode_model", "megatron.core.models.gpt.gpt_model:GPTModel.forward",
        wrapper=decode_layer.gpt_model_forward,
        why="a one-token decode step of a one-stage GPTModel: embedding, fused layers, norm, output"))

# megatron-core's dynamic inference engine (0.19's MegatronLLM / MegatronAsyncLLM) without flash-attn; the
# releases with megatron.core.inference.apis are the ones served (recipes refuse older ones)
DYNAMIC_ENGINE = ">=0.19"
_(Patch("paged_attention", "megatron.core.transformer.attention:Attention.flash_decode_and_prefill",
        wrapper=paged_attention.flash_decode_and_prefill_wrapper, megatron_core=DYNAMIC_ENGINE,
        why="flash-attn's varlen / kvcache kernels with a block table: npu_fused_infer_attention_score's "
            "PageAttention on the NPU; one batched SDPA over the step's requests elsewhere (skipped where "
            "flash-attn is installed)"))
_(Patch("paged_attention.fa_version", "megatron.core.transformer.attention:is_fa_min_version",
        wrapper=paged_attention.fa_min_version_wrapper, sweep=False, megatron_core=DYNAMIC_ENGINE,
        why="attention asserts flash-attn >= 2.7.3 under a dynamic batch; with the paged attention above in its "
            "place, the path that runs has what the check guards"))
_(Patch("paged_attention.engine_prompt", "megatron.core.inference.engines.dynamic_engine:DynamicInferenceEngine.add_request",
        wrapper=paged_attention.engine_prompt_wrapper, backends=CPU | NPU, sweep=False, megatron_core=DYNAMIC_ENGINE,
        why="the engine asserts a tokenized prompt is on torch.device(f'cuda:{current_device()}'): no such name on "
            "the CPU, a CUDA device on the NPU; a prompt tensor on this device goes in as its token list"))
_(Patch("engine_threads", "megatron.core.inference.engines.dynamic_engine:DynamicInferenceEngine.run_engine_with_coordinator",
        wrapper=engine_threads.engine_loop_wrapper, sweep=False, megatron_core=DYNAMIC_ENGINE,
        why="the engine steps in a thread of its own under the coordinator; where the main thread handed it its "
            "intra-op threads (engine_threads.hand_to_engine_thread), the loop takes them in that thread, so "
            "libgomp does not hold two teams and throttle their spin"))
_(Patch("paged_attention.no_triton_kv_append",
        "megatron.core.inference.contexts.dynamic_context:triton_append_key_value_cache",
        wrapper=paged_attention.no_triton_kv_append, backends=CPU | NPU, sweep=False, megatron_core=DYNAMIC_ENGINE,
        why="the context takes its Triton KV-append kernel whenever triton imports (the CUDA torch wheel brings "
            "it); the kernel needs CUDA tensors: torch's index_put path runs instead"))

# DeepSpeed (applied once deepspeed is imported)
for _fn in ("get_cuda_rng_tracker", "model_parallel_cuda_manual_seed", "checkpoint"):
    _(Patch(f"deepspeed.{_fn}", f"megatron.core.tensor_parallel.random:{_fn}", wrapper=with_deepspeed.routed(_fn),
            group="deepspeed", after="deepspeed",
            why="while deepspeed.checkpointing is configured, DeepSpeed's: its recompute restores its own RNG "
                "tracker, so megatron's dropout must draw from that one"))
_(Patch("deepspeed.npu_saturation_fp16", "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler.__init__",
        wrapper=with_deepspeed.npu_saturation_check, backends=NPU, group="deepspeed",
        why="an NPU in saturation mode hides overflows from fp16 loss scaling: refused with the reason"))
