"""tools/preprocess_data.py and tools/merge_datasets.py: bytes against Megatron-LM's way of writing datasets
(megatron-core's tokenizer and IndexedDatasetBuilder), every input format, bad input, interruptions."""

import fcntl
import gzip
import json
import os
import pty
import random
import re
import signal
import struct
import subprocess
import termios
import time
from importlib import resources

import numpy
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizer

from helpers import PYTHON, ROOT, run
from megatron_patch.data import corpus as corpus_module
from megatron_patch.data.corpus import Piece, count_lines, number_lines, read_batches, read_lines, split_inputs
from megatron_patch.data.dataset import alignment_pad_id
from megatron_patch.data.indexed import DatasetWriter, read_sidecar
from megatron_patch.data.tokenizers.wrappers import SentencePieceTokenizer

PREPROCESS = "tools/preprocess_data.py"
MERGE = "tools/merge_datasets.py"


def preprocess(tokenizer, inputs, prefix, *extra, check=True, append_eod=True):
    return run([PYTHON, PREPROCESS, "--input", *map(str, inputs), "--tokenizer-model", str(tokenizer),
                "--output-prefix", str(prefix), *(["--append-eod"] if append_eod else []), *extra], check=check)


def megatron_lm_dataset(tokenizer_model, jsonl_lines, prefix, append_eod=True):
    """What Megatron-LM's tools/preprocess_data.py writes for these JSON lines: its Encoder.encode loop restated
    (Megatron-LM itself cannot be installed here) over megatron-core's SentencePiece tokenizer, as its
    build_tokenizer makes it, and megatron-core's IndexedDatasetBuilder."""
    tokenizer = MegatronTokenizer.from_pretrained(tokenizer_path=str(tokenizer_model),
                                                  metadata_path={"library": "sentencepiece"}, legacy=False,
                                                  special_tokens=None)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    for line in jsonl_lines:
        text = json.loads(line)["text"]
        doc_ids, sentence_lens = [], []
        for sentence in text if isinstance(text, list) else [text]:
            ids = tokenizer.tokenize(sentence)
            if ids:
                doc_ids += ids
                sentence_lens.append(len(ids))
        if doc_ids and append_eod:
            doc_ids.append(tokenizer.eod)
            sentence_lens[-1] += 1
        builder.add_document(doc_ids, sentence_lens)
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def assert_same_files(prefix_a, prefix_b, suffixes=(".bin", ".idx")):
    for suffix in suffixes:
        with open(f"{prefix_a}{suffix}", "rb") as a, open(f"{prefix_b}{suffix}", "rb") as b:
            assert a.read() == b.read(), f"{prefix_a}{suffix} != {prefix_b}{suffix}"


def temporary_files(directory):
    return [name for name in os.listdir(directory) if ".tmp" in name]


def _expected(tok, text, k=1):
    ids = tok.tokenize(text) + [tok.eod]
    return ids + [tok.pad] * (-len(ids) % k)


@pytest.mark.parametrize("name,k", [("plain", 1), ("aligned4", 4)])
def test_documents_read_back_as_tokenizer_ids_plus_eod(corpus, name, k):
    tok = SentencePieceTokenizer(corpus["tokenizer"])
    dataset = IndexedDataset(corpus[name])
    assert len(dataset) == len(corpus["texts"])
    assert dataset.index.dtype == numpy.uint16  # vocab < 65500, as Megatron-LM writes it
    for i, text in enumerate(corpus["texts"]):
        assert dataset[i].tolist() == _expected(tok, text, k), f"document {i}"
    meta = read_sidecar(corpus[name])
    assert meta["patch_size"] == k and meta["eod_id"] == tok.eod and meta["pad_id"] == tok.pad
    assert meta["num_documents"] == meta["num_sequences"] == len(dataset)
    assert meta["num_tokens"] == int(dataset.sequence_lengths.sum())
    assert meta["vocab_size"] == tok.vocab_size and meta["dtype"] == "uint16"
    assert meta["inputs"] == [str(corpus["jsonl"])]


