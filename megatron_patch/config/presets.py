"""Named model presets (`--model-preset NAME`): a shape plus the paper's LLaMA-style settings (RMSNorm, SwiGLU,
RoPE, no biases, untied embeddings, no dropout). Explicit flags override a preset's values.

The paper's sizes (Shao et al., 2025; the shapes of its released training scripts): FFN width 8/3 x hidden, rounded
up to a multiple of 64, as LLaMA does. The defaults of the optimizer flags are Megatron-LM's; `--recipe paper` sets
the paper's (RECIPES).
"""

from __future__ import annotations

from megatron_patch.config.schema import ModelConfig

LLAMA_STYLE = {
    "normalization": "RMSNorm",
    "swiglu": True,
    "position_embedding_type": "rope",
    "add_bias_linear": False,
    "untie_embeddings_and_output_weights": True,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}


def _llama(num_layers: int, hidden_size: int, num_attention_heads: int, ffn_hidden_size: int) -> dict:
    return dict(LLAMA_STYLE, num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                ffn_hidden_size=ffn_hidden_size)


# ModelConfig field -> value.
MODEL_PRESETS = {
    "paper-370m": _llama(24, 1024, 16, 2752),
    "paper-780m": _llama(24, 1536, 16, 4096),
    "paper-1.3b": _llama(24, 2048, 16, 5504),
    "paper-2.7b": _llama(32, 2560, 32, 6848),
    # CPU scale: the quick start's model, and the one every multi-process test trains (a few seconds per run).
    "cpu-small": _llama(4, 128, 4, 344),
    "tiny": _llama(2, 64, 4, 176),
}


def preset_model(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a preset, some fields overridden (library users and tests build models from it)."""
    return ModelConfig(**dict(MODEL_PRESETS[name], **overrides))


# `--recipe NAME`: TrainingConfig field (dotted) -> value; explicit flags override it.
RECIPES = {
    # The paper's optimizer (Shao et al., 2025, section 4.1): AdamW (0.9, 0.95), lr 3e-4 with cosine decay to a tenth,
    # 2000 warmup iterations, weight decay 0.1, gradient clipping 1.0.
    "paper": {"optim.lr": 3e-4, "optim.min_lr": 3e-5, "optim.lr_decay_style": "cosine", "optim.lr_warmup_iters": 2000,
              "optim.weight_decay": 0.1, "optim.adam_beta1": 0.9, "optim.adam_beta2": 0.95, "optim.clip_grad": 1.0},
}
