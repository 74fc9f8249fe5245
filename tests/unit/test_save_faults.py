"""Writes that fail: a full disk or an unwritable directory while a checkpoint or a preprocessed dataset is written
gives one clear line (the file and the OS's reason), keeps the previous checkpoint the latest and loadable, and
leaves nothing half written where a resume or the trainer would look.

A full disk is a small tmpfs (ENOSPC: needs root and `mount`, as in this container) and, everywhere, a file-size
limit (RLIMIT_FSIZE: writes past it fail with EFBIG through the same code); an unwritable directory is a read-only
bind mount (root ignores permission bits) or, without root, a directory without write permission."""

import contextlib
import os
import resource
import shutil
import subprocess

import pytest
import torch

from helpers import PYTHON, ROOT
from megatron_patch.checkpoint import storage
from megatron_patch.checkpoint.layout import latest_iteration


def _mount(*args) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


class FullDisk:
    """A directory where writing more than about `size` bytes fails: `limit()` in this process, `preexec` for a
    child process; `reason` is the OS's message."""

    def __init__(self, kind: str, path, size: int):
        self.kind, self.path, self.size = kind, str(path), size
        self.reason = "No space left on device" if kind == "tmpfs" else "File too large"

    @contextlib.contextmanager
    def limit(self):
        if self.kind == "tmpfs":
            yield
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    def preexec(self):
        if self.kind != "tmpfs":
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.fixture(params=["tmpfs", "file_size_limit"])
def full_disk(request, tmp_path):
    path = tmp_path / "disk"
    path.mkdir()
    size = 256 * 1024
    if request.param == "tmpfs" and not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    yield FullDisk(request.param, path, size)
    if request.param == "tmpfs":
        subprocess.run(["umount", str(path)], check=True)


def _state(nbytes: int, iteration: int) -> dict:
    return {"model": {"weight": torch.arange(nbytes // 4, dtype=torch.float32)}, "iteration": iteration}


def _assert_one_clear_line(message: str, *parts: str) -> None:
    assert "\n" not in message and "unexpected pos" not in message, message
    for part in parts:
        assert part in message, (part, message)


def test_full_disk_during_save_keeps_the_previous_checkpoint(megatron_process, full_disk):
    root = os.path.join(full_disk.path, "ckpt")
    with full_disk.limit():
        storage.save(root, 1, _state(16 * 1024, 1), {"run": 1})
        with pytest.raises(storage.CheckpointSaveError) as failed:
            storage.save(root, 2, _state(1024 * 1024, 2), {"run": 2})
    _assert_one_clear_line(str(failed.value), "checkpoint of iteration 2 not saved", full_disk.reason,
                           os.path.join(root, "iter_0000002.tmp", "mp_rank_00", "model_optim_rng.pt.tmp"),
                           "still 1")
    assert latest_iteration(root) == 1
    assert sorted(os.listdir(root)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]  # nothing half written
    assert torch.equal(storage.load(root)["model"]["weight"], _state(16 * 1024, 1)["model"]["weight"])
    with full_disk.limit():  # the failed save's space was given back: a checkpoint that fits is saved
        storage.save(root, 2, _state(16 * 1024, 2), {"run": 2})
    assert latest_iteration(root) == 2


@contextlib.contextmanager
def _read_only(path):
    """`path` unwritable: a read-only bind mount as root (which ignores permission bits), else chmod."""
    if os.geteuid() == 0:
        if not (_mount("--bind", path, path) and _mount("-o", "remount,ro,bind", path)):
            pytest.skip("a read-only bind mount needs mount(8)")
        try:
            yield
        finally:
            subprocess.run(["umount", path], check=True)
    else:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)


def test_unwritable_checkpoint_directory_keeps_the_previous_checkpoint(megatron_process, tmp_path):
    root = str(tmp_path / "ckpt")
    storage.save(root, 1, _state(1024, 1), {"run": 1})
    with _read_only(root):
        with pytest.raises(storage.CheckpointSaveError) as failed:
            storage.save(root, 2, _state(1024, 2), {"run": 2})
        _assert_one_clear_line(str(failed.value), "checkpoint of iteration 2 not saved", os.path.join(root, "iter_"))
        assert latest_iteration(root) == 1
        assert storage.load(root)["iteration"] == 1
    assert sorted(os.listdir(root)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def test_full_disk_during_preprocessing_leaves_no_output(corpus, full_disk):
    prefix = os.path.join(full_disk.path, "data", "corpus")
    result = subprocess.run(
        [PYTHON, "tools/preprocess_data.py", "--input", str(corpus["jsonl"]), "--tokenizer-model",
         corpus["tokenizer"], "--append-eod", "--output-prefix", prefix],
        cwd=ROOT, capture_output=True, text=True, preexec_fn=full_disk.preexec, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    _assert_one_clear_line(lines[0], "preprocess_data.py: error:", full_disk.reason, prefix + "_text_document.tmp-")
    assert os.listdir(os.path.dirname(prefix)) == []  # no output under its final name, no temporary files