def _edge_case_lines(corpus):
    """Real documents plus what Megatron-LM treats specially: an empty document and a whitespace-only one (no
    tokens: no EOD, no sequence), a list of sentences (one sequence each, the empty one dropped)."""
    lines = [json.dumps({"text": text}) for text in corpus["texts"][:20]]
    lines[3] = json.dumps({"text": ""})
    lines[7] = json.dumps({"text": "   "})
    lines[11] = json.dumps({"text": ["First sentence.", "", "Second sentence, with more words."]})
    lines[15] = json.dumps({"text": "non-ASCII: naïve café, 東京, emoji 🙂"})
    return lines


@pytest.mark.parametrize("append_eod", [True, False])
def test_bytes_equal_megatron_lm_output(corpus, tmp_path, append_eod):
    lines = _edge_case_lines(corpus)
    jsonl = tmp_path / "edge.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    result = preprocess(corpus["tokenizer"], [jsonl], tmp_path / "ours", append_eod=append_eod)
    reference = megatron_lm_dataset(corpus["tokenizer"], lines, tmp_path / "megatron", append_eod)
    assert_same_files(tmp_path / "ours_text_document", reference)
    index = IndexedDataset(str(tmp_path / "ours_text_document"))
    assert len(index.document_indices) - 1 == 20 and len(index) == 20 - 2 + 1  # 2 empty, 1 with 2 sentences
    assert "2 empty documents" in result.stdout
    assert f"{jsonl}:4: note: empty document" in result.stderr and f"{jsonl}:8: note: empty" in result.stderr


