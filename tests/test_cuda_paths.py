"""dpokit's CUDA-only code, run on CPU against references with the real signatures.

Flash varlen packing: `dpokit.packing` calls `torch.nn.attention.varlen.varlen_attn` only on CUDA in bf16/fp16, so
CPU CI would never run its wiring (the gather into concatenated segments, `cu_seqlens`, the causal/scale/GQA keywords,
the scatter back). Here the device check is made to say "CUDA" and `varlen_attn` is replaced by a per-segment
`scaled_dot_product_attention` with the exact signature of each torch release (read from their sources):

- 2.9 (and 2.4-2.8): no torch.nn.attention.varlen at all;
- 2.10: (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None), no scale, no GQA;
- 2.11: (..., max_k, *, return_aux=None, scale=None, window_size=(-1, -1)), causal = window_size == (-1, 0);
- 2.13 (2.12 and 2.14 have the same): 2.11's plus enable_gqa=False, seqused_k, block_table, num_splits; fewer K/V
  heads without enable_gqa is a ValueError.

The stand-ins check what the kernel requires (int32 cumulative lengths from 0 to the token count, max lengths that
bound every segment, equal head counts unless GQA is asked for) and compute the same numbers, so the packed path
through them must give the padded path's values and gradients at float32 tolerances. Each variant's kernel choice is
announced in one line; a fall back to the sdpa buckets on "CUDA" without that line fails.
"""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from dpokit import packing
from dpokit.data.collate import collate_packed, collate_pairs
from dpokit.data.tokenize import TokenizedPair
from dpokit.logps import completion_logps
from dpokit.packing import PackedLayout, packed_attention_forward, packed_completion_logps

TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# varlen_attn stand-ins, one per torch signature


def segment_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, causal, scale, gqa):
    """What varlen_attn computes: attention inside each segment [cu[i], cu[i+1]) of the concatenated tokens."""
    assert query.dim() == key.dim() == value.dim() == 3 and key.shape == value.shape
    assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1, "the kernel needs contiguous head dims"
    for cu, total, most in ((cu_seq_q, query.shape[0], max_q), (cu_seq_k, key.shape[0], max_k)):
        assert cu.dtype == torch.int32 and cu.dim() == 1, "cumulative lengths are int32 [S+1]"
        assert int(cu[0]) == 0 and int(cu[-1]) == total, "cumulative lengths run from 0 to the token count"
        assert int((cu[1:] - cu[:-1]).min()) >= 0, "cumulative lengths never decrease"
        assert int((cu[1:] - cu[:-1]).max()) <= most, "max_q/max_k must bound every segment"
    if query.shape[1] != key.shape[1] and not gqa:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={query.shape[1]} "
                         f"and Hkv={key.shape[1]}. Try setting enable_gqa=True for GQA.")
    CALLS.append((tuple(query.shape), tuple(key.shape), causal, scale, gqa))
    out = []
    for (a, b), (c, d) in zip(zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()),
                              zip(cu_seq_k[:-1].tolist(), cu_seq_k[1:].tolist())):
        q, k, v = (t[i:j].transpose(0, 1) for t, i, j in ((query, a, b), (key, c, d), (value, c, d)))
        if b > a:
            out.append(F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                      enable_gqa=gqa).transpose(0, 1))
    return torch.cat(out) if out else query.new_zeros(query.shape)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert return_aux is None
    return segment_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal, scale=None,
                             gqa=False)


def _window(window_size):
    if window_size not in ((-1, -1), (-1, 0)):
        raise NotImplementedError(f"sliding window {window_size}")
    return window_size == (-1, 0)  # torch compares to a tuple: a list [-1, 0] would be full attention


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    assert return_aux is None
    return segment_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=_window(window_size),
                             scale=scale, gqa=False)


def varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert return_aux is None and seqused_k is None and block_table is None and num_splits is None
    return segment_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=_window(window_size),
                             scale=scale, gqa=enable_gqa)


