"""The compute axis: model FLOPs of a training sample against a count by hand, and what patching saves."""

import pytest

from megatron_patch.config.schema import ModelConfig
from megatron_patch.method.flops import peak_tflops_of, training_flops_per_sample

ONE_LAYER = ModelConfig(num_layers=1, hidden_size=4, num_attention_heads=2, ffn_hidden_size=8, swiglu=True)


def test_one_layer_by_hand():
    T, h, f, V = 2, 4, 8, 10  # positions, hidden, FFN width, vocabulary
    matmul = 2  # FLOPs per multiply-add
    q = k = v = matmul * T * h * h  # [T, h] x [h, h]
    scores = matmul * T * T * h  # [T, h] x [h, T], over all heads
    weighted_values = matmul * T * T * h  # [T, T] x [T, h]
    projection = matmul * T * h * h
    gate = up = matmul * T * h * f  # [T, h] x [h, f]
    down = matmul * T * f * h
    logits = matmul * T * h * V  # one softmax for all K targets of a patch
    forward = q + k + v + scores + weighted_values + projection + gate + up + down + logits
    assert training_flops_per_sample(ONE_LAYER, seq_length=T, patch_size=1, vocab_size=V) == 3 * forward
    # Without SwiGLU the MLP has two matrices.
    plain = ModelConfig(num_layers=1, hidden_size=4, num_attention_heads=2, ffn_hidden_size=8)
    assert training_flops_per_sample(plain, T, 1, V) == 3 * (forward - gate)
    # A hybrid model's attention and MLP layers: "*-" is that one layer; "*" alone is it without the MLP.
    hybrid = ModelConfig(num_layers=2, hidden_size=4, num_attention_heads=2, ffn_hidden_size=8, swiglu=True,
                         model_class="hybrid", hybrid_layer_pattern="*-")
    assert training_flops_per_sample(hybrid, T, 1, V) == 3 * forward
    hybrid.hybrid_layer_pattern = "*"
    assert training_flops_per_sample(hybrid, T, 1, V) == 3 * (forward - gate - up - down)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_patches_cost_one_kth_per_token_at_the_same_positions(k):
    model = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176, swiglu=True)
    token_level = training_flops_per_sample(model, 32, 1, 1024) / 32
    patch_level = training_flops_per_sample(model, 32 * k, k, 1024) / (32 * k)
    assert patch_level == pytest.approx(token_level / k, rel=1e-12)


def test_peak_table_matches_device_names():
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_of("NVIDIA A10G") == 70.0
    assert peak_tflops_of("cpu") is None
