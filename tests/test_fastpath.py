"""The fast decode path: fused projections (same function, one copy of the weights), the int8 loader's
one-matrix-at-a-time quantization, the compile settings, the token check, and on a GPU the Triton
kernel and the compiled path against eager."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import kvlab.quant as quant
from kvlab.config import preset
from kvlab.fastpath import TUNING, FastDecoder, compile_options, teacher_forced_agreement
from kvlab.fused import FusedDecoderLayer, FusedLinear, fuse_model, is_fused
from kvlab.kernels import fused_linear, fused_linear_reference, pack_int8, triton_available, unpack_int8, uses_kernel
from kvlab.loaders import random_model
from kvlab.quant import Int8Linear

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")


@pytest.mark.parametrize("loader", ["inference", "int8", "trainable"])
def test_fusing_keeps_the_function_and_the_byte_count(loader: str) -> None:
    model, reference = random_model("tiny", loader), random_model("tiny", loader)
    before = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    fuse_model(model)
    assert is_fused(model) and all(isinstance(layer, FusedDecoderLayer) for layer in model.model.layers)
    assert sum(t.nbytes for t in [*model.parameters(), *model.buffers()]) == before
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)
    assert fuse_model(model) is model and isinstance(model.lm_head, FusedLinear)  # a second call changes nothing


def test_fusing_drops_the_separate_matrices() -> None:
    model = random_model("tiny", "inference")
    attn = model.model.layers[0].self_attn
    separate = [weakref.ref(attn.q_proj.weight), weakref.ref(attn.k_proj.weight),
                weakref.ref(model.model.layers[1].mlp.up_proj.weight)]
    fuse_model(model)
    gc.collect()
    assert all(ref() is None for ref in separate)


def test_fused_bf16_model_picks_the_eager_tokens() -> None:
    """bf16 changes rounding, not the function: teacher-forced, the fused model's greedy choice is the
    unfused model's at every position (on the CPU both run the PyTorch reference arithmetic)."""
    config = preset("tiny").replace(torch_dtype="bfloat16")
    model, reference = random_model(config, "inference"), random_model(config, "inference")
    prompt = torch.tensor([[5, 9, 2, 7]])
    tokens = FastDecoder(model, 40, compile=False).generate(prompt, 30).tokens
    check = teacher_forced_agreement(reference, tokens, prompt.shape[1])
    assert check["positions"] == 30 and check["argmax_equal"] == 30 and check["max_gap"] == 0.0


def test_teacher_forced_agreement_measures_a_wrong_token() -> None:
    model = random_model("tiny", "inference")
    prompt = torch.tensor([[3, 1, 4]])
    tokens = FastDecoder(model, 20, compile=False).generate(prompt, 10).tokens
    wrong = tokens.clone()
    with torch.no_grad():
        logits = model(wrong[:, :-1])[0, -1]
    wrong[0, -1] = logits.argmin()  # the worst choice at the last position
    check = teacher_forced_agreement(model, wrong, prompt.shape[1])
    assert check["argmax_equal"] == 9
    assert check["max_gap"] == pytest.approx((logits.max() - logits.min()).item(), rel=1e-5)
    assert check["max_gap_bf16_spacings"] > 1