VARIANTS = {"2.10.0": varlen_2_10, "2.11.0": varlen_2_11, "2.13.0": varlen_2_13}
CALLS: list = []


@pytest.fixture
def cuda_torch(monkeypatch):
    """`use(version)`: from now on the packed path sees a CUDA device that runs Flash and torch `version`'s
    varlen_attn (a stand-in; None for a torch without one). Returns the [dpokit] lines printed so far via `lines()`."""
    logged = []

    class Env:
        @staticmethod
        def use(version, device=(True, None)):
            monkeypatch.setattr(packing, "KERNELS", {})
            monkeypatch.setattr(packing, "flash_device", lambda query: device)
            monkeypatch.setattr(packing, "torch_varlen", lambda: (version, VARIANTS.get(version)))
            CALLS.clear()

        @staticmethod
        def lines():
            return [m for m in logged if m.startswith("packed attention")]

    monkeypatch.setattr(packing, "log", logged.append)
    return Env


# --------------------------------------------------------------------------------------------------------------------
# The attention function on a hand-built layout: segments of lengths 1..N and an empty tail


def dense_reference(q, k, v, lengths, scale):
    """Each segment alone through sdpa in [1, H, L, D]: the padded path's attention, segment by segment."""
    out, start = [], 0
    for n in lengths:
        if n:
            seg = [t[:, :, start:start + n] for t in (q, k, v)]
            out.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale,
                                                      enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)[0])
        start += n
    return torch.cat(out)[None]


class Attn(torch.nn.Module):
    pass


