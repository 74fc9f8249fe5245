"""A Megatron-LM user's launch script runs unchanged with --patch-size added: the command lines of Megatron-LM's own
example scripts (tests/data/megatron_lm/example_scripts.json, with their source and commit) get through parsing
and validation and stop only at the missing data, once the flags refused here (each with its reason, all in one
message) are taken out. Defaults are compared with Megatron-LM's own parser (arguments.json, dumped from its
arguments.py by tests/data/megatron_lm/dump_arguments.py)."""

from __future__ import annotations

import json
import os
import re

import pytest

from helpers import PYTHON, ROOT, run
from megatron_patch.config import megatron_lm
from megatron_patch.config.flags import FLAGS, build_parser, parse_args
from megatron_patch.config.plan import phases_to_run
from megatron_patch.config.schema import ConfigError

DATA = os.path.join(ROOT, "tests", "data", "megatron_lm")
SCRIPTS = json.load(open(os.path.join(DATA, "example_scripts.json")))["scripts"]
MEGATRON_LM = json.load(open(os.path.join(DATA, "arguments.json")))

# Without Transformer Engine (its fp8 GEMMs): the fp8 flags parse; validation refuses --fp8-format, then the flag
# that needs it
FP8 = [("--fp8-format", "--fp8-format hybrid needs Transformer Engine's fp8 GEMMs"),
       ("--fp8-param-gather", "--fp8-param-gather needs --fp8-format")]
MOE = ["--num-experts", "--moe-router-topk", "--moe-router-load-balancing-type", "--moe-aux-loss-coeff",
       "--moe-grouped-gemm", "--moe-token-dispatcher-type"]
# script -> (the flags refused at parsing, in one message; then, one at a time, what validation refuses here on a
# machine without Transformer Engine, and the message)
REFUSED = {
    "gpt3_175b": (["--step-batch-size-schedule"], []),
    "gpt_345m_model_parallel": ([], []),
    "llama3_8b_fp8": ([], [("--apply-layernorm-1p", "--apply-layernorm-1p needs Transformer Engine's norms"), *FP8]),
    "llama3_8b_megatron_fsdp": (["--use-megatron-fsdp", "--data-parallel-sharding-strategy",
                                 "--init-model-with-meta-device", "--ckpt-format", "--use-nccl-ub",
                                 "--fsdp-double-buffer", "--fsdp-manual-registration"],
                                [("--apply-layernorm-1p", "--apply-layernorm-1p needs Transformer Engine's norms"),
                                 *FP8]),
    "mixtral_8x7b": ([*MOE, "--expert-model-parallel-size"], []),
    "gpt_oss": (["--quick-geglu", "--glu-linear-offset", "--softmax-type", "--window-attn-skip-freq",
                 "--activation-func-clamp-value", "--window-size", "--enable-gpt-oss", "--export-force-local-attention",
                 *MOE, "--moe-ffn-hidden-size", "--moe-router-dtype", "--moe-z-loss-coeff", "--moe-permute-fusion",
                 "--moe-per-layer-logging"],
                [("--transformer-impl", "--transformer-impl transformer_engine needs the transformer_engine package"),
                 *FP8]),
}


