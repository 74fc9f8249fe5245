"""Core attention backends, activation recompute and grouped-query attention in one process: the SDPA module computes
megatron-core's DotProductAttention (outputs and gradients, with and without GQA), whole models agree across
backends, attention dropout acts only in training and inside the tensor-parallel RNG fork, every recompute setting
gives the losses and gradients of none, and each new inconsistent setting is a one-line ConfigError."""

import copy
import dataclasses
import importlib.util
import re

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_patch.config.flags import build_parser, parse_args
from megatron_patch.config.presets import preset_model
from megatron_patch.config.schema import ConfigError, ParallelConfig
from megatron_patch.method.attention import PlainCausalMasks, SDPAttention
from megatron_patch.method.model import build_model, causal_attention_mask, transformer_config

VOCAB = 256
TOLERANCE = 1e-5
GQA = {"group_query_attention": True, "num_query_groups": 2}  # 4 heads, 2 key/value groups
WITHOUT_TE = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                                reason="checks what happens without Transformer Engine")


def _core_attention(cls, groups=None, dropout=0.0):
    cfg = preset_model("tiny", attention_dropout=dropout, **({"group_query_attention": True,
                                                              "num_query_groups": groups} if groups else {}))
    config = transformer_config(cfg, ParallelConfig())
    return cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"), config


def _qkv(config, s=24, b=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    head_dim = config.kv_channels

    def make(n):
        return torch.randn(s, b, n, head_dim, generator=generator).requires_grad_()

    return make(config.num_attention_heads), make(config.num_query_groups), make(config.num_query_groups)


def _run(module, qkv, mask):
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv)
    out = module(q, k, v, mask)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))  # any fixed output gradient
    return out.detach(), (q.grad, k.grad, v.grad)


def _padding_mask(s, b):
    """Causal plus some keys masked per sample (never a whole row): an explicit, non-plain mask."""
    mask = causal_attention_mask(s, "cpu").expand(b, 1, s, s).clone()
    for i in range(b):
        mask[i, :, 5:, 1 + i] = True
    return mask


@pytest.mark.parametrize("groups", [None, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("mask_kind", ["causal", "explicit"])
def test_sdpa_computes_megatron_core_dot_product_attention(megatron_process, groups, mask_kind):
    ours, config = _core_attention(SDPAttention, groups)
    reference, _ = _core_attention(DotProductAttention, groups)
    qkv = _qkv(config)
    s, b = qkv[0].shape[:2]
    mask = causal_attention_mask(s, "cpu") if mask_kind == "causal" else _padding_mask(s, b)
    out, grads = _run(ours, qkv, mask)
    ref_out, ref_grads = _run(reference, qkv, mask)
    assert out.shape == (s, b, config.hidden_size)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=TOLERANCE)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=0, atol=TOLERANCE, msg=name)


def test_missing_mask_of_a_causal_layer_is_the_causal_mask(megatron_process):
    ours, config = _core_attention(SDPAttention, 2)
    qkv = _qkv(config)
    with_mask, grads = _run(ours, qkv, causal_attention_mask(qkv[0].size(0), "cpu"))
    without, grads_without = _run(ours, qkv, None)
    torch.testing.assert_close(with_mask, without, rtol=0, atol=0)
    for grad, other in zip(grads, grads_without):
        torch.testing.assert_close(grad, other, rtol=0, atol=0)


@pytest.mark.parametrize("block", [1 << 20, 7], ids=["one_block", "row_blocks"])
def test_only_the_plain_causal_mask_runs_as_is_causal(block):
    check = PlainCausalMasks()
    check.BLOCK = block
    causal = causal_attention_mask(40, "cpu")
    assert check(causal, 40, 40) and check(causal, 40, 40)  # the second time from the remembered mask
    for position in [(0, 0), (39, 39), (17, 3), (3, 17), (38, 39)]:
        other = causal.clone()
        other[0, 0][position] = not other[0, 0][position]
        assert not check(other, 40, 40), position
    assert not check(causal.expand(2, 1, 40, 40).clone(), 40, 40)  # per-sample masks go in explicitly
    assert not check(causal[..., :30], 40, 30)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg, ParallelConfig(), VOCAB, patch_size=1)


