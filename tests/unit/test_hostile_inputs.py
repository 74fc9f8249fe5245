"""Inputs a user is handed or gets wrong, refused with one line naming the file or flag before they can do harm:
checkpoints whose pickle would run code (every path that reads one), damaged datasets, hostile flags and files."""

import json
import os
import pickle
import shutil

import pytest
import torch

from helpers import PYTHON, ROOT, phase_flags, run
from megatron_patch.checkpoint import storage
from megatron_patch.cli import evaluate as evaluate_cli
from megatron_patch.cli import export_hf
from megatron_patch.compat.megatron_core import installed_version
from megatron_patch.config.flags import parse_args
from megatron_patch.config.plan import phases_to_run
from megatron_patch.config.schema import ConfigError
from megatron_patch.data.dataset import DataError
from megatron_patch.training.trainer import Trainer

SHARD = os.path.join("iter_0000001", "mp_rank_00", "model_optim_rng.pt")


class RunsCode:
    """What a hostile checkpoint carries: unpickling it calls os.system (touching `sentinel`)."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def poison(path, sentinel):
    """Replace the checkpoint file `path` with a pickle that would run code."""
    torch.save({"model": RunsCode(sentinel), "config": {}, "iteration": 1}, path)


def one_line_error(result, code=2):
    lines = [line for line in result.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert result.returncode == code and len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """A 1-step run of the tiny model with its checkpoint (Megatron-LM's legacy per-rank files, which are whole
    pickles), and a copy of it whose shard would run code."""
    out = tmp_path_factory.mktemp("saved")
    flags = phase_flags(corpus, out, 4, ["--lr-warmup-iters", "0", "--ckpt-format", "torch", "--save",
                                         str(out / "ckpt")], steps=1)
    run([PYTHON, "pretrain_patch_gpt.py", *flags])
    shutil.copytree(out / "ckpt", out / "hostile")
    poison(out / "hostile" / SHARD, out / "SENTINEL")
    return flags, out


def refusal(out):
    return (f"refusing to load {out / 'hostile' / SHARD}: it holds objects that would run code on loading "
            "(GLOBAL posix.system): not a checkpoint this trainer wrote")


def test_a_real_checkpoint_loads_with_weights_only(saved):
    state = storage.read(str(saved[1] / "ckpt" / SHARD))
    assert state["iteration"] == 1 and state["rng_state"]["numpy"][1].dtype.name == "uint32"


@pytest.mark.parametrize("flag", ["--load", "--pretrained-checkpoint"])
def test_trainer_refuses_a_checkpoint_that_would_run_code(megatron_process, saved, tmp_path, flag):
    flags, out = saved
    cfg = parse_args([*flags, "--save", str(tmp_path / "new"), flag, str(out / "hostile")]).resolve(world_size=1)
    with pytest.raises(storage.CheckpointError) as error:
        trainer = Trainer(cfg)
        trainer.load()
    assert str(error.value) == refusal(out)
    assert not (out / "SENTINEL").exists()


def test_trainer_cli_refuses_it_with_one_line(saved, tmp_path):
    flags, out = saved
    result = run([PYTHON, "pretrain_patch_gpt.py", *flags, "--train-iters", "2", "--save", str(tmp_path / "new"),
                  "--load", str(out / "hostile")], check=False)
    assert one_line_error(result) == f"pretrain_patch_gpt: error: {refusal(out)}"
    assert not (out / "SENTINEL").exists()


def test_evaluate_refuses_it_with_one_line(saved):
    _, out = saved
    result = run([PYTHON, f"{ROOT}/tools/evaluate.py", "--load", str(out / "hostile")], check=False)
    assert one_line_error(result) == f"evaluate.py: error: {refusal(out)}"
    assert not (out / "SENTINEL").exists()


def test_export_refuses_it_with_one_line(saved, tmp_path, capsys):
    _, out = saved
    with pytest.raises(SystemExit) as exit_code:
        export_hf.main([str(out / "hostile"), str(tmp_path / "hf")])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.strip().endswith(refusal(out))
    assert not (out / "SENTINEL").exists() and not (tmp_path / "hf").exists()



@pytest.fixture(scope="module")
def saved_torch_dist(corpus, tmp_path_factory):
    """A 1-step run saved in the default torch_dist format, and copies of its checkpoint with a payload in
    torch.distributed.checkpoint's pickled `.metadata` and (where megatron-core writes one) in `common.pt`."""
    out = tmp_path_factory.mktemp("saved_torch_dist")
    flags = phase_flags(corpus, out, 4, ["--lr-warmup-iters", "0", "--ckpt-format", "torch_dist", "--save",
                                         str(out / "ckpt")], steps=1)
    run([PYTHON, "pretrain_patch_gpt.py", *flags])
    hostile = {}
    for name in (".metadata", "common.pt"):
        if (out / "ckpt" / "iter_0000001" / name).exists():
            shutil.copytree(out / "ckpt", out / name)
            target = out / name / "iter_0000001" / name
            if name == "common.pt":  # a torch.save file, as megatron-core writes it
                poison(target, out / "SENTINEL")
            else:  # a plain pickle, as torch.distributed.checkpoint writes it
                with open(target, "wb") as f:
                    pickle.dump(RunsCode(out / "SENTINEL"), f)
            hostile[name] = out / name
    return flags, out, hostile


