"""HuggingFace export and import (megatron_patch/interop/hf/, tools/export_hf.py, tools/import_hf.py): the exported
model computes our model's logits (fp32, within 1e-5) from checkpoints of real short runs in several layouts,
a swapped q/k/v or gate/up mapping is caught, HF -> import -> export is bit for bit, an imported model trains,
and bad input is one line on stderr with nothing written."""

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import shlex
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM

from helpers import PP2, PYTHON, ROOT, TINY, TORCH_DIST, TP2, launcher, phase_flags, run, train_run
from megatron_patch.checkpoint import guards, layout, reshard
from megatron_patch.cli import export_hf, import_hf
from megatron_patch.config.flags import parse_args
from megatron_patch.config.presets import preset_model
from megatron_patch.config.schema import ModelConfig, ParallelConfig, padded_vocab_size
from megatron_patch.config.tokenizer import TokenizerSpec
from megatron_patch.data.tokenizers.wrappers import SentencePieceTokenizer
from megatron_patch.interop.hf import convert, families, files
from megatron_patch.method.model import build_model, transformer_config

TOLERANCE = 1e-5
# GPT-2 style: Megatron's defaults (LayerNorm, GELU, learned positions, biases, tied) at the tiny size.
GPT2 = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
ZERO3 = ["--deepspeed", "--deepspeed_config", f"{ROOT}/deepspeed_configs/zero3_fp32.json"]
# name -> (processes, K, flags, tied, GPT-2 style): 2-step runs whose checkpoints are exported.
RUNS = {
    # phase 1 (K=4) read at K=1; SwiGLU's stride-2 TP split (these three: legacy per-rank files, which the import
    # test compares shard by shard)
    "llama_k4_tp2": (2, 4, TP2, False, False),
    "llama_tied_pp2": (2, 1, PP2, True, False),  # tied: the last stage holds its own copy of the embedding
    "gpt2": (1, 1, TORCH_DIST, False, True),  # torch_dist: read without a process group
    "llama_zero3_dp2": (2, 1, ZERO3, False, False),  # DeepSpeed's consolidated fp32 weights
    # grouped-query attention (4 heads, 2 key/value groups): one group per TP rank
    "llama_gqa_tp2": (2, 1, [*TP2, "--group-query-attention", "--num-query-groups", "2"], False, False),
}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """name -> checkpoint directory of a RUNS run (each trained once per module, when first needed)."""
    cache = {}

    def get(name):
        if name not in cache:
            nproc, k, extra, tied, gpt2 = RUNS[name]
            out = tmp_path_factory.mktemp(name)
            flags = phase_flags(corpus, out, k, [*extra, "--save", str(out / "ckpt")], steps=2, tied=tied)
            if gpt2:
                assert flags[:2] == TINY
                flags = [*GPT2, *flags[2:]]
            run([*launcher(nproc), f"{ROOT}/pretrain_patch_gpt.py", *flags])
            cache[name] = str(out / "ckpt")
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """name -> HF directory exported (fp32) from that run's checkpoint with tools/export_hf.py's main."""
    cache = {}

    def get(name):
        if name not in cache:
            out = str(tmp_path_factory.mktemp("hf") / name)
            export_hf.main([trained(name), out, "--dtype", "fp32"])
            cache[name] = out
        return cache[name]

    return get


def token_ids(corpus, vocab_size):
    """Two rows of 32 ids: real text, and random ids over the whole vocabulary."""
    text = SentencePieceTokenizer(corpus["tokenizer"]).tokenize(corpus["texts"][3])[:32]
    noise = torch.randint(0, vocab_size, (32,), generator=torch.Generator().manual_seed(0))
    return torch.stack([torch.tensor(text), noise])


def our_logits(model_cfg: ModelConfig, full: dict, ids, vocab_size: int, config=None):
    """PatchGPTModel at K=1, TP=PP=1, with `full` loaded the way the trainer loads weights; the real vocabulary."""
    model = build_model(model_cfg, ParallelConfig(), padded_vocab_size(vocab_size, 1), 1, config=config).eval()
    reshard.load_into(model, full)
    with torch.no_grad():
        return model(ids, None, None)[..., :vocab_size]


def checkpoint_logits(ckpt: str, ids, vocab_size: int):
    saved = guards.locate(ckpt)
    model = build_model(saved.model, ParallelConfig(), padded_vocab_size(vocab_size, 1), 1)
    full = reshard.full_state_dict(saved.directory, reshard.sharding_of(model))  # the trainer's own sharding map
    return our_logits(saved.model, full, ids, vocab_size)