@pytest.mark.parametrize("version", sorted(VARIANTS))
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_flash_wiring_equals_per_segment_attention(cuda_torch, version, kv_heads):
    torch.manual_seed(0)
    lengths = [1, 2, 3, 4, 5, 6, 7, 0]  # every length up to the widest, and an empty tail segment
    layout, n = PackedLayout.of_segments(lengths), sum(lengths)
    scale = 8 ** -0.5 if version == "2.10.0" else 0.3  # 2.10 takes no scale; elsewhere one the kernel must be given
    q = torch.randn(1, 4, n, 8, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, n, 8, requires_grad=True) for _ in range(2))
    cotangent = torch.randn(1, n, 4, 8)
    want = dense_reference(q, k, v, lengths, scale)
    want.backward(cotangent)
    want_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    cuda_torch.use(version)
    got, _ = packed_attention_forward(Attn().eval(), q, k, v, None, scaling=scale,
                                      **{packing.LAYOUT_KWARG: layout})
    assert len(CALLS) == 1, "the Flash path must have been taken"
    torch.testing.assert_close(got, want, **TOL)
    got.backward(cotangent)
    for name, t, g in zip("qkv", (q, k, v), want_grads):
        # atol 1e-5: a 1-token segment's query gradient is 0 in one computation and ~1e-7 in the other
        torch.testing.assert_close(t.grad, g, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


# --------------------------------------------------------------------------------------------------------------------
# Through the model: packed (and shared-prompt) log-probs and gradients equal the padded path's


def make_pairs(n=6, vocab=128, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = 0 if i == 1 else int(rng.integers(1, 13))  # one empty prompt
        ids = [rng.integers(3, vocab, k).astype(np.int32) for k in (p, rng.integers(1, 10), rng.integers(1, 10))]
        out.append(TokenizedPair(ids[0], ids[1], ids[2], row=i))
    return out


def logps_and_grads(model, fn):
    model.zero_grad()
    result = fn()
    (result.logps * torch.linspace(0.5, 1.5, result.logps.shape[0])).sum().backward()
    return result.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("version", sorted(VARIANTS))
@pytest.mark.parametrize("shared", [False, True], ids=["packed", "shared-prompt"])
def test_flash_packed_logps_and_grads_equal_padded(cuda_torch, version, shared):
    model = tiny_llama()  # 4 query heads, 2 K/V heads: GQA
    pairs = make_pairs()
    padded = collate_pairs(pairs, 0)
    want, want_grads = logps_and_grads(model, lambda: completion_logps(
        model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"]))
    cuda_torch.use(version)
    got, got_grads = logps_and_grads(model, lambda: packed_completion_logps(
        model, collate_packed(pairs, shared_prompt=shared)))
    assert len(CALLS) == model.config.num_hidden_layers, "every layer ran the Flash path"
    torch.testing.assert_close(got, want, **TOL)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **GRAD_TOL, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# The kernel chosen per torch signature, and its one info line


def run_packed(model):
    with torch.no_grad():
        return packed_completion_logps(model, collate_packed(make_pairs(3), shared_prompt=True)).logps


SCALE = 8 ** -0.5  # tiny_llama's head_dim is 8


@pytest.mark.parametrize("version, kernel, passed", [
    ("2.13.0", "Flash varlen_attn (window_size=(-1, 0), enable_gqa)", (True, SCALE, True)),
    ("2.11.0", "Flash varlen_attn (window_size=(-1, 0), K/V heads repeated 2x: this torch's varlen_attn has no "
               "enable_gqa)", (True, SCALE, False)),
    ("2.10.0", "Flash varlen_attn (is_causal=True, K/V heads repeated 2x: this torch's varlen_attn has no "
               "enable_gqa)", (True, None, False)),
    ("2.9.0", "sdpa buckets, not Flash varlen: torch 2.9.0 has no torch.nn.attention.varlen (it came with torch "
              "2.10)", None),
])
def test_kernel_chosen_per_torch_signature_and_announced_once(cuda_torch, version, kernel, passed):
    """(causal, scale, enable_gqa) as the stand-in received them; 2 query heads per K/V head."""
    model = tiny_llama()
    want = run_packed(model)
    cuda_torch.use(version)
    for _ in range(3):  # policy, reference, next step: one line for them all
        torch.testing.assert_close(run_packed(model), want, **TOL)
    assert cuda_torch.lines() == [f"packed attention, torch {version}, cpu float32: {kernel}"]
    if passed is None:
        assert CALLS == []
        return
    assert {c[2:] for c in CALLS} == {passed}
    kv_heads = 2 if passed[2] else 4  # without enable_gqa the kernel gets K/V repeated to the query heads
    assert {(q[1], k[1]) for q, k, *_ in CALLS} == {(4, kv_heads)}


@pytest.mark.parametrize("case, reason", [
    ("float32", "float32 queries (Flash needs bf16 or fp16: set bf16 or fp16)"),
    ("old GPU", "GPU compute capability 7.5 (Flash needs 8.0 or newer)"),
    ("head_dim", "head_dim 6 (Flash needs a multiple of 8, at most 256)"),
    ("scale", "this torch's varlen_attn takes no scale and the model's attention scale 0.1 is not 1/sqrt(head_dim)"),
])
def test_fallback_to_sdpa_buckets_on_cuda_is_announced(cuda_torch, case, reason):
    """Every reason Flash cannot run on CUDA falls back to the sdpa buckets (same numbers) with the info line."""
    model = tiny_llama(hidden_size=24, head_dim=6) if case == "head_dim" else tiny_llama()
    version = "2.10.0" if case == "scale" else "2.13.0"
    if case == "scale":
        for layer in model.model.layers:
            layer.self_attn.scaling = 0.1
    want = run_packed(model)
    device = {"float32": (True, reason), "old GPU": (True, reason)}.get(case, (True, None))
    cuda_torch.use(version, device)
    torch.testing.assert_close(run_packed(model), want, **TOL)
    assert CALLS == []
    assert cuda_torch.lines() == [f"packed attention, torch {version}, cpu float32: sdpa buckets, not Flash "
                                  f"varlen: {reason}"]


def test_off_cuda_the_buckets_run_silently(cuda_torch):
    model = tiny_llama()
    cuda_torch.use("2.13.0", (False, "cpu device"))
    run_packed(model)
    assert CALLS == [] and cuda_torch.lines() == []


def test_flash_device_on_this_machine():
    """The real device check: a CPU tensor is not CUDA (so CI never announces a kernel)."""
    assert packing.flash_device(torch.zeros(1, 1, 1, 8)) == (False, "cpu device")


def test_installed_torch_signature_is_understood():
    """The torch installed here is read like the stand-ins: its varlen_attn, if any, has a causal form dpokit knows."""
    version, fn = packing.torch_varlen()
    if fn is None:
        assert tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < (2, 10)
        return
    kernel = packing.FlashVarlen.of(fn)
    assert kernel is not None and kernel.refusal(64, 0.125) is None
    params = __import__("inspect").signature(fn).parameters
    assert kernel.gqa == ("enable_gqa" in params) and kernel.scale == ("scale" in params)


@pytest.mark.parametrize("version, causal, scale, gqa", [("2.10.0", "is_causal", False, False),
                                                          ("2.11.0", "window_size", True, False),
                                                          ("2.13.0", "window_size", True, True)])
def test_signature_reading(version, causal, scale, gqa):
    kernel = packing.FlashVarlen.of(VARIANTS[version])
    assert (kernel.causal, kernel.scale, kernel.gqa) == (causal, scale, gqa)
    assert packing.FlashVarlen.of(lambda q, k, v, cu_q, cu_k, max_q, max_k: q) is None


def test_flash_path_inside_compiled_layers(cuda_torch, monkeypatch):
    """torch_compile compiles each decoder layer, the packed attention function included: the kernel is still
    chosen and announced once (not once per layer or per recompile) and gives the eager numbers, forward and
    backward (aot_eager: torch.compile's graph capture and autograd without a C++ toolchain)."""
    import types

    from dpokit.models import compile_layers

    model = tiny_llama()
    pairs = make_pairs()
    want = [logps_and_grads(model, lambda: packed_completion_logps(model, collate_packed(pairs[:n]))) for n in (6, 5)]
    cuda_torch.use("2.13.0")
    # torch's varlen_attn is a custom op, opaque to the compiler: so is the stand-in
    monkeypatch.setattr(packing, "torch_varlen", lambda: ("2.13.0", torch.compiler.disable(varlen_2_13)))
    compile_layers(model, types.SimpleNamespace(torch_compile_backend="aot_eager", torch_compile_mode=None))
    for n, (logps, grads) in zip((6, 5), want):  # a batch of another length: a recompile must not choose again
        got, got_grads = logps_and_grads(model, lambda: packed_completion_logps(model, collate_packed(pairs[:n])))
        torch.testing.assert_close(got, logps, **TOL)
        for name in grads:
            torch.testing.assert_close(got_grads[name], grads[name], **GRAD_TOL, msg=name)
    assert len(CALLS) == 2 * model.config.num_hidden_layers, "the compiled layers ran the Flash path"
    assert cuda_torch.lines() == ["packed attention, torch 2.13.0, cpu float32: Flash varlen_attn "
                                  "(window_size=(-1, 0), enable_gqa)"]


# --------------------------------------------------------------------------------------------------------------------
# Fused AdamW: probed where it would run, announced, never an explicit foreach-off


def optimizer_for(optim_name, monkeypatch, device_types=("cpu",)):
    """make_optimizer with this CPU standing in for a device where dpokit runs the fused kernel."""
    import types

    from dpokit import optim

    logged = []
    monkeypatch.setattr(optim, "FUSED_DEVICES", device_types)
    monkeypatch.setattr(optim, "log", logged.append)
    cfg = types.SimpleNamespace(optim=optim_name, weight_decay=0.0, learning_rate=1e-3, adam_beta1=0.9,
                                adam_beta2=0.999, adam_epsilon=1e-8, warmup_steps=0, warmup_ratio=0.0,
                                lr_scheduler_type="linear", lr_scheduler_kwargs=None)
    engine = types.SimpleNamespace(param_groups=lambda groups: groups)
    optimizer, _ = optim.make_optimizer(tiny_llama(), cfg, engine, torch.device("cpu"), 10)
    return optimizer, logged


def test_fused_adamw_where_torch_has_it(monkeypatch):
    optimizer, logged = optimizer_for("adamw_torch_fused", monkeypatch)
    assert all(g["fused"] is True for g in optimizer.param_groups)
    assert logged == [f"optimizer, torch {torch.__version__}, cpu: fused AdamW"]


def test_fused_adamw_refused_by_torch_falls_back_with_the_reason(monkeypatch):
    real = torch.optim.AdamW

    def no_fused(params, *args, fused=None, **kwargs):  # a torch whose fused AdamW does not run on this device
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices: ['cuda'] but torch.float32 and cpu")
        return real(params, *args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    optimizer, logged = optimizer_for("adamw_torch_fused", monkeypatch)
    assert all(g["fused"] is None for g in optimizer.param_groups)  # torch's own default (foreach on CUDA)
    assert logged == [f"optimizer, torch {torch.__version__}, cpu: AdamW (foreach), not fused: float32 parameters "
                      "on cpu: `fused=True` requires all the params to be floating point Tensors of supported "
                      "devices: ['cuda'] but torch.float32 and cpu"]


@pytest.mark.parametrize("optim_name, device_types", [("adamw_torch", ("cpu",)), ("adamw_torch_fused", ("cuda",))])
def test_unfused_adamw_leaves_torch_its_default(monkeypatch, optim_name, device_types):
    """Not fused: fused=None (torch's default: foreach on CUDA), never fused=False, which also turns foreach off."""
    optimizer, logged = optimizer_for(optim_name, monkeypatch, device_types)
    assert all(g["fused"] is None and g["foreach"] is None for g in optimizer.param_groups)
    assert logged == []


# --------------------------------------------------------------------------------------------------------------------
# QLoRA: refused off CUDA before any model loads; the loading and preparation it does on a GPU, with fakes


QLORA = {"load_in_4bit": True, "use_peft": True}


@pytest.fixture
def gpu_with_bitsandbytes(monkeypatch):
    """A config check that sees a CUDA GPU and bitsandbytes (QLoRA's environment), on this CPU machine."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))


@pytest.mark.parametrize("settings, message", [
    ({"load_in_4bit": True},
     r"^load_in_4bit \(QLoRA\) trains LoRA adapters on the quantized model: set use_peft=true$"),
    (QLORA, r"^load_in_4bit \(QLoRA\) needs a CUDA GPU \(bitsandbytes' 4-bit kernels\); none is available here$"),
    ({**QLORA, "use_cpu": True}, r"needs a CUDA GPU .*; use_cpu is set$"),
    ({"bnb_4bit_quant_type": "int4"}, r"bnb_4bit_quant_type: 'int4' is not one of nf4, fp4"),
    ({"model_init_kwargs": {"quantization_config": {"load_in_4bit": True}}},
     r"model_init_kwargs.quantization_config: set load_in_4bit \(with bnb_4bit_quant_type, .*\) instead"),
    ({"load_in_8bit": True}, r"load_in_8bit: True is not supported: quantized 8-bit .* load_in_4bit \(QLoRA\) is"),
])
def test_qlora_settings_refused_before_any_model_loads(settings, message):
    from dpokit.config import DPOConfig, build_config
    from dpokit.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_config(DPOConfig, overrides=settings)


def test_qlora_needs_bitsandbytes(gpu_with_bitsandbytes, monkeypatch):
    import importlib.util

    from dpokit.config import DPOConfig
    from dpokit.errors import ConfigError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package \(pip install bitsandbytes\)"):
        DPOConfig(**QLORA)


def test_qlora_quantization_config_is_trls(gpu_with_bitsandbytes):
    """The BitsAndBytesConfig dpokit builds from TRL's ModelConfig keys is the one TRL builds from them."""
    trl = pytest.importorskip("trl")
    from trl.trainer.utils import get_quantization_config

    from dpokit.config import DPOConfig, build_config
    from dpokit.models import quantization_config

    keys = {"load_in_4bit": True, "dtype": "bfloat16", "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": True,
            "bnb_4bit_quant_storage": "bfloat16"}
    ours = quantization_config(build_config(DPOConfig, overrides={**keys, "use_peft": True}))
    theirs = get_quantization_config(trl.ModelConfig(**keys))
    assert ours.to_dict() == theirs.to_dict()
    assert quantization_config(DPOConfig()) is None


def test_qlora_loads_quantized_on_this_process_gpu(gpu_with_bitsandbytes, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    from dpokit.config import DPOConfig
    from dpokit.models import load_model

    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kwargs: seen.update(kwargs) or tiny_llama())
    load_model(str(tmp_path), DPOConfig(**QLORA, dtype="bfloat16"))
    q = seen["quantization_config"]
    assert (q.load_in_4bit, q.bnb_4bit_compute_dtype, q.bnb_4bit_quant_type) == (True, torch.bfloat16, "nf4")
    assert seen["device_map"] == {"": 0} and seen["dtype"] == torch.bfloat16
    seen.clear()
    load_model(str(tmp_path), DPOConfig(use_peft=True))
    assert "quantization_config" not in seen and "device_map" not in seen


def test_qlora_prepares_the_quantized_model_for_adapters():
    """peft's k-bit preparation before the adapters: the base frozen, its unquantized weights float32, only LoRA
    weights train (a bf16 model marked quantized stands in for a 4-bit one; its Params4bit would stay as they are)."""
    import types

    from dpokit.models import apply_lora

    model = tiny_llama().to(torch.bfloat16)
    model.is_loaded_in_4bit = True
    cfg = types.SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None,
                                lora_modules_to_save=None, use_rslora=False, use_dora=False)
    peft_model = apply_lora(model, cfg)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in peft_model.parameters()} == {torch.float32}


def test_a_quantized_model_object_needs_use_peft():
    from dpokit.config import DPOConfig
    from dpokit.errors import ConfigError
    from dpokit.models import load_model

    model = tiny_llama()
    model.is_loaded_in_4bit = True
    with pytest.raises(ConfigError, match=r"^the model is quantized \(bitsandbytes\), so only LoRA adapters can "
                                          r"train: set use_peft=true"):
        load_model(model, DPOConfig())
    assert load_model(model, DPOConfig(use_peft=True)) is model
    assert load_model(model, DPOConfig(), what="ref_model") is model  # a reference is not trained


def test_qlora_refused_under_sharding_engines():
    import types

    from dpokit.engines import DeepSpeedEngine, FSDPEngine
    from dpokit.errors import ConfigError

    cfg = types.SimpleNamespace(load_in_4bit=True, on_nonfinite="stop")
    for engine, name in ((FSDPEngine, "FSDP"), (DeepSpeedEngine, "DeepSpeed")):
        with pytest.raises(ConfigError, match=f"load_in_4bit \\(QLoRA\\) is not supported under {name}; run it on "
                                              "one GPU or with DDP"):
            engine(types.SimpleNamespace(mixed_precision="no")).check(cfg)  # an engine reads its run's precision


def test_trls_quantization_config_argument_names_the_fields(tmp_path):
    """TRL's scripts pass DPOTrainer(quantization_config=get_quantization_config(model_args)): None passes, a
    BitsAndBytesConfig is refused with the settings that ask for it here."""
    from transformers import BitsAndBytesConfig

    from dpokit import DPOConfig, DPOTrainer
    from dpokit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^DPOTrainer: quantization_config is not supported: in the config: set "
                                          r"load_in_4bit \(with bnb_4bit_quant_type"):
        DPOTrainer(tiny_llama(), args=DPOConfig(output_dir=str(tmp_path)), train_dataset=[],
                   quantization_config=BitsAndBytesConfig(load_in_4bit=True))
