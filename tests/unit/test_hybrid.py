"""PatchHybridModel (--model-class hybrid): the two hooks on megatron-core's HybridModel (MambaModel before 0.18).
At K=1 it is megatron-core's hybrid model; the pattern "*-*-" has a 2-layer GPT's weights, and with them the
K=4 loss of GPTModel's."""

import dataclasses
import re

import pytest
import torch

from helpers import PYTHON, run
from megatron_patch.config.presets import preset_model
from megatron_patch.config.schema import ParallelConfig
from megatron_patch.method.model import (
    HYBRID,
    build_model,
    causal_attention_mask,
    hybrid_stack_spec,
    transformer_config,
)

VOCAB = 256
GPT = preset_model("tiny", max_position_embeddings=64, num_layers=2)
HYBRID_MODEL = dataclasses.replace(GPT, model_class="hybrid", hybrid_layer_pattern="*-*-", num_layers=4)


def _model(cfg, k):
    torch.manual_seed(0)
    return build_model(cfg, ParallelConfig(), VOCAB, patch_size=k)


def _gpt_name(hybrid_name: str) -> str:
    """The GPT weight that a "*-*-" weight is: attention layer 2i and MLP layer 2i+1 are GPT layer i."""
    def layer(match):
        index, rest = int(match.group(1)), match.group(2)
        return f"decoder.layers.{index // 2}.{rest}"

    name = re.sub(r"^decoder\.layers\.(\d+)\.(.*)$", layer, hybrid_name)
    return name.replace("decoder.final_norm.", "decoder.final_layernorm.")


def _batch(k):
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (3, 16 * k)), torch.randint(0, VOCAB, (3, 16 * k))


def test_k1_is_megatron_cores_hybrid_model(megatron_process):
    ours = _model(HYBRID_MODEL, 1)
    reference = HYBRID.model(
        transformer_config(HYBRID_MODEL, ParallelConfig()), **{HYBRID.spec_arg: hybrid_stack_spec(HYBRID_MODEL),
                                                               HYBRID.pattern_arg: "*-*-"},
        vocab_size=VOCAB, max_sequence_length=64, position_embedding_type="rope",
        share_embeddings_and_output_weights=False)
    reference.load_state_dict(ours.state_dict())
    tokens, labels = _batch(1)
    loss = ours(tokens, None, None, labels=labels)
    ref = reference(tokens, torch.arange(16)[None], causal_attention_mask(16, "cpu"), labels=labels)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4])
def test_pattern_equivalent_to_gpt_layers_gives_gpt_loss(megatron_process, k):
    hybrid, gpt = _model(HYBRID_MODEL, k), _model(GPT, k)
    hybrid_weights = hybrid.state_dict()
    mapped = {_gpt_name(name): tensor for name, tensor in hybrid_weights.items() if "_extra_state" not in name}
    assert set(mapped) == {name for name in gpt.state_dict() if "_extra_state" not in name}
    gpt.load_state_dict(mapped, strict=False)
    tokens, labels = _batch(k)
    hybrid_loss = hybrid(tokens, None, None, labels=labels)
    gpt_loss = gpt(tokens, None, None, labels=labels)
    assert hybrid_loss.shape == (3, 16 * k)
    torch.testing.assert_close(hybrid_loss, gpt_loss, rtol=0, atol=1e-5)
    hybrid_loss.mean().backward()
    gpt_loss.mean().backward()
    gpt_grads = dict(gpt.named_parameters())
    for name, p in hybrid.named_parameters():
        torch.testing.assert_close(p.grad, gpt_grads[_gpt_name(name)].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("pattern, message", [
    ("M*M*", "layers 'M' (Mamba 'M', MoE 'E', ...) are built from Transformer Engine layers"),
    ("*-|*-", "pipeline stage boundaries ('|')"),
])
def test_patterns_the_local_layers_cannot_build_are_refused_in_one_line(pattern, message, tmp_path):
    result = run([PYTHON, "pretrain_patch_gpt.py", "--model-preset", "tiny", "--hybrid-layer-pattern", pattern,
                  "--seq-length", "64", "--micro-batch-size", "1", "--train-iters", "1",
                  "--data-path", str(tmp_path / "none"),
                  "--tokenizer-model", str(tmp_path / "none.model")], check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
