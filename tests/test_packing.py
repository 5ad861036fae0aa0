"""Packed instruction batches (THD) against independent references: each sample run alone,
padded, through stock megatron attention (per-token losses and gradients), and HF's
LlamaForCausalLM on each sample alone (logits); then the recipe packing at TP=2 and PP=2,
learning and resuming exactly.

Tolerances: fp32 throughout.  Packed and padded compute the same sums in another order
(per-sequence SDPA against stock's baddbmm + softmax over a masked row), so per-token losses
agree to ~1e-6 relative; 1e-5 is asserted.  Gradients are sums over every token of the batch,
compared with 1e-5 relative to each tensor's largest entry."""

import json

import numpy as np
import pytest
import torch

import ascend_patches
from recipes.data import datasets
from tests.helpers.launch import run_torchrun

pytestmark = pytest.mark.slow  # multi-process recipe runs

SEQ = 1024  # the fixture's samples are at most 256 tokens: several fit a row


@pytest.fixture(scope="module")
def packed_rows(stories_sft):
    samples = datasets.InstructionDataset(str(stories_sft / "sft"), SEQ, 2)
    packed = datasets.PackedInstructionDataset(samples)
    return samples, packed


def test_packing_keeps_every_sample_whole_and_once(packed_rows):
    samples, packed = packed_rows
    seen = sorted(j for row in packed.rows for j in row)
    positions = samples.positions()
    assert seen == [j for j in range(len(samples)) if positions[j] > 0]  # each sample once, none cut
    assert all(positions[row].sum() <= SEQ for row in packed.rows)
    row = packed[0]
    starts = (row["position_ids"] == 0).nonzero().view(-1).tolist()
    assert starts[:len(packed.rows[0])] == list(np.cumsum([0] + [int(positions[j]) for j in packed.rows[0]])[:-1])
    padded = positions.sum() / (len(samples) * SEQ)  # one sample per row
    assert packed.real_fraction() > 0.8 and packed.real_fraction() > 1.5 * padded, (packed.real_fraction(), padded)


def _per_sample_reference(model, samples, indices):
    """Each sample alone, padded to SEQ, through stock megatron attention: its per-token losses
    at loss-bearing positions, and the gradient of (sum of those) over every sample."""
    losses = {}
    model.zero_grad()
    with ascend_patches.disabled("ops"):
        for j in indices:
            item = samples[j]
            pos = torch.arange(SEQ).unsqueeze(0)
            out = model(item["tokens"][None], pos, None, labels=item["labels"][None])[0]
            keep = item["loss_mask"] > 0
            out[keep].sum().backward()
            losses[j] = out[keep].detach()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _packed(model, packed, rows):
    model.zero_grad()
    losses = {}
    for r in rows:
        batch = datasets.to_thd({k: v[None] for k, v in packed[r].items()})
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = batch["cu_seqlens"]
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"])
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                    packed_seq_params=params)[0]
        keep = batch["loss_mask"][0] > 0
        out[keep].sum().backward()
        bounds = cu.tolist()
        for j, a in zip(packed.rows[r], bounds):
            n = packed.samples.positions()[j]
            seg = keep[a:a + n]
            losses[j] = out[a:a + n][seg].detach()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["cpu", "npu"])
def test_packed_losses_and_gradients_equal_each_sample_alone(stories_sft, packed_rows, backend, request):
    """Two packed rows (their samples attending only to themselves, RoPE restarting in each)
    against every one of those samples run alone, padded, through stock attention; on the
    emulated NPU the packed side goes through npu_fusion_attention's TND call."""
    from recipes.infer import inference

    if backend == "npu":
        npu = request.getfixturevalue("npu_emulated")
        lm = inference.load(stories_sft / "base", 1, 1)
    else:
        request.getfixturevalue("single_process_group")
        lm = inference.load(stories_sft / "base", 1, 1)
    samples, packed = packed_rows
    model = lm.model
    model.train()
    rows = [0, 1]
    got, got_grads = _packed(model, packed, rows)
    want, want_grads = _per_sample_reference(model, samples, [j for r in rows for j in packed.rows[r]])
    assert set(got) == set(want) and len(got) >= 3
    for j in want:
        torch.testing.assert_close(got[j], want[j], rtol=1e-5, atol=1e-5 * want[j].abs().max().item())
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())
    if backend == "npu":
        assert npu.calls["npu_fusion_attention"] >= 1


