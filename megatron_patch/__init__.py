"""megatron-patch: patch-level training (Shao et al., ICLR 2025) for megatron-core GPT models."""

import logging
import warnings

# Without Transformer Engine / apex (optional GPU accelerators) megatron-core warns at import time, once per
# module, that it falls back to torch implementations. That is the expected setup on CPU: keep the logs clean.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
# megatron-core 0.16 warns about its own TransformerConfig default (cuda_graph_scope) on every construction.
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
# megatron-core 0.19 warns at import time that its multimodal MimoModelConfig (unused here) is experimental.
warnings.filterwarnings("ignore", message=r"MimoModelConfig is experimental")
# megatron-core 0.19 imports torch.utils.cpp_extension, which logs "No CUDA runtime is found, using CUDA_HOME=..."
# on every start where a CUDA build of torch runs without a GPU (never where CUDA is available).
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
# megatron-core 0.19 log lines about its own choices, not the user's:
_DROPPED = {
    # at every GPTModel construction; GPTModel and HybridModel are both supported here (--model-class)
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    # at the first save: its synchronous save goes through the deprecated "mcore" async strategy internally
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
}
for _logger, _message in _DROPPED.items():
    logging.getLogger(_logger).addFilter(lambda record, message=_message: message not in record.getMessage())