def test_pretrained_32k_sentencepiece_model(tmp_path):
    """A real LLaMA-2-shaped tokenizer (32000 pieces, byte fallback) from mistral-common: bytes equal Megatron-LM's,
    documents decode back to their text, characters outside the vocabulary go through byte pieces."""
    try:
        model = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    except ModuleNotFoundError:
        pytest.skip("mistral-common is not installed (pip install -r requirements-dev.txt)")
    texts = ["Patch-level training averages K token embeddings.", "Unicode: naïve café, 東京都, Ελληνικά, 🙂🚀",
             "Rare characters ꙮ𓀀 fall back to bytes."]
    lines = [json.dumps({"text": text}) for text in texts]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    preprocess(model, [jsonl], tmp_path / "llama")
    prefix = str(tmp_path / "llama_text_document")
    assert_same_files(prefix, megatron_lm_dataset(model, lines, tmp_path / "megatron"))
    tok = SentencePieceTokenizer(str(model))
    dataset = IndexedDataset(prefix)
    assert tok.vocab_size == 32000 and dataset.index.dtype == numpy.uint16
    for i, text in enumerate(texts):
        ids = dataset[i].tolist()
        assert ids[-1] == tok.eod and tok.detokenize(ids[:-1]) == text
    byte_pieces = [piece for piece in map(tok._sp.id_to_piece, dataset[2].tolist()) if piece.startswith("<0x")]
    assert [int(piece[3:5], 16) for piece in byte_pieces] == list("ꙮ𓀀".encode())  # not in the vocabulary
    # LLaMA-2's tokenizer has no pad id to align patches with: a one-line error, nothing written ...
    result = preprocess(model, [jsonl], tmp_path / "aligned", "--patch-size", "4", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"--patch-size 4: tokenizer {model} has no pad id" in result.stderr and "--pad-id" in result.stderr
    assert not [name for name in os.listdir(tmp_path) if name.startswith("aligned")]
    # ... unless given one (its unk id), which the sidecar records for the trainer's loss mask.
    preprocess(model, [jsonl], tmp_path / "aligned", "--patch-size", "4", "--pad-id", "0")
    aligned = IndexedDataset(str(tmp_path / "aligned_text_document"))
    for i in range(len(texts)):
        ids = aligned[i].tolist()
        assert len(ids) % 4 == 0 and ids[:len(dataset[i])] == dataset[i].tolist()
        assert set(ids[len(dataset[i]):]) <= {0}
    assert read_sidecar(str(tmp_path / "aligned_text_document"))["pad_id"] == 0
    assert alignment_pad_id([str(tmp_path / "aligned_text_document")], tok) == 0
    result = preprocess(model, [jsonl], tmp_path / "bad", "--patch-size", "4", "--pad-id", str(tok.eod), check=False)
    assert result.returncode != 0 and f"--pad-id {tok.eod}: needs an id" in result.stderr


def test_every_input_format_gives_the_same_dataset(corpus, tmp_path):
    """A directory of .jsonl.gz, .jsonl.zst and .txt files == one .jsonl with the same documents in order."""
    texts = corpus["texts"][:30]
    as_lines = [json.dumps({"text": t}) + "\n" for t in texts]
    data = tmp_path / "inputs"
    data.mkdir()
    with gzip.open(data / "a.jsonl.gz", "wt") as f:
        f.writelines(as_lines[:10])
    # Two zstd frames: files concatenated with `cat` are common.
    (data / "b.jsonl.zst").write_bytes(b"".join(zstandard.ZstdCompressor().compress("".join(part).encode())
                                               for part in (as_lines[10:15], as_lines[15:20])))
    one_line_each = [" ".join(t.split()) for t in texts[20:]]  # .txt: one document per line
    (data / "c.txt").write_bytes("\r\n".join(one_line_each).encode() + b"\r\n")
    (data / "README.md").write_text("not an input")
    reference = tmp_path / "reference.jsonl"
    reference.write_text("".join(as_lines[:20]) + "".join(json.dumps({"text": t}) + "\n" for t in one_line_each))
    preprocess(corpus["tokenizer"], [data], tmp_path / "dir")
    preprocess(corpus["tokenizer"], [reference], tmp_path / "ref")
    assert_same_files(tmp_path / "dir_text_document", tmp_path / "ref_text_document")
    assert read_sidecar(str(tmp_path / "dir_text_document"))["inputs"] == [
        str(data / name) for name in ("a.jsonl.gz", "b.jsonl.zst", "c.txt")]


def test_two_workers_write_identical_bytes_and_log_progress(corpus, tmp_path):
    prefix = tmp_path / "w2"
    result = preprocess(corpus["tokenizer"], [corpus["jsonl"]], prefix, "--workers", "2", "--log-interval", "50")
    assert_same_files(f"{prefix}_text_document", corpus["plain"], (".bin", ".idx", ".meta.json"))
    progress = [line for line in result.stderr.splitlines() if line.startswith("processed")]
    # One batch of 160 documents crossed the 50-document mark once.
    assert len(progress) == 1
    assert re.fullmatch(r"processed 160 documents \([\d.]+ docs/s, [\d.]+ MB/s, \d+ tokens\)", progress[0])
    assert "done: 160 documents" in result.stdout and "2 worker(s)" in result.stdout


def test_progress_bar_on_a_terminal(corpus, tmp_path):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm draws nothing in 0 columns
    proc = subprocess.Popen([PYTHON, PREPROCESS, "--input", str(corpus["jsonl"]), "--tokenizer-model",
                             corpus["tokenizer"], "--output-prefix", str(tmp_path / "tty")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait() == 0
    final = shown.decode().replace("\r", "\n").strip().splitlines()[-1]
    assert "160" in final and "docs" in final and "MB/s" in final and "tokens" in final


def _bad_input(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "a good document"}\n'  # 1
        b'{"text": broken json\n'  # 2
        b'{"title": "no text key"}\n'  # 3
        b'{"text": "bad utf-8 \xff\xfe"}\n'  # 4
        b'\n'  # 5: blank, ignored
        b'{"text": 42}\n'  # 6
        b'{"text": "lone \\ud800 surrogate"}\n'  # 7: valid JSON, not encodable text
        b'{"text": ""}\n'  # 8: empty document, kept (no sequences)
        b'["not", "an object"]\n'  # 9
        b'{"text": ["a list", "of sentences"]}\n'  # 10
        b'{"text": "another good one"}\n'  # 11
    )
    return path


def _truncated(path, lines, compress):
    """A compressed file missing the end of its compressed stream."""
    path.write_bytes(compress("".join(line + "\n" for line in lines).encode())[:-16])
    return path


def test_bad_lines_and_unreadable_files_are_skipped_and_reported(corpus, tmp_path):
    bad = _bad_input(tmp_path)
    gone = tmp_path / "gone.jsonl"
    gone.symlink_to(tmp_path / "deleted.jsonl")
    cut_lines = {name: [json.dumps({"text": f"{name} line {i}: " + corpus["texts"][i % 50][:300]})
                        for i in range(3000)] for name in ("cut.jsonl.gz", "cut.jsonl.zst")}
    cut = [_truncated(tmp_path / "cut.jsonl.gz", cut_lines["cut.jsonl.gz"], gzip.compress),
           _truncated(tmp_path / "cut.jsonl.zst", cut_lines["cut.jsonl.zst"], zstandard.ZstdCompressor().compress)]
    result = preprocess(corpus["tokenizer"], [bad, gone, *cut], tmp_path / "out")
    for line, reason in [(2, "malformed JSON"), (3, "no key 'text'"), (4, "not UTF-8 (byte 0xff"), (6, "'text' is int"),
                         (7, "the tokenizer rejects the text"), (9, "not a JSON object")]:
        assert f"{bad}:{line}: skipped: {reason}" in result.stderr
    assert f"{bad}:8: note: empty document" in result.stderr
    assert f"{gone}: cannot read from line 1 on: FileNotFoundError" in result.stderr
    good = [bad.read_bytes().splitlines()[i - 1].decode() for i in (1, 8, 10, 11)]
    for path in cut:  # what could be decompressed is kept, then the file is reported
        read = int(result.stderr.split(f"{path}: cannot read from line ")[1].split()[0]) - 1
        assert 0 < read <= 3000
        good += cut_lines[path.name][:read]
    assert "6 skipped lines, 1 empty documents, 3 unreadable files" in result.stdout
    # Everything usable is there, in order, exactly as Megatron-LM would write those lines.
    reference = megatron_lm_dataset(corpus["tokenizer"], good, tmp_path / "megatron")
    assert_same_files(tmp_path / "out_text_document", reference)
    meta = read_sidecar(str(tmp_path / "out_text_document"))
    assert (meta["skipped_lines"], meta["empty_documents"], meta["unreadable_files"]) == (6, 1, 3)
    assert meta["num_documents"] == len(good) and not temporary_files(tmp_path)


def test_strict_mode_fails_without_leaving_outputs(corpus, tmp_path):
    path = _bad_input(tmp_path)
    result = preprocess(corpus["tokenizer"], [path], tmp_path / "out", "--strict", check=False)
    assert result.returncode != 0
    assert f"{path}:2: skipped" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_failed_rerun_keeps_the_existing_output(corpus, tmp_path):
    prefix = tmp_path / "out"
    preprocess(corpus["tokenizer"], [corpus["jsonl"]], prefix)
    before = {s: open(f"{prefix}_text_document{s}", "rb").read() for s in (".bin", ".idx", ".meta.json")}
    result = preprocess(corpus["tokenizer"], [corpus["jsonl"], _bad_input(tmp_path)], prefix, "--strict", check=False)
    assert result.returncode != 0
    assert {s: open(f"{prefix}_text_document{s}", "rb").read() for s in before} == before
    assert not temporary_files(tmp_path)


@pytest.mark.parametrize("args,message", [
    (["--tokenizer-type", "HuggingFaceTokenizer"], "is not a tokenizer.json (a SentencePiece model? pass "
                                                   "--tokenizer-type SentencePieceTokenizer)"),
    (["--input", "/nonexistent/*.jsonl"], "--input: nothing matches /nonexistent/*.jsonl"),
])
def test_usage_errors_are_one_line(corpus, tmp_path, args, message):
    cmd = [PYTHON, PREPROCESS, "--input", str(corpus["jsonl"]), "--tokenizer-model", corpus["tokenizer"],
           "--output-prefix", str(tmp_path / "out"), *args]
    result = run(cmd, check=False)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)


def test_a_very_long_document_is_kept_whole(corpus, tmp_path):
    tok = SentencePieceTokenizer(corpus["tokenizer"])
    long_text = "\n\n".join(corpus["texts"])[:1_000_000]
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["before", long_text, "after"]) + "\n")
    preprocess(corpus["tokenizer"], [jsonl], tmp_path / "out", "--patch-size", "4")
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert dataset[1].tolist() == _expected(tok, long_text, 4)
    assert [dataset[0].tolist(), dataset[2].tolist()] == [_expected(tok, "before", 4), _expected(tok, "after", 4)]