def test_packed_logits_equal_hf_on_each_sample_alone(stories_sft, packed_rows, fixtures_dir, single_process_group):
    from megatron.core.packed_seq_params import PackedSeqParams
    from transformers import LlamaForCausalLM

    from recipes.infer import inference

    lm = inference.load(stories_sft / "base", 1, 1)
    lm.model.eval()
    hf = LlamaForCausalLM.from_pretrained(fixtures_dir / "stories260K", dtype=torch.float32).eval()
    samples, packed = packed_rows
    batch = datasets.to_thd({k: v[None] for k, v in packed[0].items()})
    cu = batch["cu_seqlens"]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"])
    with torch.no_grad():
        logits = lm.model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)[0]
        for j, a in zip(packed.rows[0], cu.tolist()):
            n = int(samples.positions()[j])
            ids, _ = samples.document(j)
            want = hf(torch.from_numpy(ids[:-1])[None]).logits[0]
            err = (logits[a:a + n, :want.shape[-1]] - want).abs().max().item()
            assert err < 1e-4, (j, err)  # as the converters' logits == HF test


def _run(sft, save, *extra, nproc=2, iters=8, load=None):
    return run_torchrun("recipes.pretrain", "--load", load or sft / "base", "--data-path", sft / "sft",
                        "--is-instruction-dataset", "--reset-position-ids", "--train-iters", iters, "--seq-length", SEQ,
                        "--micro-batch-size", 2, "--global-batch-size", 4, "--lr", "1e-3", "--save", save,
                        "--hidden-dropout", 0.1, "--attention-dropout", 0.1, *extra, nproc=nproc)


def _losses(save):
    return [json.loads(line)["loss"] for line in open(save / "metrics.jsonl")]


@pytest.mark.parametrize("layout", [
    # a full fine-tune's resume is the pretraining resume's (test_pretrain); LoRA's loads its adapters
    pytest.param(["--tensor-model-parallel-size", 2], marks=pytest.mark.full),
    pytest.param(["--tensor-model-parallel-size", 2, "--lora-target-modules", "linear_qkv", "linear_proj", "--lora-r",
                  8, "--lora-alpha", 16], marks=pytest.mark.full)],  # CI time: test_lora resumes LoRA at TP=2
    ids=["tp2_full", "tp2_lora"])
def test_packed_finetune_learns_and_resumes_exactly(stories_sft, tmp_path, layout):
    """Packed, dropout 0.1, TP=2: the loss falls; a run stopped at 4 (its save) and resumed
    equals the uninterrupted run bit for bit."""
    full = tmp_path / "full"
    _run(stories_sft, full, *layout)
    losses = _losses(full)
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    part = tmp_path / "part"
    _run(stories_sft, part, *layout, "--save-interval", 4, "--exit-after-iters", 4)
    lora = "--lora-target-modules" in layout
    # a full fine-tune resumes from its own save; LoRA keeps the base and loads its adapters
    _run(stories_sft, part, *layout, "--save-interval", 4, *(["--lora-load", part] if lora else []),
         load=None if lora else part)
    assert _losses(part) == losses


@pytest.mark.parametrize("layout", [
    pytest.param(["--tensor-model-parallel-size", 2, "--sequence-parallel"], marks=pytest.mark.full),
    pytest.param(["--pipeline-model-parallel-size", 2], marks=pytest.mark.full),  # CI time: ~50 s
    pytest.param(["--use-distributed-optimizer"], marks=pytest.mark.full)], ids=["tp2_sp", "pp2", "dp2_distopt"])
def test_packed_layouts_equal_one_process(stories_sft, tmp_path, layout):
    """The same packed run (dropout off) at another layout: the losses of one process, to 1e-5
    relative (TP partial sums, the data-parallel mean: fp32 sums in another order)."""
    one = tmp_path / "one"
    run_torchrun("recipes.pretrain", "--load", stories_sft / "base", "--data-path", stories_sft / "sft",
                 "--is-instruction-dataset", "--reset-position-ids", "--train-iters", 4, "--seq-length", SEQ,
                 "--micro-batch-size", 2, "--global-batch-size", 4, "--lr", "1e-3", "--save", one, nproc=1)
    other = tmp_path / "other"
    run_torchrun("recipes.pretrain", "--load", stories_sft / "base", "--data-path", stories_sft / "sft",
                 "--is-instruction-dataset", "--reset-position-ids", "--train-iters", 4, "--seq-length", SEQ,
                 "--micro-batch-size", 2, "--global-batch-size", 4, "--lr", "1e-3", "--save", other, *layout, nproc=2)
    a, b = _losses(one), _losses(other)
    assert len(a) == 4 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)


