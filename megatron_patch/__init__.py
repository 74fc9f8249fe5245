"""megatron-patch: patch-level training (Shao et al., ICLR 2025) for megatron-core GPT models."""

import warnings

# Without Transformer Engine / apex (optional GPU accelerators) megatron-core warns at import time, once per
# module, that it falls back to torch implementations. That is the expected setup on CPU: keep the logs clean.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
# megatron-core 0.16 warns about its own TransformerConfig default (cuda_graph_scope) on every construction.
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