@contextlib.contextmanager
def unshimmed_torch_factories():
    """torch's own tensor factories for a moment. In a process with megatron_patch's CPU shims applied (the
    megatron_process fixture), HF's from_pretrained leaves LLaMA's RoPE buffer (inv_freq, not in the weight files)
    uninitialised; lm-eval and other users load the exported directory in a process of their own."""
    shimmed = {name: getattr(torch, name) for name in ("zeros", "ones", "empty", "full", "tensor", "arange")}
    for name, factory in shimmed.items():
        setattr(torch, name, getattr(factory, "__wrapped__", factory))
    try:
        yield
    finally:
        for name, factory in shimmed.items():
            setattr(torch, name, factory)


def hf_logits(hf_dir: str, ids):
    with unshimmed_torch_factories():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if model.config.model_type == "llama":
        dim, base = model.config.head_dim, model.config.rope_parameters["rope_theta"]
        expected = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)
    with torch.no_grad():
        return model(ids).logits


def max_difference(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def cli(main, args, capsys):
    """(exit code, stdout, stderr) of a tool's main() run in this process."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -- the mapping ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    {}, {"add_bias_linear": True, "untie_embeddings_and_output_weights": False},
    {"normalization": "LayerNorm", "swiglu": False, "position_embedding_type": "learned_absolute",
     "add_bias_linear": True},
    {"normalization": "LayerNorm", "swiglu": False, "position_embedding_type": "learned_absolute",
     "add_bias_linear": True, "untie_embeddings_and_output_weights": False},
    {"group_query_attention": True, "num_query_groups": 2},
], ids=["llama", "llama_bias_tied", "gpt2_untied", "gpt2", "llama_gqa"])
def test_sharding_for_a_config_is_megatron_cores(megatron_process, overrides):
    cfg = preset_model("tiny", max_position_embeddings=32, **overrides)
    built = reshard.sharding_of(build_model(cfg, ParallelConfig(), 1024, 1))
    table = reshard.sharding_for(cfg)
    assert {k: v for k, v in table.items() if k in built} == built
    assert set(table) - set(built) <= {"output_layer.weight"}  # only a pipeline's last stage has it when tied


def _randomised(model):
    """Every parameter moved off its initialisation (biases start at zero, norms at one)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("overrides,groups", [
    ({"add_bias_linear": True, "untie_embeddings_and_output_weights": False, "rotary_base": 5000}, None),
    ({"normalization": "LayerNorm", "swiglu": False, "position_embedding_type": "learned_absolute",
      "add_bias_linear": True, "hidden_dropout": 0.1, "attention_dropout": 0.1}, None),
    ({"group_query_attention": True, "num_query_groups": 2}, 2),
    ({"group_query_attention": True, "add_bias_linear": True}, 1),  # multi-query: one key/value head
], ids=["llama_biases_tied_base5000", "gpt2_untied", "llama_grouped_query_attention", "llama_multi_query_biases"])
def test_features_no_run_trains_map_exactly(megatron_process, corpus, overrides, groups):
    """Biases in a LLaMA-style model, an untied GPT-2, and grouped-query attention give our logits, and import back
    to the same weights and config."""
    cfg = preset_model("tiny", max_position_embeddings=32, **overrides)
    config = transformer_config(cfg, ParallelConfig())
    assert config.num_query_groups == (groups or cfg.num_attention_heads)
    model = build_model(cfg, ParallelConfig(), 1024, 1, config=config).eval()
    full = _randomised(model)
    vocab = 1000
    state, hf_config = convert.megatron_to_hf(full, cfg, vocab)
    if groups:
        assert hf_config.num_key_value_heads == groups
    hf = (LlamaForCausalLM if hf_config.model_type == "llama" else GPT2LMHeadModel)(hf_config).eval()
    hf.load_state_dict(state, strict=not hf_config.tie_word_embeddings)
    ids = token_ids(corpus, vocab)
    with torch.no_grad():
        assert max_difference(model(ids, None, None)[..., :vocab], hf(ids).logits) <= TOLERANCE
    back, back_cfg = convert.hf_to_megatron(state, hf_config)
    assert back_cfg == dataclasses.replace(cfg, ffn_hidden_size=families.ffn_size(cfg), num_query_groups=groups,
                                           transformer_impl="local")  # the layers an import writes
    assert back.keys() == full.keys()
    for name, tensor in back.items():
        assert torch.equal(tensor, full[name][:vocab] if name in reshard.VOCAB_ROWS else full[name]), name


def test_inexpressible_models_name_the_feature():
    cases = [
        ({"swiglu": False}, "LlamaForCausalLM needs --swiglu"),  # RMSNorm + GELU
        ({"normalization": "LayerNorm"}, "LlamaForCausalLM needs --normalization RMSNorm"),  # SwiGLU + LayerNorm
        ({"position_embedding_type": "learned_absolute"}, "needs --position-embedding-type rope"),
        ({"normalization": "LayerNorm", "swiglu": False, "position_embedding_type": "learned_absolute"},
         "GPT2LMHeadModel needs biases (no --disable-bias-linear)"),
        ({"normalization": "LayerNorm", "swiglu": False, "add_bias_linear": True},
         "GPT2LMHeadModel needs --position-embedding-type learned_absolute"),  # rope + LayerNorm + GELU
        ({"model_class": "hybrid", "hybrid_layer_pattern": "*-*-"}, "a hybrid model (--hybrid-layer-pattern *-*-)"),
    ]
    for overrides, message in cases:
        with pytest.raises(convert.ExportError, match=re.escape(message)):
            families.hf_family(preset_model("tiny", **overrides))


# -- checkpoints of real runs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RUNS))
def test_exported_model_gives_our_logits(megatron_process, corpus, trained, exported, name):
    hf_dir = exported(name)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(os.listdir(hf_dir))
    vocab = SentencePieceTokenizer(corpus["tokenizer"]).vocab_size
    ids = token_ids(corpus, vocab)
    ours, theirs = checkpoint_logits(trained(name), ids, vocab), hf_logits(hf_dir, ids)
    assert theirs.shape[-1] == vocab  # the padded rows are cut
    assert max_difference(ours, theirs) <= TOLERANCE
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == [("GPT2LMHeadModel" if RUNS[name][4] else "LlamaForCausalLM")]
    assert config["tie_word_embeddings"] == (RUNS[name][3] or RUNS[name][4])
    if config["architectures"] == ["LlamaForCausalLM"]:
        assert config["num_key_value_heads"] == (2 if "gqa" in name else config["num_attention_heads"])


def test_exported_tokenizer_encodes_as_ours(corpus, exported):
    tokenizer = AutoTokenizer.from_pretrained(exported("gpt2"))
    text = corpus["texts"][3][:500]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == \
        SentencePieceTokenizer(corpus["tokenizer"]).tokenize(text)


@pytest.mark.parametrize("swap", ["q_k", "k_v", "gate_up"])
def test_parity_check_catches_a_swapped_mapping(megatron_process, corpus, trained, tmp_path, monkeypatch, swap):
    """The logits check above is what guards the mapping: export with q/k, k/v or gate/up swapped and it fails."""
    split_qkv, split_gate_up = families.split_qkv, families.split_gate_up  # what the tables' transforms call
    if swap == "q_k":
        monkeypatch.setattr(families, "split_qkv", lambda *a: (lambda q, k, v: (k, q, v))(*split_qkv(*a)))
    elif swap == "k_v":
        monkeypatch.setattr(families, "split_qkv", lambda *a: (lambda q, k, v: (q, v, k))(*split_qkv(*a)))
    else:
        monkeypatch.setattr(families, "split_gate_up", lambda w: split_gate_up(w)[::-1])
    export_hf.main([trained("llama_k4_tp2"), str(tmp_path / "hf")])
    vocab = SentencePieceTokenizer(corpus["tokenizer"]).vocab_size
    ids = token_ids(corpus, vocab)
    ours = checkpoint_logits(trained("llama_k4_tp2"), ids, vocab)
    assert max_difference(ours, hf_logits(tmp_path / "hf", ids)) > 1e-3


@pytest.mark.parametrize("name,tp,pp", [("llama_k4_tp2", 2, 1), ("llama_tied_pp2", 1, 2), ("gpt2", 2, 2),
                                         ("llama_gqa_tp2", 2, 1)])
def test_import_then_export_gives_the_same_tensors(corpus, exported, tmp_path, capsys, name, tp, pp):
    hf_dir = exported(name)
    code, out, err = cli(import_hf.main, [hf_dir, tmp_path / "ckpt", "--tensor-model-parallel-size", tp,
                                          "--pipeline-model-parallel-size", pp, "--tokenizer-model",
                                          corpus["tokenizer"]], capsys)
    assert code == 0, err
    saved = guards.locate(str(tmp_path / "ckpt"))
    assert saved.iteration == 0 and len(glob.glob(f"{saved.directory}/mp_rank_*/model_optim_rng.pt")) == tp * pp
    vocab = SentencePieceTokenizer(corpus["tokenizer"]).vocab_size
    state, _ = convert.megatron_to_hf(saved.full_weights(), saved.model, vocab)
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    assert state.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("name", ["llama_k4_tp2", "llama_tied_pp2", "llama_gqa_tp2"])
def test_import_in_the_trained_layout_writes_the_trained_shards(corpus, trained, exported, tmp_path, capsys, name):
    """Each rank's shard holds exactly the names and values of the trainer's own (up to the vocabulary padding,
    which the export cut): write_checkpoint shards as megatron-core does."""
    saved = guards.locate(trained(name))
    tp, pp = (saved.config["parallel"][f"{x}_model_parallel_size"] for x in ("tensor", "pipeline"))
    code, _, err = cli(import_hf.main, [exported(name), tmp_path / "ckpt", "--tensor-model-parallel-size", tp,
                                        "--pipeline-model-parallel-size", pp, "--tokenizer-model",
                                        corpus["tokenizer"]], capsys)
    assert code == 0, err
    vocab = SentencePieceTokenizer(corpus["tokenizer"]).vocab_size
    imported = guards.locate(str(tmp_path / "ckpt"))
    shards = sorted(shard for shard in os.listdir(saved.directory) if shard.startswith("mp_rank_"))
    assert len(shards) == tp * pp
    for shard in shards:
        ours = torch.load(os.path.join(saved.directory, shard, "model_optim_rng.pt"), weights_only=False)["model"]
        theirs = torch.load(os.path.join(imported.directory, shard, "model_optim_rng.pt"), weights_only=False)["model"]
        assert theirs.keys() == ours.keys(), shard
        for key, tensor in ours.items():
            if not isinstance(tensor, torch.Tensor):
                assert theirs[key] is None, key
                continue
            assert theirs[key].shape == tensor.shape, key
            rows = tensor.size(0)
            if key in reshard.VOCAB_ROWS:  # the real rows of this rank's slice of the padded vocabulary
                rows = min(max(vocab - int(shard.split("_")[2]) * rows, 0), rows)
            assert torch.equal(theirs[key][:rows], tensor[:rows]), (shard, key)


def test_training_continues_from_an_imported_model(corpus, exported, tmp_path, capsys):
    """import_hf.py's printed flags start a TP=2 run from the HF model: the hand-off guard accepts it (model shape,
    tokenizer) and the loss is finite and falls."""
    code, out, err = cli(import_hf.main, [exported("llama_k4_tp2"), tmp_path / "ckpt",
                                          "--tensor-model-parallel-size", 2, "--tokenizer-model",
                                          corpus["tokenizer"]], capsys)
    assert code == 0, err
    flags = shlex.split(out.strip().splitlines()[-1])
    assert flags[flags.index("--pretrained-checkpoint") + 1] == str(tmp_path / "ckpt")
    model = guards.locate(str(tmp_path / "ckpt")).model
    # The printed flags give exactly the imported model (a rope model has no position table to size).
    assert parse_args([*TINY, *flags], required=()).model == dataclasses.replace(model, max_position_embeddings=None)
    (losses, _, _), stdout = train_run(corpus, tmp_path, 1, [*flags, "--lr", "1e-3", "--lr-warmup-iters", "0"],
                                       steps=4, launch=launcher(2))
    assert "initialised weights from" in stdout
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], losses