def _loss_and_grads(model, seed=1):
    torch.manual_seed(seed)
    tokens, labels = torch.randint(0, VOCAB, (2, 32)), torch.randint(0, VOCAB, (2, 32))
    model.zero_grad()
    loss = model(tokens, None, None, labels=labels).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_every_backend_gives_the_same_model(megatron_process, gqa):
    """auto/flash/fused run SDPAttention, unfused/local megatron-core's module: the same parameters (so the same
    checkpoints), losses and gradients."""
    models = {}
    for backend in ("auto", "flash", "fused", "unfused", "local"):
        cfg = preset_model("tiny", max_position_embeddings=32, attention_backend=backend, **(GQA if gqa else {}))
        models[backend] = _model(cfg)
        expected = SDPAttention if backend in ("auto", "flash", "fused") else DotProductAttention
        assert all(type(layer.self_attention.core_attention) is expected for layer in models[backend].decoder.layers)
    reference = models.pop("unfused")
    ref_loss, ref_grads = _loss_and_grads(reference)
    for backend, model in models.items():
        state = model.state_dict()
        assert state.keys() == reference.state_dict().keys(), backend
        model.load_state_dict(reference.state_dict())
        loss, grads = _loss_and_grads(model)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=TOLERANCE, msg=backend)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=TOLERANCE, msg=f"{backend} {name}")


def test_attention_dropout_only_in_training_and_in_the_tensor_parallel_rng_fork(megatron_process):
    dropped, config = _core_attention(SDPAttention, 2, dropout=0.5)
    plain, _ = _core_attention(SDPAttention, 2, dropout=0.0)
    q, k, v = _qkv(config)
    mask = causal_attention_mask(q.size(0), "cpu")
    with torch.no_grad():
        reference = plain(q, k, v, mask)
        dropped.eval()
        torch.testing.assert_close(dropped(q, k, v, mask), reference, rtol=0, atol=0)
        dropped.train()
        outer = torch.get_rng_state()
        first, second = dropped(q, k, v, mask), dropped(q, k, v, mask)
        # The default generator did not move: the dropout drew from the tracker's model-parallel state.
        assert torch.equal(torch.get_rng_state(), outer)
    assert (first - reference).abs().max() > 0.1
    assert (first - second).abs().max() > 0.1  # the tracker's state advanced


# -- activation recompute -----------------------------------------------------------------------------------------
# name -> (settings, per layer of 4: how often core attention and the MLP run in one forward + backward)
RECOMPUTE = {
    "full_uniform_1": ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
                       [(2, 2)] * 4),
    "full_uniform_2": ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
                       [(2, 2)] * 4),
    "full_block_1": ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
                     [(2, 2)] + [(1, 1)] * 3),
    "selective_core_attn": ({"recompute_granularity": "selective"}, [(2, 1)] * 4),
    "selective_core_attn_mlp": ({"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]},
                                [(2, 2)] * 4),
}


def _count_calls(model):
    """[[core attention calls, MLP calls] per layer], counted from now on."""
    counts = [[0, 0] for _ in model.decoder.layers]
    for layer, count in zip(model.decoder.layers, counts):
        for i, module in enumerate((layer.self_attention.core_attention, layer.mlp)):
            module.register_forward_hook(lambda *_, c=count, i=i: c.__setitem__(i, c[i] + 1))
    return counts


@pytest.mark.parametrize("backend", ["auto", "unfused"])
@pytest.mark.parametrize("setting", sorted(RECOMPUTE))
def test_recompute_gives_the_losses_and_gradients_of_none(megatron_process, setting, backend):
    """With dropout on: recompute replays the RNG states (torch's and the tensor-parallel tracker's) of the forward
    pass, so the recomputed dropout masks are the same."""
    base = preset_model("tiny", num_layers=4, max_position_embeddings=32, attention_backend=backend,
                        hidden_dropout=0.1, attention_dropout=0.1, **GQA)
    settings, calls = RECOMPUTE[setting]
    runs = []
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = torch.get_rng_state(), copy.deepcopy(tracker.get_states())
    for cfg in (base, dataclasses.replace(base, **settings)):
        model = _model(cfg)
        if runs:
            model.load_state_dict(runs[0][2])
        torch.set_rng_state(states[0])
        tracker.set_states(copy.deepcopy(states[1]))
        counts = _count_calls(model)
        runs.append((*_loss_and_grads(model), model.state_dict()))
    assert [tuple(c) for c in counts] == calls  # what was recomputed
    (loss, grads, _), (loss_recomputed, grads_recomputed, _) = runs
    torch.testing.assert_close(loss_recomputed, loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_recomputed[name], grad, rtol=0, atol=1e-6, msg=name)