def torch_dist_refusal(checkpoint, name):
    return (f"refusing to load {checkpoint / 'iter_0000001' / name}: it holds objects that would run code on "
            f"loading (GLOBAL posix.system): not a checkpoint this trainer wrote")


@pytest.mark.parametrize("name", [".metadata", "common.pt"])
@pytest.mark.parametrize("path", ["--load", "--pretrained-checkpoint", "evaluate", "export"])
def test_a_torch_dist_payload_runs_nothing_and_is_one_line_on_every_path(saved_torch_dist, tmp_path, name, path):
    flags, out, hostile = saved_torch_dist
    if name not in hostile:
        pytest.skip(f"megatron-core {'.'.join(map(str, installed_version()))} writes no {name}")
    checkpoint = hostile[name]
    if path == "evaluate":
        result = run([PYTHON, f"{ROOT}/tools/evaluate.py", "--load", str(checkpoint)], check=False)
        prog = "evaluate.py"
    elif path == "export":
        result = run([PYTHON, f"{ROOT}/tools/export_hf.py", str(checkpoint), str(tmp_path / "hf")], check=False)
        prog = "export_hf.py"
        assert not (tmp_path / "hf").exists()
    else:
        result = run([PYTHON, "pretrain_patch_gpt.py", *flags, "--train-iters", "2", "--save", str(tmp_path / "new"),
                      path, str(checkpoint)], check=False)
        prog = "pretrain_patch_gpt"
    assert one_line_error(result) == f"{prog}: error: {torch_dist_refusal(checkpoint, name)}"
    assert not (out / "SENTINEL").exists()


def test_a_real_torch_dist_checkpoint_passes_the_allow_lists(saved_torch_dist):
    storage.check_torch_dist(str(saved_torch_dist[1] / "ckpt" / "iter_0000001"))


def test_deepspeed_resume_refuses_it_with_one_line(corpus, tmp_path):
    zero1 = ["--deepspeed", "--deepspeed_config", f"{ROOT}/deepspeed_configs/zero1_fp32.json"]
    flags = phase_flags(corpus, tmp_path, 4, [*zero1, "--lr-warmup-iters", "0", "--save", str(tmp_path / "ckpt")],
                         steps=1)
    run([PYTHON, "pretrain_patch_gpt.py", *flags])
    hostile = tmp_path / "ckpt" / "iter_0000001" / "mp_rank_00_model_states.pt"
    poison(hostile, tmp_path / "SENTINEL")
    result = run([PYTHON, "pretrain_patch_gpt.py", *flags, "--train-iters", "2", "--load", str(tmp_path / "ckpt")],
                 check=False)
    assert one_line_error(result) == (f"pretrain_patch_gpt: error: refusing to load {hostile}: it holds objects that "
                                      "would run code on loading (GLOBAL posix.system): not a checkpoint this trainer "
                                      "wrote")
    assert not (tmp_path / "SENTINEL").exists()


# -- damaged datasets ---------------------------------------------------------------------------------------------

