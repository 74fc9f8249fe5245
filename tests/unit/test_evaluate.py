"""tools/evaluate.py: a checkpoint's token-level scores equal what the trainer measured on the same samples, in any
layout; text windows predict every token once; bits per byte from the text's bytes; bad input is one line."""

import glob
import json
import math

import pytest
import sentencepiece

from helpers import PYTHON, TORCH_DIST, TP2, launcher, phase_flags, run
from megatron_patch.cli.evaluate import main as evaluate_main
from megatron_patch.data.indexed import IndexHeader
from megatron_patch.evaluation.evaluate import text_windows
from megatron_patch.training import json_log


def _train(corpus, out, k, name, extra=()):
    """A 3-step run with a validation split, its checkpoint and its log's summary."""
    ckpt, log = out / name, out / f"{name}.jsonl"
    run([PYTHON, "pretrain_patch_gpt.py", *phase_flags(corpus, out, k, [
        "--split", "90,10,0", "--eval-iters", "2", "--save", str(ckpt), "--log-json", str(log), *extra], steps=3)])
    return str(ckpt), json_log.last_summary(str(log))


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    # Both checkpoint formats: K=1's run (also exported to HF) in torch_dist, K=4's in the legacy one.
    return {1: _train(corpus, out, 1, "k1", TORCH_DIST), 4: _train(corpus, out, 4, "k4")}


def evaluate(*args, nproc=1, check=True):
    result = run([*launcher(nproc), "tools/evaluate.py", *args], check=check)
    if not check:
        return result
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_validation_split_gives_the_trainers_validation_loss(runs):
    ckpt, summary = runs[1]
    result = evaluate("--load", ckpt, "--micro-batch-size", "4")
    assert result["source"] == "dataset" and result["split"] == "valid" and "patch_level" not in result
    assert result["token_level"]["loss"] == pytest.approx(summary["valid_loss"], rel=1e-5, abs=0)
    assert result["token_level"]["tokens"] > 0


def test_phase1_checkpoint_gets_its_patch_level_loss_and_a_token_level_one(runs):
    ckpt, summary = runs[4]
    result = evaluate("--load", ckpt)
    assert result["patch_level"]["patch_size"] == 4
    assert result["patch_level"]["loss"] == pytest.approx(summary["valid_loss"], rel=1e-5, abs=0)
    # Token level: the same weights reading one token per position, on 32-token samples (the run's positions),
    # the samples on which the trainer validated phase 1 at token level.
    assert result["seq_length"] == 32
    assert result["token_level"]["loss"] == pytest.approx(summary["token_level_valid_loss"], rel=1e-5, abs=0)
    assert result["token_level"]["loss"] != pytest.approx(result["patch_level"]["loss"], rel=1e-3)


def test_tensor_parallel_evaluation_equals_one_process(runs):
    ckpt, summary = runs[1]
    two = evaluate("--load", ckpt, "--micro-batch-size", "4", *TP2, nproc=2)
    assert two["token_level"]["loss"] == pytest.approx(summary["valid_loss"], rel=1e-5, abs=0)


def test_whole_dataset_reads_every_token_once(runs, corpus):
    ckpt, _ = runs[1]
    result = evaluate("--load", ckpt, "--split-name", "all", "--data-path", corpus["plain"], "--micro-batch-size", "64")
    # One epoch of 32-token samples over the dataset (the last partial batch of 64 samples left out).
    tokens = int(IndexHeader(corpus["plain"] + ".idx").sequence_lengths().sum())
    assert tokens - 64 * 33 < result["token_level"]["tokens"] <= tokens


def test_text_scores_count_every_token_once_and_the_texts_bytes(runs, corpus, tmp_path):
    ckpt, _ = runs[1]
    texts = corpus["texts"][:12]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    full = evaluate("--load", ckpt, "--text", str(path), "--seq-length", "32", "--stride", "32")
    strided = evaluate("--load", ckpt, "--text", str(path), "--seq-length", "32", "--stride", "8",
                       "--micro-batch-size", "3")
    tokenizer_ids = sum(len(ids) for ids in _ids(corpus, texts))
    for result in (full, strided):
        scores = result["token_level"]
        assert scores["tokens"] == tokenizer_ids  # every token of every document predicted once
        assert scores["bytes"] == sum(len(t.encode()) for t in texts)
        nats = scores["loss"] * scores["tokens"]
        assert scores["bits_per_byte"] == pytest.approx(nats / math.log(2) / scores["bytes"])
    # More context per predicted token (stride 8 of 32) cannot be much worse than disjoint windows.
    assert strided["token_level"]["loss"] < full["token_level"]["loss"] + 0.05


