"""The one error of interop/hf/ (every module of it raises it; the tools report it as one line)."""

from __future__ import annotations

from megatron_patch.errors import MegatronPatchError


class ExportError(MegatronPatchError, ValueError):
    """A model one side cannot express (the message names the feature), or input that is not a complete
    checkpoint / HF model directory. Reported as one line by the tools."""