def damaged(corpus, tmp_path, how):
    """A copy of the corpus's aligned dataset under tmp_path, damaged `how`; its prefix."""
    prefix = str(tmp_path / "data" / "aligned4_text_document")
    os.makedirs(os.path.dirname(prefix))
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(corpus["aligned4"] + suffix, prefix + suffix)
    size = os.path.getsize(prefix + ".bin")
    meta = json.load(open(prefix + ".meta.json"))
    tokens = meta["num_tokens"]
    if how == "truncated_bin":
        os.truncate(prefix + ".bin", size - 1000)
    elif how == "idx_of_another_bin":
        shutil.copy(corpus["plain"] + ".idx", prefix + ".idx")
    elif how in ("idx_says_int32", "idx_unknown_dtype"):
        with open(prefix + ".idx", "r+b") as f:
            f.seek(17)  # magic (9 bytes), version (8), then the dtype code
            f.write(bytes([4 if how == "idx_says_int32" else 99]))
    elif how in ("sidecar_counts", "sidecar_patch_size", "sidecar_dtype", "sidecar_tokenizer"):
        meta.update({"sidecar_counts": {"num_tokens": 5}, "sidecar_patch_size": {"patch_size": 8},
                     "sidecar_dtype": {"dtype": "int32"}, "sidecar_tokenizer": {"tokenizer_sha256": "0" * 64}}[how])
        json.dump(meta, open(prefix + ".meta.json", "w"))
    return prefix, size, tokens


@pytest.mark.parametrize("how,message", [
    ("truncated_bin", "{p}.bin: {b_1000} bytes, its index describes {b} ({n} uint16 tokens): truncated or from "
                      "another dataset"),
    ("idx_of_another_bin", "{p}.bin: {b} bytes, its index describes"),
    ("idx_says_int32", "{p}.bin: {b} bytes, its index describes {b2} ({n} int32 tokens)"),
    ("idx_unknown_dtype", "{p}.idx: unsupported .idx version 1 or dtype code 99"),
    ("sidecar_counts", "{p}.meta.json: disagrees with {p}.bin/.idx: it says num_tokens 5 (the files: {n})"),
    ("sidecar_dtype", "{p}.meta.json: disagrees with {p}.bin/.idx: it says dtype int32 (the files: uint16)"),
    ("sidecar_patch_size", "{p}.meta.json: disagrees with {p}.bin/.idx: it says patch_size 8 ("),
])
def test_damaged_dataset_is_refused_at_start_up_naming_the_file(megatron_process, corpus, saved, tmp_path, how,
                                                                message):
    prefix, size, tokens = damaged(corpus, tmp_path, how)
    flags, _ = saved
    cfg = parse_args([*flags, "--data-path", prefix, "--save", str(tmp_path / "ckpt")]).resolve(world_size=1)
    with pytest.raises(DataError) as error:
        Trainer(cfg)
    assert str(error.value).startswith("--data-path " + message.format(p=prefix, b=size, b_1000=size - 1000,
                                                                       b2=2 * size, n=tokens)), str(error.value)


def test_dataset_of_another_tokenizer_is_refused_before_reading_it(megatron_process, corpus, saved, tmp_path):
    prefix, _, _ = damaged(corpus, tmp_path, "sidecar_tokenizer")
    flags, _ = saved
    cfg = parse_args([*flags, "--data-path", prefix]).resolve(world_size=1)
    with pytest.raises(DataError, match=f"--data-path {prefix}: tokenized with another tokenizer than this run's"):
        Trainer(cfg).build_datasets()


def test_truncated_bin_is_one_line_from_the_trainer_and_evaluate(corpus, saved, tmp_path):
    prefix, size, tokens = damaged(corpus, tmp_path, "truncated_bin")
    flags, out = saved
    line = (f"--data-path {prefix}.bin: {size - 1000} bytes, its index describes {size} ({tokens} uint16 tokens): "
            "truncated or from another dataset")
    result = run([PYTHON, "pretrain_patch_gpt.py", *flags, "--data-path", prefix, "--save", str(tmp_path / "c")],
                 check=False)
    assert one_line_error(result) == f"pretrain_patch_gpt: error: {line}"
    assert not (tmp_path / "c").exists()
    result = run([PYTHON, f"{ROOT}/tools/evaluate.py", "--load", str(out / "ckpt"), "--data-path", prefix],
                 check=False)
    assert one_line_error(result) == f"evaluate.py: error: {line}"