def test_packed_finetune_under_deepspeed_equals_the_builtin_engine(stories_sft, tmp_path):
    """The same packed fine-tune (dropout off, DP=2) through DeepSpeed ZeRO-1 with torch's AdamW
    and through the built-in engine: the losses agree to 1e-5 absolute (losses ~5: the two
    optimizers' fp32 arithmetic and the data-parallel mean in another order, as
    tests/test_deepspeed.py argues for ZeRO against a plain AdamW loop)."""
    from tests.test_deepspeed import EXT

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    runs = {}
    for name, extra in (("builtin", []), ("deepspeed", ["--deepspeed", "--deepspeed_config", config,
                                                         "--zero-stage", 1])):
        runs[name] = tmp_path / name
        run_torchrun("recipes.pretrain", "--load", stories_sft / "base", "--data-path", stories_sft / "sft",
                     "--is-instruction-dataset", "--reset-position-ids", "--train-iters", 4, "--seq-length", SEQ,
                     "--micro-batch-size", 1, "--global-batch-size", 4, "--lr", "1e-3", "--metrics-file",
                     runs[name] / "metrics.jsonl", *extra, env=EXT, timeout=600)
    a, b = _losses(runs["builtin"]), _losses(runs["deepspeed"])
    assert len(a) == len(b) == 4 and a[-1] < a[0], (a, b)
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)


def _settings(*flags, world=1):
    from recipes.train import pretrain, run_settings

    args = pretrain.build_parser().parse_args(["--model", "llama2-tiny", "--data-path", "x", "--train-iters", "3",
                                               *map(str, flags)])
    return run_settings.resolve(args, world=world)


def test_packing_flags_have_their_meaning_or_are_refused_in_one_line(tmp_path):
    from recipes.errors import BadInput

    s = _settings("--is-instruction-dataset", "--reset-position-ids")  # MindSpeed-LLM's pack fine-tuning
    assert s.data.packed and not s.data.variable_seq_lengths
    s = _settings("--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss")  # Megatron-LM's doc masking
    assert s.data.packed and s.data.eod_mask_loss and not s.data.instruction
    for flags, match in [
        (["--reset-attention-mask"], "--reset-attention-mask without --reset-position-ids"),
        (["--reset-position-ids"], "--reset-position-ids without --reset-attention-mask"),
        (["--variable-seq-lengths"], "--variable-seq-lengths pads instruction samples"),
        (["--is-instruction-dataset", "--reset-position-ids", "--variable-seq-lengths"], "without packing"),
        (["--is-instruction-dataset", "--variable-seq-lengths", "--pipeline-model-parallel-size", 2],
         "--variable-seq-lengths with pipeline parallelism"),
        (["--is-instruction-dataset", "--eod-mask-loss"], "--eod-mask-loss masks EOD tokens of pretraining"),
    ]:
        with pytest.raises(BadInput, match=match):
            _settings(*flags, world=2)
    cfg = tmp_path / "ds.json"
    cfg.write_text("{}")
    with pytest.raises(BadInput, match=r"--reset-position-ids with DeepSpeed's pipeline: not built there"):
        _settings("--is-instruction-dataset", "--reset-position-ids", "--deepspeed", "--deepspeed_config", cfg,
                  "--pipeline-model-parallel-size", 2, world=2)
    s = _settings("--is-instruction-dataset", "--reset-position-ids", "--deepspeed", "--deepspeed_config", cfg)
    assert s.engine == "deepspeed" and s.data.packed


def test_variable_seq_lengths_give_the_padded_losses(stories_sft, tmp_path):
    """Padding each micro-batch to its longest sample, not --seq-length, drops only positions
    after every loss-bearing one: the losses are the padded run's (1e-6 relative: the same sums
    over fewer masked positions)."""
    runs = {}
    for name, extra in (("padded", []), ("variable", ["--variable-seq-lengths"])):
        save = tmp_path / name
        run_torchrun("recipes.pretrain", "--load", stories_sft / "base", "--data-path", stories_sft / "sft",
                     "--is-instruction-dataset", "--train-iters", 3, "--seq-length", SEQ, "--micro-batch-size", 2,
                     "--global-batch-size", 4, "--lr", "1e-3", "--save", save, *extra, nproc=1)
        runs[name] = _losses(save)
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(runs["padded"], runs["variable"])), runs
    batch = datasets.trim_to_longest({"tokens": torch.zeros(2, 10), "loss_mask": torch.tensor(
        [[0, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0.]])}, multiple=4)
    assert batch["tokens"].shape == (2, 8)  # the last loss-bearing position is 5: 6 rounded up to 8