def _ids(corpus, texts):
    sp = sentencepiece.SentencePieceProcessor(model_file=corpus["tokenizer"])
    return [sp.encode(t) for t in texts]


@pytest.mark.parametrize("length,stride", [(8, 8), (8, 3), (5, 1), (64, 16)])
def test_text_windows_predict_each_position_once_with_growing_context(length, stride):
    ids = list(range(100, 141))  # 41 ids: positions 1..40 are predicted
    predicted = []
    for tokens, labels, known in text_windows(ids, length, stride):
        assert len(tokens) == len(labels) <= length and labels == [t + 1 for t in tokens]
        predicted += labels[known:]
    assert predicted == ids[1:]


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    ckpt, _ = runs[1]
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "latest_checkpointed_iteration.txt").write_text("7\n")
    bad_text = tmp_path / "bad.jsonl"
    bad_text.write_text('{"text": "fine"}\n{"text": \n')
    # Refused before any process group starts: in this process.
    for args, message in [
        (["--load", str(tmp_path / "empty")], "not a checkpoint directory"),
        (["--load", str(broken)], "incomplete checkpoint: no directory iter_0000007 for iteration 7"),
        (["--load", ckpt, "--split-name", "valid", "--text", str(bad_text)], "not both"),
        (["--load", ckpt, "--tensor-model-parallel-size", "3"], "is not divisible by tensor x pipeline parallel size"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            evaluate_main(args)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], (args, lines)
    # Found while reading the text, in a run.
    result = evaluate("--load", ckpt, "--text", str(bad_text), check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and f"{bad_text}:2: malformed JSON" in lines[0], result.stderr


# HF's loss on the windows evaluate.py reads, in a process of its own (no megatron-core CPU shims there).
HF_WINDOW_LOSS = """
import json, sys
import sentencepiece, torch
from transformers import AutoModelForCausalLM
from megatron_patch.evaluation.evaluate import text_windows
hf_dir, tokenizer, docs, length, stride = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
nll, count = 0.0, 0
for line in open(docs):
    for tokens, labels, known in text_windows([sp.eos_id()] + sp.encode(json.loads(line)["text"]), length, stride):
        inputs = torch.tensor([tokens + labels[-1:]])
        targets = torch.tensor([[-100] * (1 + known) + labels[known:]])
        with torch.no_grad():
            loss = model(input_ids=inputs, labels=targets).loss.item()
        nll, count = nll + loss * (len(labels) - known), count + len(labels) - known
print(json.dumps({"loss": nll / count, "tokens": count}))
"""


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "k1"
    run([PYTHON, "tools/export_hf.py", runs[1][0], str(out)])
    return str(out)


def test_text_perplexity_equals_hfs_loss_on_the_exported_model(runs, exported, corpus, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus["texts"][20:26]))
    ours = evaluate("--load", runs[1][0], "--text", str(path), "--seq-length", "32", "--stride", "16")["token_level"]
    hf = json.loads(run([PYTHON, "-c", HF_WINDOW_LOSS, exported, corpus["tokenizer"], str(path), "32", "16"])
                    .stdout.strip().splitlines()[-1])
    assert hf["tokens"] == ours["tokens"] > 100
    assert ours["loss"] == pytest.approx(hf["loss"], rel=1e-5, abs=0)


def test_lm_eval_runs_an_offline_task_on_the_exported_model(exported, corpus, tmp_path):
    """lm-evaluation-harness's `hf` backend on the exported model and a local multiple-choice task, no network. (The
    tiny model was trained on 32 positions, its config's context; RoPE reads the items' longer contexts.)"""
    run([PYTHON, "examples/lm_eval_cloze_task.py", "--input", str(corpus["jsonl"]), "--output", str(tmp_path / "task"),
         "--items", "20"])
    run([PYTHON, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={exported},dtype=float32,max_length=256",
         "--device", "cpu", "--batch_size", "8", "--include_path", str(tmp_path / "task"),
         "--tasks", "python_docs_cloze", "--output_path", str(tmp_path / "results")],
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, timeout=900)
    (results,) = glob.glob(str(tmp_path / "results" / "**" / "results_*.json"), recursive=True)
    scores = json.load(open(results))["results"]["python_docs_cloze"]
    assert 0.0 <= scores["acc,none"] <= 1.0 and scores["alias"] == "python_docs_cloze"