def test_int8_loader_quantizes_one_matrix_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a matrix is quantized, the float copies of those quantized before it are already gone."""
    done: list[weakref.ref] = []
    original = quant.quantize_int8

    def watched(x: torch.Tensor, **kw: object):
        if x.is_meta:  # the int8 placeholders of the model skeleton
            return original(x, **kw)
        gc.collect()
        assert all(ref() is None for ref in done), "a float matrix outlived its int8 copy"
        out = original(x, **kw)
        done.append(weakref.ref(x))
        return out

    monkeypatch.setattr(quant, "quantize_int8", watched)
    model = random_model("tiny", "int8")
    assert len(done) == 7 * model.config.num_hidden_layers + 1
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight.dtype == torch.int8


def test_packed_int8_layout_offsets_each_byte_and_reads_the_row_in_quarters() -> None:
    q = torch.randint(-128, 128, (6, 16), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    words = pack_int8(q)
    assert words.dtype == torch.int32 and words.shape == (6, 4) and words.nbytes == q.nbytes
    lanes = words.view(torch.uint8).view(6, 4, 4).long()  # (row, word, byte)
    for i in range(4):  # byte i of word j is feature 4i + j (K/4 = 4), plus 128
        assert torch.equal(lanes[:, :, i], q[:, 4 * i:4 * i + 4].long() + 128)
    assert torch.equal(unpack_int8(words), q)
    x, scale = torch.randn(1, 1, 16), torch.rand(6) + 0.5
    assert torch.equal(fused_linear_reference(x, words, scale), fused_linear_reference(x, q, scale))
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_int8(q[:, :6])


def test_fused_int8_model_keeps_its_matrices_packed() -> None:
    model = fuse_model(random_model("tiny", "int8"))
    layer = model.model.layers[0]
    matrices = (layer.qkv, layer.o_proj, layer.gate_up, layer.down, model.lm_head)
    assert {m.weight.dtype for m in matrices} == {torch.int32}


def test_int8_linear_forward_is_the_dequantized_product() -> None:
    w = torch.randn(24, 40)
    layer = Int8Linear.from_float(w)
    x = torch.randn(3, 40)
    expected = torch.nn.functional.linear(x, layer.weight.float()) * layer.scale
    torch.testing.assert_close(layer(x), expected)


def test_reference_rounds_like_the_model_modules() -> None:
    """fused_linear_reference = RMSNorm then MLP of kvlab.model, bit for bit, in bf16."""
    model = random_model(preset("tiny").replace(torch_dtype="bfloat16"), "inference")
    layer = model.model.layers[0]
    x = torch.randn(1, 3, model.config.hidden_size).to(torch.bfloat16)
    mlp = layer.mlp
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    norm = layer.post_attention_layernorm
    with torch.no_grad():
        h = fused_linear_reference(x, gate_up, None, norm.weight, norm.eps, None, glu=True)
        out = fused_linear_reference(h, mlp.down_proj.weight, residual=x)
        assert torch.equal(out, x + mlp(norm(x)))


def test_compile_options_are_the_mode_plus_the_tuning() -> None:
    options = compile_options()
    assert options["triton.cudagraphs"] is True
    assert all(options[k] == v for k, v in TUNING.items()) and options["coordinate_descent_tuning"]
    assert compile_options("default", {}) == {}


def test_fused_int8_step_traces_as_one_graph() -> None:
    model, reference = random_model("tiny", "int8"), random_model("tiny", "int8")
    prompt = torch.tensor([[5, 6, 7]])
    torch._dynamo.reset()
    fast = FastDecoder(model, 32, compile=True, backend="eager")
    tokens = fast.generate(prompt, 16, warmup=2).tokens
    torch._dynamo.reset()
    assert teacher_forced_agreement(reference, tokens, 3)["argmax_equal"] == 16


def test_kernel_is_only_chosen_where_it_runs() -> None:
    x, w = torch.randn(1, 1, 8), torch.randn(4, 8)
    assert not uses_kernel(x, w)  # CPU
    if triton_available():
        assert uses_kernel(x.cuda(), w.cuda()) and not uses_kernel(torch.randn(1, 2, 8).cuda(), w.cuda())


def test_attention_kernel_is_a_switch_and_only_chosen_where_it_runs() -> None:
    from kvlab.decode_attention import kernel_applies
    from kvlab.fastpath import fast_cache

    config = preset("tiny")
    qkv = torch.randn(1, 1, (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim)
    with torch.no_grad():
        assert not kernel_applies(qkv, fast_cache(config, 1, 16))  # CPU, and not under torch.compile
    model = fuse_model(random_model("tiny", "inference"), attention_kernel=False)
    assert not any(layer.attention_kernel for layer in model.model.layers)
    assert all(layer.attention_kernel for layer in fuse_model(model).model.layers)  # fusing again sets it


# ----------------------------------------------------------------------------------------------- GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["bf16", "int8", "packed"])
@pytest.mark.parametrize("flags", ["plain", "norm+glu", "norm+residual"])
def test_triton_kernel_matches_the_reference(layout: str, flags: str) -> None:
    """Fresh random operands (odd sizes: masked edges); error vs float64 at bf16 level."""
    torch.manual_seed(hash(flags) % 1000)
    n, k = 1000, 1536 + 64
    glu, norm, residual = "glu" in flags, "norm" in flags, "residual" in flags
    w = (torch.randn(2 * n if glu else n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
    weight, scale = quant.quantize_int8(w) if layout != "bf16" else (w, None)
    stored = pack_int8(weight) if layout == "packed" else weight
    x = torch.randn(1, 1, k, device="cuda").to(torch.bfloat16)
    norm_weight = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16) if norm else None
    res = torch.randn(1, 1, n, device="cuda").to(torch.bfloat16) if residual else None
    assert uses_kernel(x, stored, scale)
    with torch.no_grad():
        out = fused_linear(x, stored, scale, norm_weight, 1e-5, res, glu)
        exact = fused_linear_reference(x.double(), weight.double(), None if scale is None else scale.double(),
                                       None if norm_weight is None else norm_weight.double(), 1e-5,
                                       None if res is None else res.double(), glu)
    assert out.shape == (1, 1, n) and torch.isfinite(out).all()
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("loader", ["inference", "int8"])
def test_compiled_fused_path_matches_eager_on_gpu(loader: str) -> None:
    config = preset("small").replace(torch_dtype="bfloat16")
    model = random_model(config, loader, device="cuda")
    reference = random_model(config, loader, device="cuda")
    prompt = torch.tensor([[11, 22, 33, 44, 55]], device="cuda")
    torch._dynamo.reset()
    fast = FastDecoder(model, 5 + 48)
    timing = fast.generate(prompt, 48, warmup=4)
    torch._dynamo.reset()
    check = teacher_forced_agreement(reference, timing.tokens, 5)
    assert check["argmax_equal"] >= 0.9 * check["positions"] and check["max_gap_bf16_spacings"] <= 16
    assert torch.equal(timing.tokens, fast.generate(prompt, 48).tokens)  # replays are deterministic


@gpu
@needs_cuda
@pytest.mark.parametrize("packed", [False, True])
def test_int8_kernel_reads_every_byte_value_exactly(packed: bool) -> None:
    """Every int8 value in every byte lane of a 4-byte word, plain and packed: one-hot inputs read single
    weights back, and the bit-pattern conversion must give each exactly (float32 activations, unit scales)."""
    values = torch.arange(-128, 128, dtype=torch.int8).repeat(4)  # value v sits in lane (v + 128) % 4
    weight = torch.stack([values.roll(3 * i) for i in range(8)]).cuda()  # rolls by 3 move v through all lanes
    scale = torch.ones(8, device="cuda")
    x = torch.zeros(1, 1, weight.shape[1], device="cuda")
    seen = torch.empty(weight.shape, device="cuda")
    stored = pack_int8(weight) if packed else weight
    with torch.no_grad():
        for j in range(weight.shape[1]):
            x.zero_()
            x[..., j] = 1.0
            seen[:, j] = fused_linear(x, stored, scale)[0, 0]
    assert torch.equal(seen, weight.float())


@gpu
@needs_cuda
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_kernel_matches_the_model(window: int | None) -> None:
    """One kernel (rotary, cache write, grouped attention) against the model's own path, two rows, bf16:
    the cache gets the same bytes and the output agrees to bf16 rounding; with a window, old slots drop out."""
    from kvlab.decode_attention import decode_attention
    from kvlab.fastpath import fast_cache
    from kvlab.model import MistralForCausalLM

    torch.manual_seed(0)
    config = preset("tiny").replace(sliding_window=window, torch_dtype="bfloat16")
    model = MistralForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    attn, rotary = model.model.layers[0].self_attn, model.model.rotary_emb
    b, t, slots = 2, 9, 16
    ours = fast_cache(config, b, slots, "cuda", torch.bfloat16, grouped=True)
    theirs = fast_cache(config, b, slots, "cuda", torch.bfloat16, grouped=True)
    x = torch.randn(b, t, config.hidden_size, device="cuda").to(torch.bfloat16)
    positions = torch.arange(t, device="cuda").expand(b, t)
    new = torch.randn(b, 1, config.hidden_size, device="cuda").to(torch.bfloat16)
    at = torch.full((b, 1), t, device="cuda")
    with torch.no_grad():
        for cache in (ours, theirs):
            attn(x, positions, rotary(positions, torch.bfloat16), cache)
        expected = attn(new, at, rotary(at, torch.bfloat16), theirs)
        qkv = torch.cat([attn.q_proj(new), attn.k_proj(new), attn.v_proj(new)], dim=-1)
        out = decode_attention(qkv, *rotary(at, torch.bfloat16), ours.keys[0], ours.values[0], at,
                               attn.num_heads, window or 0, attn.scale)
        got = attn.o_proj(out)
    assert torch.equal(ours.keys[0], theirs.keys[0]) and torch.equal(ours.values[0], theirs.values[0])
    assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2