def test_pretraining_document_masking_splits_at_eod(single_process_group, tmp_path, fixtures_dir):
    """--reset-position-ids --reset-attention-mask in pretraining: megatron's GPTDataset restarts
    the positions after each EOD, and the micro-batch reaches the model as THD with a
    sequence per document piece; --eod-mask-loss takes the EOD tokens out of the loss."""
    from recipes.data import preprocess_data
    from recipes.data.tokenizer import load_tokenizer

    tok_path = str(fixtures_dir / "stories260K")
    preprocess_data.main(["--input", str(fixtures_dir / "alpaca" / "alpaca_data_sample.json"), "--tokenizer-name-or-path",
                          tok_path, "--output-prefix", str(tmp_path / "pt"), "--json-keys", "output", "--append-eod",
                          "--log-interval", "100000"])
    tok = load_tokenizer(tok_path)
    train, _, _ = datasets.build_pretrain_datasets([str(tmp_path / "pt_output_document")], "100,0,0", 128, 1, [8, 0, 0],
                                                   tok, str(tmp_path / "cache"), reset_position_ids=True,
                                                   eod_mask_loss=True)
    batch = next(datasets.microbatches(train, 0, 4, 2, 0, 1, shape=datasets.to_thd))
    tokens, cu = batch["tokens"][0], batch["cu_seqlens"].tolist()
    eods = (tokens == tok.eos_id).nonzero().view(-1).tolist()
    assert eods and cu[0] == 0 and cu[-1] == 256
    assert set(e + 1 for e in eods if e + 1 < 256) <= set(cu)  # a sequence starts after every EOD
    assert {128} <= set(cu)  # and at the second row
    assert (batch["loss_mask"][0][tokens == tok.eos_id] == 0).all()


def test_throughput_counts_real_tokens_and_the_sequences_attended(stories_sft, fixtures_dir, tmp_path):
    """One step of 2 micro-batches of 2 at seq 256, padded, --variable-seq-lengths and packed: the
    logged tokens are the real ones of the samples drawn (each sample's input positions, from
    the index), and the FLOPs are 6 N per position the model ran plus 12 L d_head n_heads per
    (query, key) pair of each sequence as attended (a padded row whole, a trimmed row to its
    micro-batch's longest sample, each packed sample and a packed row's tail padding on their
    own).  The arithmetic is written out here from the data; before, every step counted
    4 x 256 tokens and 4 x 256^2 pairs whatever ran.  tokens/s and TFLOP/s are those over the
    step's time (1 device)."""
    from recipes.train import pretrain

    seq, seed, split = 256, 1234, pretrain.build_parser().get_default("split")
    train = datasets.split_instruction_dataset(str(stories_sft / "sft"), seq, 2, split, seed)[0]
    lengths = train.positions()
    drawn = np.random.RandomState(seed).permutation(len(train))[:4]  # epoch 0 of the instruction order
    micro = [lengths[drawn[:2]], lengths[drawn[2:]]]
    packed = datasets.PackedInstructionDataset(train)
    rows = [packed.rows[i] for i in np.random.RandomState(seed).permutation(len(packed))[:4]]
    row_seqs = [list(lengths[r]) + ([seq - lengths[r].sum()] if lengths[r].sum() < seq else []) for r in rows]
    expect = {  # (real tokens, positions run, (query, key) pairs attended)
        "padded": (sum(lengths[drawn]), 4 * seq, 4 * seq ** 2),
        "variable": (sum(lengths[drawn]), sum(2 * m.max() for m in micro), sum(2 * m.max() ** 2 for m in micro)),
        "packed": (sum(lengths[r].sum() for r in rows), 4 * seq, sum(n * n for s in row_seqs for n in s)),
    }
    cfg = json.loads((fixtures_dir / "stories260K" / "config.json").read_text())
    h, f, L, heads, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads"))
    d = h // heads
    dense = L * (h * (h + 2 * kv * d) + h * h + 3 * h * f) + h * cfg["vocab_size"]  # the output layer, not the lookup
    for name, extra in (("padded", []), ("variable", ["--variable-seq-lengths"]), ("packed", ["--reset-position-ids"])):
        save = tmp_path / name
        run_torchrun("recipes.pretrain", "--load", stories_sft / "base", "--data-path", stories_sft / "sft",
                     "--is-instruction-dataset", "--train-iters", 1, "--seq-length", seq, "--micro-batch-size", 2,
                     "--global-batch-size", 4, "--lr", "1e-3", "--seed", seed, "--save", save, *extra, nproc=1)
        rec = json.loads(open(save / "metrics.jsonl").readline())
        tokens, positions, pairs = (int(x) for x in expect[name])
        assert rec["tokens"] == tokens, (name, rec["tokens"], tokens)
        assert rec["flops"] == pytest.approx(6 * dense * positions + 12 * L * d * heads * pairs, rel=1e-12), name
        assert rec["tokens_per_s_per_device"] == pytest.approx(tokens / rec["step_time_s"], rel=1e-9)
        assert rec["tflops_per_device"] == pytest.approx(rec["flops"] / rec["step_time_s"] / 1e12, rel=1e-9)
    assert expect["variable"][1] < expect["padded"][1] and expect["packed"][2] < expect["padded"][2]


