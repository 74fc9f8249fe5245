"""Model FLOPs: the compute axis that makes a two-phase run and a token-only run comparable. No torch.

Training FLOPs of one sample = 3 x its forward FLOPs (backward ~ 2 x forward), counting the matrix multiplies
(2 FLOPs per multiply-add), as Megatron-LM's `num_floating_point_operations` does. A sample of K*T tokens is read
as T positions (T patches; K=1: T tokens). Per layer and position, with hidden h, FFN width f, heads' total width h:

  attention   QKV projections 2*3*h*h, scores Q.K^T and their weighted sum of V 2*2*T*h (the whole T x T, as Megatron
              counts it: causal masking does not halve the kernels' work), output projection 2*h*h
  MLP         2*h*f per matrix: 3 matrices with SwiGLU (gate, up, down), else 2

and once per position the output layer 2*h*V (V: the padded vocabulary), whose ONE softmax serves all K targets of
a patch. The embedding lookup and the mean of K embeddings are not matrix multiplies and are left out. A hybrid
model (--hybrid-layer-pattern) counts its attention layers ("*") and MLP layers ("-") as above; its other layers
(Mamba, MoE, ...) are not counted, so its MFU is understated. So a phase
at patch size K costs 1/K of token-level training per token read at the same positions per sample, and a
two-phase plan costs lambda/K + 1 - lambda of a token-only run on the same tokens.
"""

from __future__ import annotations

from megatron_patch.config.schema import ModelConfig

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity), matched against the device name.
PEAK_TFLOPS = {
    "GB200": 2500.0,
    "B200": 2250.0,
    "H200": 989.0,
    "GH200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card: 756
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "V100": 125.0,  # fp16 tensor cores (no bf16)
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def forward_flops_per_position(model: ModelConfig, num_positions: int, vocab_size: int) -> int:
    """Forward FLOPs of one position of a sample of `num_positions` positions (see the module docstring)."""
    h, f = model.hidden_size, model.ffn_hidden_size or 4 * model.hidden_size
    attention = 2 * 3 * h * h + 2 * 2 * num_positions * h + 2 * h * h
    mlp = 2 * h * f * (3 if model.swiglu else 2)
    if model.hybrid_layer_pattern:
        layers = model.hybrid_layer_pattern.count("*") * attention + model.hybrid_layer_pattern.count("-") * mlp
    else:
        layers = model.num_layers * (attention + mlp)
    return layers + 2 * h * vocab_size


def training_flops_per_sample(model: ModelConfig, seq_length: int, patch_size: int, vocab_size: int) -> int:
    """Forward and backward FLOPs of one sample of `seq_length` tokens read as seq_length / patch_size positions."""
    positions = seq_length // patch_size
    return 3 * positions * forward_flops_per_position(model, positions, vocab_size)


def peak_tflops_of(device_name: str):
    """The table's dense bf16 peak for a device name (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    name = device_name.upper()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)