def test_batches_end_at_a_byte_budget(tmp_path):
    """Memory per batch is bounded by bytes as well as lines: a huge line ends its batch."""
    path = tmp_path / "lines.jsonl"
    huge = b"x" * corpus_module.BATCH_BYTES + b"\n"
    path.write_bytes(b"a\n" * 3 + huge + b"b\n" * 3)
    batches = list(read_batches([Piece(str(path))]))
    assert [(b.first_line, len(b.lines)) for b in batches] == [(1, 4), (5, 3)]


# ---------------------------------------------------------------------------------------------- sharding

def _files_for_sharding(tmp_path):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", ""]
    paths = []
    for name, n in [("a.jsonl", 40), ("empty.jsonl", 0), ("b.jsonl.gz", 25), ("c.jsonl", 60)]:
        lines = "".join(" ".join(rng.choices(words, k=rng.randrange(0, 30))) + "\n" for _ in range(n))
        lines = lines[:-1] if name == "c.jsonl" else lines  # last line without newline
        data = lines.encode()
        (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        paths.append(str(tmp_path / name))
    return paths


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 7, 200])
def test_ranks_read_every_line_once_in_order_with_its_line_number(tmp_path, num_ranks):
    paths = _files_for_sharding(tmp_path)
    expected = [(path, number, line) for path in paths for number, line in enumerate(read_lines(Piece(path)), 1)]
    shares = split_inputs(paths, num_ranks)
    counts = {(p.path, p.start): count_lines(p) for share in shares for p in share if p.end is not None}
    got = []
    for share in shares:
        for batch in read_batches(number_lines(share, counts)):
            got += [(batch.path, batch.first_line + i, line) for i, line in enumerate(batch.lines)]
    assert got == expected
    assert sum(len(share) for share in shares) >= len(paths) + (num_ranks > 1)  # plain files really were cut