@pytest.mark.full  # CI time: ~65 s; packing at load time: test_packed_finetune_learns_and_resumes_exactly
def test_mindspeed_two_step_pack_route_gives_the_load_time_packing_losses(stories_sft, fixtures_dir, tmp_path):
    """MindSpeed-LLM's two steps: preprocess_data --pack --seq-length 256, then train with
    --reset-position-ids.  The dataset records the packing and trains packed: its losses equal
    today's route (plain preprocessing, packed when the data loads) exactly, as they must, being
    the same rows; run without --reset-position-ids it trains packed and says so in one line
    (with the flag, the same settings and nothing said); another --seq-length, --variable-seq-lengths, a pretraining handler or a missing
    --seq-length are refused in one line; preprocessing again without --pack unpacks it."""
    from recipes.data import preprocess_data
    from recipes.errors import BadInput

    seq = 256
    prep = ["--input", str(fixtures_dir / "alpaca" / "alpaca_data_sample.json"), "--tokenizer-name-or-path",
            str(fixtures_dir / "stories260K"), "--handler-name", "GeneralInstructionHandler", "--seq-length", str(seq)]
    prefix = tmp_path / "packed"
    out = preprocess_data.main([*prep, "--output-prefix", str(prefix), "--pack"])
    assert datasets.read_packing(str(prefix)) == {"pack": True, "seq_length": seq}
    assert f"{prefix}_packing.json" in out["outputs"]
    runs = {}
    for name, data, extra in (("load_time", stories_sft / "sft", ["--reset-position-ids"]), ("two_step", prefix, [])):
        save = tmp_path / name
        log = run_torchrun("recipes.pretrain", "--load", stories_sft / "base", "--data-path", data,
                           "--is-instruction-dataset", "--train-iters", 3, "--seq-length", seq, "--micro-batch-size", 2,
                           "--global-batch-size", 4, "--lr", "1e-3", "--save", save, *extra, nproc=1)
        runs[name] = _losses(save)
        said = "was preprocessed with --pack --seq-length 256: its samples train packed into rows of 256"
        assert (said in log) == (name == "two_step"), log[-2000:]  # no --reset-position-ids given: said
    assert runs["two_step"] == runs["load_time"] and len(runs["two_step"]) == 3
    flagged = _settings("--is-instruction-dataset", "--data-path", prefix, "--seq-length", seq, "--reset-position-ids")
    assert flagged.data.packed and flagged.data.note is None  # MindSpeed-LLM's second step, as pasted: nothing to say
    with pytest.raises(BadInput, match=r"preprocessed with --pack --seq-length 256; this run's --seq-length is 512"):
        _settings("--is-instruction-dataset", "--data-path", prefix, "--seq-length", 512)
    with pytest.raises(BadInput, match=r"its samples train packed; --variable-seq-lengths pads unpacked samples"):
        _settings("--is-instruction-dataset", "--data-path", prefix, "--seq-length", seq, "--variable-seq-lengths")
    with pytest.raises(BadInput, match=r"--reset-position-ids \(implied: the --data-path was preprocessed with "
                                       r"--pack\) with --context-parallel-size 2: packed or variable-length"):
        _settings("--is-instruction-dataset", "--data-path", prefix, "--seq-length", seq, "--context-parallel-size", 2,
                  world=2)
    with pytest.raises(BadInput, match=r"--pack packs instruction samples .* writes pretraining documents"):
        preprocess_data.main(["--input", prep[1], "--tokenizer-name-or-path", prep[3], "--output-prefix",
                              str(tmp_path / "p"), "--pack", "--seq-length", "64"])
    with pytest.raises(BadInput, match=r"--pack packs samples into rows of --seq-length: give --seq-length"):
        preprocess_data.main([*prep[:6], "--output-prefix", str(tmp_path / "p"), "--pack"])
    preprocess_data.main([*prep, "--output-prefix", str(prefix)])
    assert datasets.read_packing(str(prefix)) is None
    assert not _settings("--is-instruction-dataset", "--data-path", prefix, "--seq-length", seq).data.packed
