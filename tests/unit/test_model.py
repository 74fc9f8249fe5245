"""PatchGPTModel on megatron-core: K=1 is GPTModel, K>1 runs the transformer on patch positions, and every K
has the same parameters."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_patch.config.presets import preset_model
from megatron_patch.config.schema import ModelConfig, ParallelConfig
from megatron_patch.method.model import build_model, causal_attention_mask, transformer_config

VOCAB = 256

LLAMA = preset_model("tiny", max_position_embeddings=64)
GPT2 = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                   hidden_dropout=0.0, attention_dropout=0.0)


def _model(cfg, k):
    torch.manual_seed(0)
    return build_model(cfg, ParallelConfig(), VOCAB, patch_size=k)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_k1_is_megatron_gpt_model(megatron_process, cfg):
    ours = _model(cfg, 1)
    reference = GPTModel(
        transformer_config(cfg, ParallelConfig()), get_gpt_layer_local_spec(normalization=cfg.normalization),
        vocab_size=VOCAB, max_sequence_length=cfg.max_position_embeddings,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
    )
    reference.load_state_dict(ours.state_dict())
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, 32))
    labels = torch.randint(0, VOCAB, (3, 32))
    loss = ours(tokens, None, None, labels=labels)
    ref = reference(tokens, torch.arange(32)[None], causal_attention_mask(32, "cpu"), labels=labels)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    loss.mean().backward()
    ref.mean().backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_same_parameters_for_every_patch_size(megatron_process, cfg):
    shapes = {k: {n: p.shape for n, p in _model(cfg, k).state_dict().items() if p is not None} for k in (1, 4)}
    assert shapes[1] == shapes[4]


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_patch_of_repeated_tokens_equals_token_level_model(megatron_process, cfg):
    """A patch of K copies of token x has embedding emb(x) (mean of K equal vectors) at patch position i, so the
    K=4 model on repeated tokens must give the K=1 model's logits on the de-duplicated sequence. This pins
    patchify, patch-index positions (RoPE over T positions, learned positions = patch index) and the loss."""
    k, T = 4, 16
    patch_model, token_model = _model(cfg, k), _model(cfg, 1)
    token_model.load_state_dict(patch_model.state_dict())
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (2, T))
    labels = torch.randint(0, VOCAB, (2, T))
    patch_logits = patch_model(tokens.repeat_interleave(k, 1), None, None)
    token_logits = token_model(tokens, None, None)
    assert patch_logits.shape == (2, T, VOCAB)  # the transformer ran on T positions
    torch.testing.assert_close(patch_logits, token_logits, rtol=0, atol=1e-5)
    patch_loss = patch_model(tokens.repeat_interleave(k, 1), None, None, labels=labels.repeat_interleave(k, 1))
    token_loss = token_model(tokens, None, None, labels=labels)
    torch.testing.assert_close(patch_loss, token_loss.repeat_interleave(k, 1), rtol=0, atol=1e-5)


def test_patch_size_4_reads_k_times_more_tokens_per_position(megatron_process):
    model = _model(LLAMA, 4)
    logits = model(torch.randint(0, VOCAB, (1, 64)), None, None)
    assert logits.shape == (1, 16, VOCAB)