# -- hostile flags ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "abc", "argument --lr: expected a number, got 'abc'"),
    ("--lr", "-0.001", "argument --lr: must be >= 0, got -0.001"),
    ("--lr", "nan", "argument --lr: must be >= 0, got nan"),
    ("--weight-decay", "-0.1", "argument --weight-decay: must be >= 0, got -0.1"),
    ("--clip-grad", "-1", "argument --clip-grad: must be >= 0, got -1"),
    ("--hidden-dropout", "1.5", "argument --hidden-dropout: must be in [0, 1), got 1.5"),
    ("--adam-beta2", "-0.9", "argument --adam-beta2: must be in [0, 1), got -0.9"),
    ("--adam-eps", "0", "argument --adam-eps: must be > 0, got 0"),
    ("--micro-batch-size", "0", "argument --micro-batch-size: must be >= 1, got 0"),
    ("--global-batch-size", "-8", "argument --global-batch-size: must be >= 1, got -8"),
    ("--num-attention-heads", "0", "argument --num-attention-heads: must be >= 1, got 0"),
    ("--tensor-model-parallel-size", "0", "argument --tensor-model-parallel-size: must be >= 1, got 0"),
    ("--num-layers", "2.5", "argument --num-layers: expected an integer, got '2.5'"),
    ("--eval-interval", "0", "argument --eval-interval: must be >= 1, got 0"),
    ("--eval-iters", "-1", "argument --eval-iters: must be >= 0, got -1"),
    ("--seed", "-1", "argument --seed: must be >= 0, got -1"),
])
def test_non_numeric_or_negative_flag_values_are_argparse_one_liners(saved, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_code:
        parse_args([*saved[0], flag, value])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"pretrain_patch_gpt: error: {message}"]


def test_evaluate_layout_flags_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_code:
        evaluate_cli.main(["--load", "ckpt", "--tensor-model-parallel-size", "0"])
    assert exit_code.value.code == 2
    assert "argument --tensor-model-parallel-size: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("blend,message", [
    ("0.3 {p} abc {p}", "--data-path: the weight of {p} is 'abc', not a number"),
    ("0.5 {p} -0.5 {p}", "--data-path: the weight of {p} is -0.5; weights must be positive numbers"),
    ("0 {p}", "--data-path: the weight of {p} is 0; weights must be positive numbers"),
    ("inf {p}", "--data-path: the weight of {p} is inf; weights must be positive numbers"),
    ("0.5 {p} 0.5", "--data-path: weighted blends need `weight prefix` pairs, got 3 values"),
])
def test_blend_with_odd_weights_is_one_line(corpus, saved, blend, message):
    p = corpus["aligned4"]
    with pytest.raises(ConfigError) as error:
        phases_to_run(parse_args([*saved[0], "--data-path", *blend.format(p=p).split()]), 1)
    assert str(error.value) == message.format(p=p) or str(error.value).startswith(message.format(p=p))


@pytest.mark.parametrize("split", ["1,-1,0", "a,b,c", "0,0,0", "98,1,1,0"])
def test_split_megatron_would_misread_is_one_line(saved, split):
    with pytest.raises(ConfigError, match=f"--split {split}: need up to 3 non-negative numbers"):
        phases_to_run(parse_args([*saved[0], "--split", split]), 1)


def _cut_first_shard(directory):
    shard = sorted(directory.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    return shard, f"{shard}: cut short (100 of"


def _remove_first_shard(directory):
    shard = sorted(directory.glob("*.distcp"))[0]
    shard.unlink()
    return shard, f"{shard}: missing; the checkpoint is damaged"


def _truncate_index(directory):
    index = directory / ".metadata"
    index.write_bytes(index.read_bytes()[:50])
    return index, f"{index}: unreadable torch_dist metadata"


def _garble_megatron_metadata(directory):
    (directory / "metadata.json").write_text("{not json")
    return directory / "metadata.json", f"{directory / 'metadata.json'}: unreadable (JSONDecodeError"


@pytest.mark.parametrize("damage", [_cut_first_shard, _remove_first_shard, _truncate_index, _garble_megatron_metadata])
def test_a_damaged_torch_dist_checkpoint_is_one_line_before_any_step(saved_torch_dist, tmp_path, damage):
    flags, out, _ = saved_torch_dist
    damaged = tmp_path / "damaged"
    shutil.copytree(out / "ckpt", damaged)
    _, message = damage(damaged / "iter_0000001")
    log = tmp_path / "run.jsonl"
    result = run([PYTHON, "pretrain_patch_gpt.py", *flags, "--train-iters", "2", "--save", str(tmp_path / "new"),
                  "--load", str(damaged), "--log-json", str(log)], check=False)
    line = one_line_error(result)
    assert line.startswith("pretrain_patch_gpt: error: ") and message in line, line
    assert not log.exists() or "loss" not in log.read_text()
    # The undamaged checkpoint it was copied from still loads.
    storage.check_torch_dist(str(out / "ckpt" / "iter_0000001"))
