"""HF <-> Megatron converters and resharding, checked against HF transformers' own model.

Tolerance for logits: 1e-4 absolute, fp32; observed ~1e-5 on stories260K's
logits of magnitude ~17 (different summation order in attention and the MLP).  Round trips
and reshards move bytes only, so they must be bit-exact.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from converters import hf_to_megatron, megatron_to_hf, reshard
from converters.sources import ConversionError, DistSource, open_megatron
from recipes.errors import MissingInput
from tests.helpers.launch import ROOT, run_torchrun

RANDOM_CONFIGS = {
    # MHA, vocab 300 padded to 384 (TP1) / 512 (TP2)
    "mha": dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=300),
    # GQA 8/2, four layers, vocab padded 500 -> 512
    "gqa": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=500),
}


def _hf_random(path, cfg, seed, safe=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**cfg, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         initializer_range=0.25)  # logits of order 10, like a trained model's
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=safe, max_shard_size="60KB")
    return path


def _hf_tensors(folder):
    from converters.sources import HFSource

    src = HFSource(folder)
    out = {name: src._raw(name) for name in src.weight_map if not src.IGNORED.match(name)}
    src.close()
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixtures_dir):
    """HF folders and their Megatron conversions, made once for the module."""
    root = tmp_path_factory.mktemp("conv")
    stories = fixtures_dir / "stories260K"
    hf = {"stories": stories,
          "mha": _hf_random(root / "hf_mha", RANDOM_CONFIGS["mha"], 1),
          "gqa": _hf_random(root / "hf_gqa", RANDOM_CONFIGS["gqa"], 2),
          "gqa_bin": _hf_random(root / "hf_gqa_bin", RANDOM_CONFIGS["gqa"], 3, safe=False)}
    mg = {}
    for name, folder in hf.items():
        for tp, pp in ((1, 1), (2, 1), (2, 2)):
            out = root / f"mg_{name}_tp{tp}pp{pp}"
            extra = ["--merge-mlp"] if name == "gqa" else []
            hf_to_megatron.main(["--input-model-dir", str(folder), "--output-model-dir", str(out),
                                 "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                                 *extra])
            mg[(name, tp, pp)] = out
    return {"root": root, "hf": hf, "mg": mg}


def _logit_errors(out):
    line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_written_checkpoint_records_shape_and_padding(converted):
    args = json.loads((converted["mg"][("mha", 2, 1)] / "release" / "args.json").read_text())
    assert args["padded_vocab_size"] == 512 and args["vocab_size"] == 300
    assert args["tensor_model_parallel_size"] == 2 and args["shape"]["num_query_groups"] == 4
    assert (converted["mg"][("mha", 2, 1)] / "latest_checkpointed_iteration.txt").read_text() == "release"
    args = json.loads((converted["mg"][("mha", 1, 1)] / "release" / "args.json").read_text())
    assert args["padded_vocab_size"] == 384
    # padded rows are copies of the last real row (Megatron's converter)
    src = open_megatron(converted["mg"][("mha", 2, 1)])
    emb = src.get("embedding")
    assert emb.shape == (512, 32) and torch.equal(emb[300:], emb[299:300].expand(212, 32))


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,nproc", [(1, 1, 1), (2, 1, 2), (1, 2, 2)])
def test_megatron_logits_equal_hf(converted, tp, pp, nproc):
    """Each checkpoint loads at TP/PP other than the one it was written for, too (dist_checkpointing reshards)."""
    names = ["stories", "mha", "gqa", "gqa_bin"] if pp == 1 else ["stories", "gqa"]
    written = {(1, 1): (2, 2), (2, 1): (1, 1), (1, 2): (2, 1)}[(tp, pp)]
    args = []
    for name in names:
        args += [converted["mg"][(name, *written)], converted["hf"][name]]
    errors = _logit_errors(run_torchrun("converted_checks.py", tp, pp, "logits", *args, nproc=nproc, timeout=600))
    print(f"TP={tp} PP={pp} max |logit error|, max |logit|: {errors}")
    assert len(errors) == len(names)
    for load, (err, scale) in errors.items():
        assert scale > 1.0, (load, scale)  # logits large enough that a layout mistake shows
        assert err < 1e-4, (load, err)


def test_round_trip_is_bit_exact(converted):
    root = converted["root"]
    for name in ("stories", "mha", "gqa", "gqa_bin"):
        out = root / f"back_{name}"
        megatron_to_hf.main(["--input-model-dir", str(converted["mg"][(name, 2, 2)]),
                             "--output-model-dir", str(out), "--max-shard-size", "100KB"])
        a, b = _hf_tensors(converted["hf"][name]), _hf_tensors(out)
        assert set(a) == set(b), name
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (name, k)
    # the export loads in transformers directly, sharded with an index
    assert (root / "back_gqa" / "model.safetensors.index.json").is_file()
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(root / "back_gqa")
    assert m.config.num_key_value_heads == 2 and m.config.vocab_size == 500


def _legacy_from_hf(hf_tensors, cfg, out, tp, pp, merge_mlp, divisible=128):
    """AscendSpeed's legacy layout, built straight from docs/layouts.md (independent of converters/)."""
    L, h, nh, ng = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, vocab = h // nh, cfg["vocab_size"]
    mult = divisible * tp
    padded = (vocab + mult - 1) // mult * mult

    def pad(w):
        return torch.cat([w, w[-1:].repeat(padded - vocab, 1)])

    emb, out_w = pad(hf_tensors["model.embed_tokens.weight"]), pad(hf_tensors["lm_head.weight"])
    (out / "release").mkdir(parents=True)
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    per = L // pp
    for t in range(tp):
        for s in range(pp):
            enc = {}
            for local in range(per):
                g = f"model.layers.{s * per + local}."
                q = hf_tensors[g + "self_attn.q_proj.weight"].view(ng, nh // ng * d, h)
                k = hf_tensors[g + "self_attn.k_proj.weight"].view(ng, d, h)
                v = hf_tensors[g + "self_attn.v_proj.weight"].view(ng, d, h)
                groups = range(t * ng // tp, (t + 1) * ng // tp)
                qkv = torch.cat([torch.cat([q[i], k[i], v[i]]) for i in groups])
                o = hf_tensors[g + "self_attn.o_proj.weight"]
                gate, up = hf_tensors[g + "mlp.gate_proj.weight"], hf_tensors[g + "mlp.up_proj.weight"]
                down = hf_tensors[g + "mlp.down_proj.weight"]
                f = gate.shape[0] // tp
                pre = f"layers.{local}."
                enc[pre + "input_layernorm.weight"] = hf_tensors[g + "input_layernorm.weight"].clone()
                enc[pre + "post_attention_layernorm.weight"] = hf_tensors[g + "post_attention_layernorm.weight"].clone()
                enc[pre + "self_attention.query_key_value.weight"] = qkv.clone()
                enc[pre + "self_attention.dense.weight"] = o[:, t * nh // tp * d:(t + 1) * nh // tp * d].clone()
                if merge_mlp:
                    enc[pre + "mlp.proj.weight"] = torch.cat([gate[t * f:(t + 1) * f], up[t * f:(t + 1) * f]]).clone()
                else:
                    enc[pre + "mlp.gate_proj.weight"] = gate[t * f:(t + 1) * f].clone()
                    enc[pre + "mlp.dense_h_to_4h.weight"] = up[t * f:(t + 1) * f].clone()
                enc[pre + "mlp.dense_4h_to_h.weight"] = down[:, t * f:(t + 1) * f].clone()
            lm = {"encoder": enc}
            rows = padded // tp
            if s == 0:
                lm["embedding"] = {"word_embeddings": {"weight": emb[t * rows:(t + 1) * rows].clone()}}
            if s == pp - 1:
                enc["final_layernorm.weight"] = hf_tensors["model.norm.weight"].clone()
                lm["output_layer"] = {"weight": out_w[t * rows:(t + 1) * rows].clone()}
            d_ = out / "release" / (f"mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else ""))
            d_.mkdir()
            torch.save({"checkpoint_version": 3.0, "model": {"language_model": lm}}, d_ / "model_optim_rng.pt")


@pytest.mark.parametrize("merge_mlp", [True, False])
def test_legacy_reshard_chain_is_bit_exact(converted, tmp_path, merge_mlp):
    hf_dir = converted["hf"]["gqa"]
    cfg = json.loads((hf_dir / "config.json").read_text())
    ref = _hf_tensors(hf_dir)
    legacy = tmp_path / "legacy_tp2pp2"
    _legacy_from_hf(ref, cfg, legacy, tp=2, pp=2, merge_mlp=merge_mlp)
    shape = ["--hf-config", str(hf_dir)]
    reshard.main(["--input-model-dir", str(legacy), "--output-model-dir", str(tmp_path / "tp1pp1"), *shape,
                  "--src-tensor-model-parallel-size", "2", "--src-pipeline-model-parallel-size", "2",
                  "--tgt-tensor-model-parallel-size", "1", "--tgt-pipeline-model-parallel-size", "1"])
    reshard.main(["--input-model-dir", str(tmp_path / "tp1pp1"), "--output-model-dir", str(tmp_path / "tp2pp1"),
                  "--tgt-tensor-model-parallel-size", "2", "--tgt-pipeline-model-parallel-size", "1"])
    a, b = open_megatron(tmp_path / "tp1pp1"), open_megatron(tmp_path / "tp2pp1")
    assert isinstance(a, DistSource) and b.args["tensor_model_parallel_size"] == 2
    for name in ("embedding", "output", "final_norm"):
        assert torch.equal(a.get(name), b.get(name)), name
    for layer in range(cfg["num_hidden_layers"]):
        for name in ("input_norm", "qkv", "proj", "mlp_norm", "fc1", "fc2"):
            assert torch.equal(a.get(name, layer), b.get(name, layer)), (name, layer)
    # and the chain's end equals the HF model we started from, tensor for tensor
    megatron_to_hf.main(["--input-model-dir", str(tmp_path / "tp2pp1"), "--output-model-dir", str(tmp_path / "hf")])
    back = _hf_tensors(tmp_path / "hf")
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    # megatron_to_hf reads the legacy layout directly too
    megatron_to_hf.main(["--input-model-dir", str(legacy), "--output-model-dir", str(tmp_path / "hf2"), *shape])
    back2 = _hf_tensors(tmp_path / "hf2")
    assert all(torch.equal(back2[k], ref[k]) for k in ref)


def test_bad_inputs_name_the_problem(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir = converted["hf"]["stories"]
    conv = ["--output-model-dir", str(tmp_path / "out")]
    # TP that does not divide the kv groups (4), PP above the layer count
    with pytest.raises(ValueError, match="tensor-model-parallel-size 8 does not divide 4 kv groups"):
        hf_to_megatron.main(["--input-model-dir", str(hf_dir), *conv, "--tensor-model-parallel-size", "8"])
    with pytest.raises(ValueError, match="pipeline-model-parallel-size 6 is more than the 5 layers"):
        hf_to_megatron.main(["--input-model-dir", str(hf_dir), *conv, "--pipeline-model-parallel-size", "6"])
    with pytest.raises(ValueError, match="--type 7B: num_layers 32"):
        hf_to_megatron.main(["--input-model-dir", str(hf_dir), *conv, "--type", "7B"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # an output folder that already holds a checkpoint
    with pytest.raises(FileExistsError, match="already holds files"):
        hf_to_megatron.main(["--input-model-dir", str(hf_dir), "--output-model-dir",
                             str(converted["mg"][("stories", 1, 1)])])
    # a missing tensor, an unexpected one, a wrong shape
    tensors = load_file(str(hf_dir / "model.safetensors"))
    for case, change, message in (
            ("missing", lambda t: t.pop("model.layers.3.mlp.up_proj.weight"), r"missing tensors \['model.layers.3.mlp.up_proj"),
            ("unexpected", lambda t: t.__setitem__("model.layers.9.foo.weight", torch.zeros(1)), "unexpected tensors"),
            ("shape", lambda t: t.__setitem__("model.layers.1.self_attn.k_proj.weight", torch.zeros(24, 64)),
             r"model.layers.1.self_attn.k_proj.weight: shape \(24, 64\) disagrees with the config's \(32, 64\)")):
        bad = tmp_path / f"bad_{case}"
        bad.mkdir()
        (bad / "config.json").write_text((hf_dir / "config.json").read_text())
        t = dict(tensors)
        change(t)
        save_file(t, str(bad / "model.safetensors"))
        out = tmp_path / f"out_{case}"
        with pytest.raises(ConversionError, match=message):
            hf_to_megatron.main(["--input-model-dir", str(bad), "--output-model-dir", str(out)])
        # nothing left that looks like a checkpoint
        assert not (out / "latest_checkpointed_iteration.txt").exists()
    # source parallel sizes that disagree with what the checkpoint holds
    with pytest.raises(ValueError, match="--src-tensor-model-parallel-size 4, but .* was written with 2"):
        reshard.main(["--input-model-dir", str(converted["mg"][("stories", 2, 2)]), "--output-model-dir",
                      str(tmp_path / "rs"), "--src-tensor-model-parallel-size", "4"])
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        hf_to_megatron.main(["--input-model-dir", str(tmp_path), "--output-model-dir", str(tmp_path / "x")])


def test_cli_entry_point(converted, tmp_path):
    """``python -m converters.hf_to_megatron`` as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "converters.hf_to_megatron", "--input-model-dir",
                           str(converted["hf"]["stories"]), "--output-model-dir", str(tmp_path / "o"),
                           "--tensor-model-parallel-size", "2", "--type", "tiny", "--num_layers", "5",
                           "--hidden_size", "64", "--ffn-hidden-size", "172", "--vocab-size", "512"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TP=2 PP=1" in proc.stdout


def test_truncated_safetensors_is_named(tmp_path, fixtures_dir):
    import shutil

    from tests.helpers.launch import run_module

    src = tmp_path / "hf"
    shutil.copytree(fixtures_dir / "stories260K", src)
    weights = next(src.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = run_module("converters.hf_to_megatron", "--input-model-dir", src, "--output-model-dir", tmp_path / "out")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"error: {weights}: not a readable weights file" in out.stderr and "truncated" in out.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_padded_only_vocabulary_with_its_tokenizer_gone_is_refused(converted, tmp_path):
    """A checkpoint that records only its padded rows (as Megatron-LM's do: vocab_size None)
    and a tokenizer path that no longer exists: the export refuses, naming the checkpoint and
    --vocab-size, instead of writing the padded rows as vocabulary; --vocab-size 300 writes
    an HF model whose vocabulary is the true 300 (and equals the original HF weights' rows)."""
    from safetensors.torch import load_file

    src = tmp_path / "mg"
    shutil.copytree(converted["mg"][("mha", 1, 1)], src)
    args_file = src / "release" / "args.json"
    args = json.loads(args_file.read_text())
    assert args["padded_vocab_size"] == 384 and args["vocab_size"] == 300
    args.update(vocab_size=None, tokenizer_name_or_path=str(tmp_path / "gone" / "tokenizer.model"))
    args_file.write_text(json.dumps(args))
    with pytest.raises(MissingInput, match=r"only its padded vocabulary \(384 rows\) and its tokenizer .*gone/"
                                           r"tokenizer.model is gone.*--vocab-size N"):
        megatron_to_hf.main(["--input-model-dir", str(src), "--output-model-dir", str(tmp_path / "hf")])
    megatron_to_hf.main(["--input-model-dir", str(src), "--output-model-dir", str(tmp_path / "hf"), "--vocab-size", "300"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 300
    written = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        written.update(load_file(str(f)))
    assert tuple(written["model.embed_tokens.weight"].shape) == (300, 32)