# -- bad input --------------------------------------------------------------------------------------------------------
def _assert_refused(code, err, out_dir, message):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    parent = os.path.dirname(os.path.normpath(out_dir))
    assert not glob.glob(os.path.join(parent, "*.tmp-*")) and not glob.glob(os.path.join(parent, "*.old-*"))


def test_export_refuses_bad_input_with_one_line(megatron_process, corpus, trained, tmp_path, capsys):
    out = tmp_path / "out" / "hf"
    (tmp_path / "out").mkdir()
    (tmp_path / "empty").mkdir()
    code, _, err = cli(export_hf.main, [tmp_path / "empty", out], capsys)
    _assert_refused(code, err, out, "not a checkpoint directory (no latest_checkpointed_iteration.txt)")
    code, _, err = cli(export_hf.main, [tmp_path / "nowhere", out], capsys)
    _assert_refused(code, err, out, "nowhere: not a checkpoint directory")

    code, _, err = cli(export_hf.main, [trained("gpt2"), out, "--iteration", 99], capsys)
    _assert_refused(code, err, out, "no checkpoint of iteration 99 (iter_0000099)")

    dangling = tmp_path / "dangling"
    shutil.copytree(trained("llama_k4_tp2"), dangling)
    layout.write_tracker(str(dangling), 7)  # points at an iteration never written
    code, _, err = cli(export_hf.main, [dangling, out], capsys)
    _assert_refused(code, err, out, "incomplete checkpoint: no directory iter_0000007 for iteration 7")

    partial = tmp_path / "partial"
    shutil.copytree(trained("llama_k4_tp2"), partial)
    iteration = layout.latest_iteration(str(partial))
    shutil.rmtree(os.path.join(layout.iteration_dir(str(partial), iteration), "mp_rank_01"))
    code, _, err = cli(export_hf.main, [partial, out], capsys)
    _assert_refused(code, err, out, "incomplete checkpoint: missing mp_rank_01/model_optim_rng.pt (TP=2 x PP=1)")

    # RMSNorm with a GELU MLP: no HF class. (Written by write_checkpoint: no run needed to refuse it.)
    cfg = preset_model("tiny", max_position_embeddings=32, swiglu=False)
    full = _randomised(build_model(cfg, ParallelConfig(), 1024, 1))
    tokenizer = TokenizerSpec(tokenizer_model=corpus["tokenizer"])
    files.write_checkpoint(full, files.import_config(cfg, 1, 1, tokenizer), str(tmp_path / "rms_gelu"), 1, 1)
    code, _, err = cli(export_hf.main, [tmp_path / "rms_gelu", out], capsys)
    _assert_refused(code, err, out, "no HuggingFace model class computes this model (RMSNorm, GELU MLP")
    assert not out.exists()

    out.mkdir()
    (out / "mine").write_text("keep")
    code, _, err = cli(export_hf.main, [trained("gpt2"), out], capsys)
    _assert_refused(code, err, out, f"{out} exists (--overwrite replaces it)")
    assert os.listdir(out) == ["mine"]
    code, stdout, err = cli(export_hf.main, [trained("gpt2"), out, "--overwrite"], capsys)
    assert code == 0 and "lm_eval --model hf --model_args pretrained=" in stdout, err
    assert "mine" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path / "out")) == ["hf"]  # no staging or old directory left