# ---------------------------------------------------------------------------------------------- format

def _random_documents(rng, count, vocab):
    for _ in range(count):
        lengths = [rng.randrange(1, 50) for _ in range(rng.choice([0, 1, 1, 3]))]
        yield numpy.array([rng.randrange(vocab) for _ in range(sum(lengths))]), lengths


@pytest.mark.parametrize("vocab", [1000, 100_000])
def test_writer_bytes_equal_megatron_core_builder(tmp_path, vocab):
    """DatasetWriter (streamed index) == IndexedDatasetBuilder, for add_documents and for add_dataset/add_index;
    uint16 and int32 ids, documents without sequences and with several."""
    rng = random.Random(vocab)
    dtype = DType.optimal_dtype(vocab)
    parts = []
    for part in range(2):
        docs = list(_random_documents(rng, 50, vocab))
        ours = DatasetWriter(str(tmp_path / f"ours{part}"), dtype)
        ours.add_documents(numpy.concatenate([ids for ids, _ in docs]), [n for _, ls in docs for n in ls],
                           [len(ls) for _, ls in docs])
        ours.close()
        builder = IndexedDatasetBuilder(str(tmp_path / f"core{part}.bin"), dtype=dtype)
        for ids, lengths in docs:
            builder.add_document(ids, lengths)
        builder.finalize(str(tmp_path / f"core{part}.idx"))
        assert_same_files(tmp_path / f"ours{part}", tmp_path / f"core{part}")
        parts.append(str(tmp_path / f"core{part}"))
    merged = DatasetWriter(str(tmp_path / "ours_merged"), dtype)
    builder = IndexedDatasetBuilder(str(tmp_path / "core_merged.bin"), dtype=dtype)
    for prefix in parts:
        merged.add_dataset(prefix)
        builder.add_index(prefix)
    merged.close()
    builder.finalize(str(tmp_path / "core_merged.idx"))
    assert_same_files(tmp_path / "ours_merged", tmp_path / "core_merged")


# ---------------------------------------------------------------------------------------------- interruptions