# -- configuration ------------------------------------------------------------------------------------------------
def _args(*flags):
    return ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
            "--patch-size", "4", "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3",
            "--lr-warmup-iters", "1",
            "--data-path", "/nonexistent/corpus", "--tokenizer-model", "/nonexistent/tok.model", *flags]


FULL = ["--recompute-granularity", "full", "--recompute-method"]


@pytest.mark.parametrize("world,flags,message", [
    pytest.param(1, ["--transformer-impl", "transformer_engine"],
                 "--transformer-impl transformer_engine needs the transformer_engine package", marks=WITHOUT_TE),
    (1, ["--num-query-groups", "2"], "--num-query-groups 2 needs --group-query-attention"),
    (1, ["--group-query-attention", "--num-query-groups", "3"],
     "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    (4, ["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"],
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (2, ["--group-query-attention", "--tensor-model-parallel-size", "2"],  # default: one group (multi-query)
     "--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2"),
    (1, ["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method uniform|block"),
    (1, [*FULL, "uniform"], "--recompute-granularity full needs --recompute-method uniform|block and "
     "--recompute-num-layers N"),
    (2, [*FULL, "block", "--recompute-num-layers", "3", "--pipeline-model-parallel-size", "2"],
     "--recompute-num-layers 3 must be between 1 and the 2 layers of each pipeline stage"),
    (2, [*FULL, "block", "--recompute-num-layers", "2", "--pipeline-model-parallel-size", "2",
         "--num-layers-per-virtual-pipeline-stage", "1"], "between 1 and the 1 layers of each pipeline stage"),
    (1, [*FULL, "uniform", "--recompute-num-layers", "3"],
     "--recompute-num-layers 3 must divide the 4 layers of each pipeline stage"),
    (1, [*FULL, "block", "--recompute-num-layers", "1", "--recompute-modules", "mlp"],
     "--recompute-modules is for --recompute-granularity selective"),
    (1, ["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     "--recompute-granularity selective takes no --recompute-method or --recompute-num-layers"),
    pytest.param(1, ["--recompute-granularity", "selective", "--recompute-modules", "layernorm"],
                 "--recompute-modules layernorm needs the transformer_engine package installed", marks=WITHOUT_TE),
    (1, ["--recompute-method", "block", "--recompute-num-layers", "1"],
     "--recompute-method, --recompute-num-layers needs --recompute-granularity"),
])
def test_inconsistent_settings_are_one_line_errors(world, flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        parse_args(_args(*flags)).resolve(world)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("world,flags", [
    (2, ["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "2"]),
    (2, [*FULL, "uniform", "--recompute-num-layers", "2", "--pipeline-model-parallel-size", "2"]),
    (1, [*FULL, "block", "--recompute-num-layers", "3"]),
    (1, ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"]),
    (1, ["--attention-backend", "unfused"]),
])
def test_consistent_settings_pass_the_model_checks(world, flags):
    """They get as far as the files (the tokenizer's, checked before the data's)."""
    with pytest.raises(ConfigError, match="--tokenizer-model: no such file: /nonexistent/tok.model"):
        parse_args(_args(*flags)).resolve(world)


def test_flags_fill_the_model_config_and_have_help():
    cfg = parse_args(_args("--attention-backend", "flash", "--group-query-attention", "--num-query-groups", "2",
                           "--recompute-granularity", "selective", "--recompute-modules", "mlp")).model
    assert (cfg.attention_backend, cfg.transformer_impl, cfg.query_groups) == ("flash", None, 2)
    assert (cfg.recompute_granularity, cfg.recompute_modules) == ("selective", ["mlp"])
    defaults = parse_args(_args()).model
    # Megatron-LM's default implementation: Transformer Engine when it imports (resolve() decides and says so).
    assert (defaults.attention_backend, defaults.transformer_impl, defaults.query_groups) == ("auto", None, 4)
    assert defaults.uses_sdpa and not dataclasses.replace(defaults, attention_backend="local").uses_sdpa
    text = " ".join(build_parser().format_help().split())
    for flag in ("--transformer-impl", "--attention-backend", "--group-query-attention", "--num-query-groups",
                 "--recompute-granularity", "--recompute-method", "--recompute-num-layers", "--recompute-modules"):
        assert flag in text
    assert "unfused/local = megatron-core's DotProductAttention" in text