def test_import_refuses_bad_input_with_one_line(corpus, exported, tmp_path, capsys):
    out = tmp_path / "ckpt"
    tok = ["--tokenizer-model", corpus["tokenizer"]]
    code, _, err = cli(import_hf.main, [tmp_path, out, *tok], capsys)
    _assert_refused(code, err, out, "no config.json (not a HuggingFace model directory)")

    def variant(name, source, **changes):
        path = tmp_path / name
        path.mkdir()
        shutil.copy(os.path.join(exported(source), "model.safetensors"), path)
        with open(os.path.join(exported(source), "config.json")) as f:
            config = json.load(f)
        (path / "config.json").write_text(json.dumps({**config, **changes}))
        return path

    for hf_dir, message in [
        (variant("gelu_new", "gpt2", activation_function="gelu_new"), "activation_function='gelu_new'"),
        (variant("groups", "llama_k4_tp2", num_key_value_heads=3),
         "num_key_value_heads=3 does not divide num_attention_heads=4"),
        (variant("scaled_rope", "llama_k4_tp2", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 10000.0}), "rope scaling 'linear'"),
    ]:
        code, _, err = cli(import_hf.main, [hf_dir, out, *tok], capsys)
        _assert_refused(code, err, out, message)
    plain = variant("plain", "llama_k4_tp2")
    code, _, err = cli(import_hf.main, [plain, out], capsys)
    _assert_refused(code, err, out, f"no tokenizer.model or tokenizer.json in {plain}: give the tokenizer flags")
    code, _, err = cli(import_hf.main, [plain, out, "--tokenizer-type", "GPT2BPETokenizer"], capsys)
    _assert_refused(code, err, out, "--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) and "
                    "--merge-file (merges.txt)")
    code, _, err = cli(import_hf.main, [plain, out, *tok, "--tensor-model-parallel-size", "3"], capsys)
    _assert_refused(code, err, out, "--tensor-model-parallel-size 3 must divide the 4 attention heads")
    assert not out.exists()
    out.mkdir()
    code, _, err = cli(import_hf.main, [plain, out, *tok], capsys)
    _assert_refused(code, err, out, f"{out} exists (--overwrite replaces it)")
    assert os.listdir(out) == []


def test_tools_report_errors_as_one_line(tmp_path):
    """The scripts as users run them: nothing but the error line on stderr (no warnings or tracebacks)."""
    for tool, message in (("export_hf.py", "not a checkpoint directory"), ("import_hf.py", "no config.json")):
        result = run([PYTHON, f"{ROOT}/tools/{tool}", str(tmp_path), str(tmp_path / "out")], check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"{tool}: error: ") and message in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()