def _start_on_a_pipe(corpus, tmp_path, prefix, workers):
    """The tool reading a named pipe the test writes to, so it is surely mid-run when signalled."""
    fifo = tmp_path / "slow.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen([PYTHON, PREPROCESS, "--input", str(fifo), "--tokenizer-model", corpus["tokenizer"],
                             "--output-prefix", str(prefix), "--append-eod", "--workers", str(workers),
                             "--log-interval", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    writer = open(fifo, "w")  # returns once the tool opens the pipe
    writer.write("".join(json.dumps({"text": t[:200]}) + "\n" for t in corpus["texts"]) * 10)
    writer.flush()
    for line in proc.stderr:
        if line.startswith("processed"):
            return proc, writer
    raise AssertionError(f"no progress before the end: {proc.wait()} {proc.stdout.read()}")


def _live_processes_in_group(pgid):
    live = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(pid))
    return live


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_interrupted_run_leaves_nothing_complete_and_the_earlier_output_intact(corpus, tmp_path, how):
    prefix = tmp_path / "out"
    preprocess(corpus["tokenizer"], [corpus["jsonl"]], prefix)
    finals = [f"{prefix}_text_document{s}" for s in (".bin", ".idx", ".meta.json")]
    before = [open(path, "rb").read() for path in finals]
    proc, writer = _start_on_a_pipe(corpus, tmp_path, prefix, workers=2)
    os.kill(proc.pid, getattr(signal, how))
    returncode = proc.wait(timeout=60)
    writer.close()
    assert returncode != 0
    assert [open(path, "rb").read() for path in finals] == before
    deadline = time.time() + 20
    while _live_processes_in_group(proc.pid) and time.time() < deadline:  # tokenizer workers die with the tool
        time.sleep(0.2)
    assert not _live_processes_in_group(proc.pid)
    leftovers = temporary_files(tmp_path)
    if how == "SIGTERM":
        assert not leftovers and "interrupted (SIGTERM): unfinished outputs removed" in proc.stderr.read()
    else:  # nothing can clean up after kill -9, but nothing there looks like a dataset
        assert all(".tmp-" in name and not name.endswith(".meta.json") for name in leftovers)


# ---------------------------------------------------------------------------------------------- merging

def test_merged_datasets_equal_one_run_over_the_concatenated_input(corpus, tmp_path):
    lines = corpus["jsonl"].read_text().splitlines(keepends=True)
    (tmp_path / "parts").mkdir()
    for name, part in [("a.jsonl", lines[:70]), ("b.jsonl", lines[70:])]:
        (tmp_path / name).write_text("".join(part))
        preprocess(corpus["tokenizer"], [tmp_path / name], tmp_path / "parts" / name[0], "--patch-size", "4")
    preprocess(corpus["tokenizer"], [tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "whole",
               "--patch-size", "4")
    result = run([PYTHON, MERGE, "--input", str(tmp_path / "parts"), "--output-prefix", str(tmp_path / "merged")])
    assert "merged 2 datasets: 160 documents" in result.stdout
    assert_same_files(tmp_path / "merged", tmp_path / "whole_text_document", (".bin", ".idx", ".meta.json"))
    # training caches sample indices in <prefix>/cache/: the prefix still names the dataset, not that directory
    (tmp_path / "parts" / "a_text_document" / "cache").mkdir(parents=True)
    run([PYTHON, MERGE, "--input", str(tmp_path / "parts" / "a_text_document"),
         str(tmp_path / "parts" / "b_text_document"), "--output-prefix", str(tmp_path / "listed")])
    assert_same_files(tmp_path / "listed", tmp_path / "merged", (".bin", ".idx", ".meta.json"))


def test_merge_refuses_datasets_that_do_not_match(corpus, tmp_path):
    result = run([PYTHON, MERGE, "--input", corpus["plain"], corpus["aligned4"], "--output-prefix",
                  str(tmp_path / "mixed")], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{corpus['plain']} and {corpus['aligned4']} differ in patch_size (1 vs 4)" in result.stderr
    megatron_lm_dataset(corpus["tokenizer"], corpus["jsonl"].read_text().splitlines()[:3], tmp_path / "foreign")
    result = run([PYTHON, MERGE, "--input", corpus["plain"], str(tmp_path / "foreign"), "--output-prefix",
                  str(tmp_path / "mixed")], check=False)
    assert result.returncode != 0 and f"no {tmp_path / 'foreign'}.meta.json" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["foreign.bin", "foreign.idx"]