@pytest.fixture(scope="module")
def files(corpus, tmp_path_factory):
    """Real tokenizer files of each kind the scripts name (their contents do not matter before the data)."""
    from tokenizers import Tokenizer, models

    out = tmp_path_factory.mktemp("megatron_lm")
    (out / "hf").mkdir()
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(out / "hf" / "tokenizer.json"))
    (out / "vocab.json").write_text(json.dumps({"a": 0}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return {"DATA": str(out / "missing_text_document"), "HF_TOKENIZER": str(out / "hf"),
            "SP_TOKENIZER": corpus["tokenizer"], "VOCAB_FILE": str(out / "vocab.json"),
            "MERGE_FILE": str(out / "merges.txt"), "CHECKPOINT": str(out / "ckpt"), "TENSORBOARD": str(out / "tb"),
            "DATA_CACHE": str(out / "cache")}


def _script(name, files):
    return [re.sub(r"\{(\w+)\}", lambda m: files[m.group(1)], token) for token in SCRIPTS[name]["args"]] + [
        "--patch-size", "4"]


def _without(argv, flag):
    """`argv` less `flag` and the values after it."""
    i = argv.index(flag)
    end = i + 1
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return argv[:i] + argv[end:]


def _error(argv, world_size, capsys):
    """The one-line error parsing and validation give `argv` (as pretrain_patch_gpt.py's main does them)."""
    try:
        phases_to_run(parse_args(argv), world_size)
    except SystemExit as stop:
        assert stop.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1, lines
        return lines[0]
    except ConfigError as error:
        assert "\n" not in str(error)
        return str(error)
    raise AssertionError("the command got past validation")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_megatron_lm_example_script_stops_only_at_the_missing_data(name, files, capsys):
    argv, world = _script(name, files), SCRIPTS[name]["world_size"]
    at_parsing, in_validation = REFUSED[name]
    ours = {option for action in build_parser()._actions for option in action.option_strings}
    foreign = megatron_lm.sort_out(argv, lambda flag: flag in ours)
    assert sorted(given.split()[0] for given, _ in foreign.refused) == sorted(at_parsing)
    if at_parsing:
        message = _error(argv, world, capsys)
        assert message.startswith("pretrain_patch_gpt: error: ")
        assert "unknown flag" not in message and "required" not in message, message
        assert message.endswith(f" not supported here: {foreign.refusals()}"), message
    for flag in at_parsing:
        argv = _without(argv, flag)
    for flag, expected in in_validation:
        assert expected in _error(argv, world, capsys)
        argv = _without(argv, flag)
    assert _error(argv, world, capsys) == f"--data-path: {files['DATA']}.bin does not exist"


def test_the_command_line_says_every_problem_at_once():
    """pretrain_patch_gpt.py itself: unknown, refused and missing flags of one command in one line, exit 2."""
    result = run([PYTHON, "pretrain_patch_gpt.py", "--num-layers", "2", "--fp8-dot-product-attention",
                  "--num-experts", "8", "--context-parallel-size", "2", "--seq-len", "64", "--use-mcore-models"],
                 check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("pretrain_patch_gpt: error: 1 unknown flag: --seq-len (did you mean "
                                    "--seq-length?)")
    for part in ("3 Megatron-LM flags not supported here: --fp8-dot-product-attention: not wired here",
                 "--num-experts: mixture-of-experts", "--context-parallel-size 2: context parallelism",
                 "required: --hidden-size, --num-attention-heads, --seq-length, --micro-batch-size"):
        assert part in result.stderr
    assert "--use-mcore-models" not in result.stderr  # accepted without effect


def test_accepted_flags_are_said_once_at_start_up(corpus, tmp_path):
    from helpers import phase_flags

    result = run([PYTHON, "pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path, 4, steps=2),
                  "--use-mcore-models", "--no-rope-fusion", "--distributed-backend", "nccl", "--sequence-parallel",
                  "--context-parallel-size", "1", "--use-flash-attn"])
    notices = [line for line in result.stdout.splitlines() if line.startswith("notice: ")]
    assert notices == [
        "notice: --use-mcore-models: no effect here (megatron-core models are the only ones here)",
        f"notice: --no-rope-fusion: no effect here ({megatron_lm.NO_EFFECT['--no-rope-fusion']})",
        "notice: --distributed-backend: no effect here (the backend follows the device: NCCL on CUDA, gloo on CPU)",
        "notice: --context-parallel-size 1: no effect here (one context-parallel rank is the default)",
        "notice: --transformer-impl local (Megatron-LM's default is transformer_engine; Transformer Engine is not "
        "installed)",
        "notice: --sequence-parallel turned off: --tensor-model-parallel-size is 1 (as Megatron-LM does)",
    ]


def test_the_tables_hold_no_flag_of_ours_and_only_megatron_lm_flags():
    ours = {option for action in build_parser()._actions for option in action.option_strings}
    theirs = {flag for entry in MEGATRON_LM["arguments"] for flag in entry["flags"]}
    gpt_oss_only = {"--enable-gpt-oss", "--export-force-local-attention"}  # the gpt-oss script's, not arguments.py's
    for kind, table in megatron_lm.tables().items():
        for flag in table:
            assert flag not in ours, (kind, flag)
            assert flag in theirs | gpt_oss_only or flag.endswith("*"), (kind, flag)
    assert set(megatron_lm.BY_VALUE) <= theirs and not set(megatron_lm.BY_VALUE) & ours


# Ours differ on purpose: a preset/recipe-free run needs these from the user in both (None there, required here) or
# the value means the same thing spelled otherwise.
SAME_MEANING = {
    "--split": "None there becomes 969,30,1 (its legacy default), ours is 969,30,1",
    **{flag: "None there, [] here: no data given" for flag in ("--data-path", "--train-data-path",
                                                                "--valid-data-path", "--test-data-path")},
    "--num-query-groups": "1 there; None here means 1 with --group-query-attention",
    "--transformer-impl": "transformer_engine there; None here resolves to it when it imports (else local, said)",
    "--local-rank": "set by the launcher",
}


NEGATED = {flag.name for flag in FLAGS if flag.negated}


def test_every_shared_flag_has_megatron_lm_s_default():
    theirs = {flag: entry for entry in MEGATRON_LM["arguments"] for flag in entry["flags"]}
    parser = build_parser()
    compared = 0
    for action in parser._actions:
        for option in action.option_strings:
            if option not in theirs or option in SAME_MEANING:
                continue
            entry, ours = theirs[option], action.default
            # --disable-x there stores False into add_x; here it is a flag that is off (or add_x itself)
            if entry["action"] == "_StoreFalseAction" and (type(action).__name__ == "_StoreTrueAction"
                                                            or option in NEGATED):
                ours = not ours
            default = entry["default"]
            if default is None and entry["action"] == "_StoreTrueAction":  # not given: off
                default = False
            assert ours == default, (option, ours, default)
            compared += 1
    assert compared >= 80
