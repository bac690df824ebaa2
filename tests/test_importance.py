"""Tests for eos_kernels.text_to_visual_importance (Triton kernel and reference).

Without a GPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py);
cases are tiny because the interpreter costs ~ms per loop iteration. Layouts
are written as strings, one character per position:
    s  system / other token (neither text nor visual)
    v  visual token
    t  text token (a query row)
    x  both visual and text
    p  padding (attention_mask 0); marked as text AND visual, so the test fails
       unless padding really is excluded from rows and keys.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import eos_kernels
from eos_kernels import importance as imp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances, Triton vs reference. Both paths take the SAME inputs (already
# rounded to the dtype) and compute in fp32: a 16-bit product is exact in fp32
# and both accumulate in fp32, so the dtype changes nothing in the error
# budget. What differs is the order of the dh-term dot-product sums (~dh ulp of
# |q||k| in a logit), exp2 with log2(e) folded into the scale vs exp (~|s| ulp
# relative in a probability) and the online rescaling of the row sum: a few
# 1e-7 relative (measured over every scenario, 3 seeds, each dtype: <= 1.3e-6
# relative, <= 6e-8 absolute). rtol 1e-5 leaves an ~8x margin; atol 1e-7 only
# matters for probabilities far below the typical 1/L ~ 3e-2.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.float16: dict(rtol=1e-5, atol=1e-7),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-7),
    torch.float64: dict(rtol=1e-5, atol=1e-7),  # computed in fp32 by both paths
}


def masks_from_layouts(layouts, device=DEVICE):
    """(visual, text, attention_mask) bool/long [B, L] from layout strings."""
    L = len(layouts[0])
    assert all(len(s) == L for s in layouts)
    visual = torch.tensor([[c in "vxp" for c in s] for s in layouts], device=device)
    text = torch.tensor([[c in "txp" for c in s] for s in layouts], device=device)
    amask = torch.tensor([[int(c != "p") for c in s] for s in layouts], device=device)
    return visual, text, amask


def random_qk(B, Hq, Hkv, L, dh, dtype, seed, noncontig=False, device=DEVICE):
    """Query/key rounded to ``dtype``; with ``noncontig`` as transposed views."""
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        q = torch.randn(B, L, Hq, dh, generator=g).transpose(1, 2)   # [B, Hq, L, dh] view
        k = torch.randn(B, Hkv, dh, L, generator=g).transpose(2, 3)  # [B, Hkv, L, dh] view
    else:
        q = torch.randn(B, Hq, L, dh, generator=g)
        k = torch.randn(B, Hkv, L, dh, generator=g)
    q, k = (1.5 * q).to(device=device, dtype=dtype), (1.5 * k).to(device=device, dtype=dtype)
    if noncontig:
        assert not q.is_contiguous() and not k.is_contiguous()
    return q, k


SCENARIOS = {
    # text before and after one image, L not a power of two, B = 2
    "spans": dict(layouts=["ss" + "v" * 20 + "t" * 9 + "s", "sttt" + "v" * 20 + "t" * 8],
                  Hq=2, Hkv=2, dh=16),
    "gqa_4_2": dict(layouts=["tt" + "v" * 18 + "ttttt", "t" * 4 + "v" * 18 + "ttt"],
                    Hq=4, Hkv=2, dh=24),
    "mqa_4_1": dict(layouts=["s" + "v" * 15 + "t" * 9, "tt" + "v" * 15 + "t" * 8],
                    Hq=4, Hkv=1, dh=16),
    "left_pad": dict(layouts=["ppppp" + "s" + "v" * 14 + "t" * 6, "s" + "v" * 14 + "t" * 11],
                     Hq=2, Hkv=1, dh=16),
    "right_pad": dict(layouts=["ts" + "v" * 14 + "t" * 4 + "ppp",
                               "s" + "v" * 14 + "t" * 8,
                               "t" + "v" * 14 + "tt" + "p" * 6],
                      Hq=2, Hkv=2, dh=16),
    # text rows interleaved with visual tokens; visual tokens not contiguous
    "interleaved": dict(layouts=["svtvvtvsvvttvvvtvtsvvtvt", "tvvvsvtvvtsvtvvvtvvtttvv"],
                        Hq=2, Hkv=1, dh=16),
    # two images with text between and after, a token that is both, padding
    "two_images": dict(layouts=["pp" + "t" + "v" * 8 + "tts" + "v" * 8 + "xtt",
                                "t" + "v" * 8 + "tts" + "v" * 8 + "tttpp"],
                       Hq=4, Hkv=2, dh=8, scale=0.7),
    # transposed (non-contiguous) query and key views
    "noncontig": dict(layouts=["ss" + "v" * 16 + "t" * 7, "t" + "v" * 16 + "t" * 8],
                      Hq=4, Hkv=2, dh=16, noncontig=True),
    # every visual key comes after every text row: all invisible -> zeros
    "text_first": dict(layouts=["ttttss" + "v" * 10, "tt" + "v" * 14], Hq=2, Hkv=1, dh=16),
}


def build(name, dtype, seed=0):
    sc = SCENARIOS[name]
    visual, text, amask = masks_from_layouts(sc["layouts"])
    B, L = visual.shape
    q, k = random_qk(B, sc["Hq"], sc["Hkv"], L, sc["dh"], dtype, seed, sc.get("noncontig", False))
    return q, k, visual, text, amask, sc.get("scale")


def hand_importance(q, k, visual, text, amask, scale=None):
    """Independent float64 loop straight from the definition (no torch maths)."""
    B, Hq, L, dh = q.shape
    group = Hq // k.shape[1]
    scale = dh ** -0.5 if scale is None else scale
    ql, kl = q.double().tolist(), k.double().tolist()
    vis, txt, keep = visual.tolist(), text.tolist(), [[bool(x) for x in r] for r in amask.tolist()]
    out = [[0.0] * L for _ in range(B)]
    for b in range(B):
        rows = [t for t in range(L) if txt[b][t] and keep[b][t]]
        for h in range(Hq):
            for t in rows:
                keys = [j for j in range(t + 1) if keep[b][j]]
                logit = {j: scale * sum(a * c for a, c in zip(ql[b][h][t], kl[b][h // group][j]))
                         for j in keys}
                top = max(logit.values())
                z = sum(math.exp(v - top) for v in logit.values())
                for j in keys:
                    if vis[b][j]:
                        out[b][j] += math.exp(logit[j] - top) / z
        for j in range(L):
            out[b][j] /= Hq * len(rows)
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------- reference


@pytest.mark.parametrize("name", ["spans", "mqa_4_1", "left_pad", "interleaved", "two_images"])
def test_reference_matches_hand_loop(name):
    q, k, visual, text, amask, scale = build(name, torch.float32, seed=1)
    got = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, scale=scale,
                                                impl="torch")
    want = hand_importance(q.cpu(), k.cpu(), visual.cpu(), text.cpu(), amask.cpu(), scale)
    assert got.dtype == torch.float32 and got.shape == visual.shape
    assert want.abs().sum() > 0.1  # the case really rates something
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=1e-8)


# ------------------------------------------------------------ kernel vs ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_triton_matches_reference(name, dtype):
    q, k, visual, text, amask, scale = build(name, dtype)
    ref = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, scale=scale,
                                                impl="torch")
    tri = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, scale=scale,
                                                impl="triton")
    assert tri.dtype == torch.float32 and tri.shape == visual.shape
    torch.testing.assert_close(tri, ref, **TOLERANCES[dtype])
    # zero exactly where there is no visual, non-padded token
    assert torch.all(tri[~(visual & (amask != 0))] == 0)
    if name == "text_first":
        assert torch.all(ref == 0) and torch.all(tri == 0)
    else:
        assert ref.sum() > 0.05


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_multiple_row_and_key_blocks(block_m, block_n, dtype):
    """T > block_m and L > 2 * block_n: several row blocks, several key blocks."""
    layouts = ["pp" + "t" * 3 + "v" * 30 + "t" * 18 + "s",
               "t" + "v" * 12 + "ts" + "v" * 16 + "t" * 20 + "pp" + "s"]
    visual, text, amask = masks_from_layouts(layouts)
    B, L = visual.shape
    q, k = random_qk(B, 2, 1, L, 16, dtype, seed=3)
    prep = imp._prepare(q, k, visual, text, amask, None, "triton")
    tri = imp._run_triton(prep, block_m=block_m, block_n=block_n)
    ref = imp._run_reference(prep)
    torch.testing.assert_close(tri, ref, **TOLERANCES[dtype])
    assert ref.sum() > 0.1


def test_float64_inputs_are_computed_in_float32():
    q, k, visual, text, amask, scale = build("gqa_4_2", torch.float64)
    ref = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, impl="torch")
    tri = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, impl="triton")
    torch.testing.assert_close(tri, ref, **TOLERANCES[torch.float64])
    want = hand_importance(q.cpu(), k.cpu(), visual.cpu(), text.cpu(), amask.cpu())
    torch.testing.assert_close(ref.cpu().double(), want, rtol=2e-5, atol=1e-8)


# ------------------------------------------------------------ properties


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_probabilities_sum_to_one_when_every_token_is_visual(impl):
    """Every position visual and text: each row's softmax sums to 1, so does the mean."""
    visual, text, amask = masks_from_layouts(["x" * 21, "pp" + "x" * 19, "x" * 18 + "ppp"])
    q, k = random_qk(3, 2, 2, 21, 16, torch.float32, seed=4)
    out = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, impl=impl)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(3, device=DEVICE), rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_padding_on_either_side_does_not_change_the_result(impl):
    content = "st" + "v" * 10 + "sv" + "t" * 6
    L0, left, right = len(content), 4, 3
    q0, k0 = random_qk(1, 2, 1, L0, 16, torch.float32, seed=5)
    v0, t0, a0 = masks_from_layouts([content])
    base = eos_kernels.text_to_visual_importance(q0, k0, v0, t0, a0, impl=impl)
    # pad with random (large) garbage states; pads are flagged text and visual
    q_pad, k_pad = random_qk(1, 2, 1, left + L0 + right, 16, torch.float32, seed=6)
    q_pad, k_pad = 10 * q_pad, 10 * k_pad
    q_pad[:, :, left:left + L0] = q0
    k_pad[:, :, left:left + L0] = k0
    v, t, a = masks_from_layouts(["p" * left + content + "p" * right])
    out = eos_kernels.text_to_visual_importance(q_pad, k_pad, v, t, a, impl=impl)
    torch.testing.assert_close(out[:, left:left + L0], base, rtol=1e-5, atol=1e-7)
    assert torch.all(out[:, :left] == 0) and torch.all(out[:, left + L0:] == 0)
    assert base.sum() > 0.1


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_grouped_query_attention_equals_repeated_keys(impl):
    visual, text, amask = masks_from_layouts(["t" + "v" * 14 + "t" * 6, "pt" + "v" * 13 + "t" * 6])
    q, k = random_qk(2, 4, 2, 21, 16, torch.float32, seed=7)
    gqa = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, impl=impl)
    full = eos_kernels.text_to_visual_importance(q, k.repeat_interleave(2, dim=1), visual, text,
                                                 amask, impl=impl)
    torch.testing.assert_close(gqa, full, rtol=1e-6, atol=1e-8)
    # and the head mapping matters: pairing heads the other way gives another answer
    swapped = eos_kernels.text_to_visual_importance(q, k.repeat(1, 2, 1, 1), visual, text,
                                                    amask, impl=impl)
    assert not torch.allclose(gqa, swapped, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_boolean_and_integer_attention_masks_agree_and_none_means_no_padding(impl):
    visual, text, amask = masks_from_layouts(["pt" + "v" * 12 + "ttt", "t" + "v" * 12 + "tttt"])
    q, k = random_qk(2, 2, 1, 17, 16, torch.float32, seed=8)
    as_long = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, impl=impl)
    as_bool = eos_kernels.text_to_visual_importance(q, k, visual, text, amask.bool(), impl=impl)
    torch.testing.assert_close(as_long, as_bool, rtol=0, atol=0)
    ones = torch.ones_like(amask)
    assert torch.equal(eos_kernels.text_to_visual_importance(q, k, visual, text, None, impl=impl),
                       eos_kernels.text_to_visual_importance(q, k, visual, text, ones, impl=impl))


def test_scale_default_and_explicit_agree():
    q, k, visual, text, amask, _ = build("spans", torch.float32)
    default = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, impl="torch")
    explicit = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, scale=0.25,
                                                     impl="torch")  # dh = 16
    other = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, scale=0.5,
                                                  impl="torch")
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, other)


def test_auto_uses_the_reference_on_cpu_and_result_has_no_grad():
    q, k, visual, text, amask, _ = build("gqa_4_2", torch.float32)
    q = q.cpu().requires_grad_()
    args = (k.cpu(), visual.cpu(), text.cpu(), amask.cpu())
    auto = eos_kernels.text_to_visual_importance(q, *args)
    assert not auto.requires_grad
    assert torch.equal(auto, eos_kernels.text_to_visual_importance(q, *args, impl="torch"))


def test_non_contiguous_masks():
    layouts = ["tp" + "v" * 12 + "tts", "t" + "v" * 12 + "tttt"]
    visual, text, amask = masks_from_layouts(layouts)
    nc = [torch.stack([m, m], dim=-1)[..., 0] for m in (visual, text, amask)]
    assert not any(m.is_contiguous() for m in nc)
    q, k = random_qk(2, 2, 2, 17, 16, torch.float32, seed=9)
    want = eos_kernels.text_to_visual_importance(q, k, visual, text, amask, impl="torch")
    for impl in ("torch", "triton"):
        got = eos_kernels.text_to_visual_importance(q, k, *nc, impl=impl)
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_empty_batch(impl):
    q = torch.zeros(0, 2, 9, 16, device=DEVICE)
    m = torch.zeros(0, 9, dtype=torch.bool, device=DEVICE)
    out = eos_kernels.text_to_visual_importance(q, q, m, m, impl=impl)
    assert out.shape == (0, 9) and out.dtype == torch.float32


def test_import_does_not_import_triton():
    code = ("import sys, torch, eos_kernels\n"
            "f = eos_kernels.text_to_visual_importance; g = eos_kernels.select_anchors\n"
            "q = torch.randn(1, 2, 5, 4); m = torch.tensor([[False, True, True, False, False]])\n"
            "f(q, q, m, ~m, impl='auto')\n"
            "assert 'triton' not in sys.modules, 'triton was imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------ bad input


def _good():
    visual, text, amask = masks_from_layouts(["t" + "v" * 6 + "tt", "t" + "v" * 6 + "tp"])
    q, k = random_qk(2, 4, 2, 9, 8, torch.float32, seed=10)
    return dict(query=q, key=k, visual=visual, text=text, attention_mask=amask)


def _bad_cases():
    g = _good()
    q, k, v, t, a = g["query"], g["key"], g["visual"], g["text"], g["attention_mask"]
    no_text = t.clone()
    no_text[1] = False
    text_only_padded = torch.zeros_like(t)
    text_only_padded[:, 0] = True
    text_only_padded[1, 0], text_only_padded[1, 8] = False, True  # position 8 of sample 1 is padding
    return [
        ("query rank", dict(query=q[0]), ValueError, "query"),
        ("key rank", dict(key=k[..., None]), ValueError, "key"),
        ("query not tensor", dict(query=q.tolist()), TypeError, "query"),
        ("query integer", dict(query=q.long(), key=k.long()), TypeError, "query"),
        ("key dtype", dict(key=k.double()), TypeError, "key"),
        ("heads not multiple", dict(key=k[:, :1].expand(-1, 3, -1, -1)), ValueError, "multiple"),
        ("key batch", dict(key=k[:1]), ValueError, "key"),
        ("key length", dict(key=k[:, :, :8]), ValueError, "key"),
        ("key dh", dict(key=k[..., :4]), ValueError, "key"),
        ("key device", dict(key=k.to("meta")), ValueError, "key"),
        ("visual dtype", dict(visual=v.long()), TypeError, "visual"),
        ("visual shape", dict(visual=v[:, :8]), ValueError, "visual"),
        ("visual device", dict(visual=v.to("meta")), ValueError, "visual"),
        ("text dtype", dict(text=t.to(torch.uint8)), TypeError, "text"),
        ("text shape", dict(text=t[None]), ValueError, "text"),
        ("mask float", dict(attention_mask=a.float()), TypeError, "attention_mask"),
        ("mask shape", dict(attention_mask=a[:1]), ValueError, "attention_mask"),
        ("no text rows", dict(text=no_text), ValueError, "no text rows"),
        ("text rows all padded", dict(text=text_only_padded), ValueError, "sample 1 has no text rows"),
        ("impl", dict(impl="cuda"), ValueError, "impl"),
        ("scale type", dict(scale="0.1"), TypeError, "scale"),
        ("scale nan", dict(scale=float("nan")), ValueError, "scale"),
    ]


@pytest.mark.parametrize("label,change,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input(label, change, exc, match):
    kwargs = {**_good(), **change}
    with pytest.raises(exc, match=match):
        eos_kernels.text_to_visual_importance(**kwargs)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = {name: x.cpu() for name, x in _good().items()}
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        eos_kernels.text_to_visual_importance(**g, impl="triton")


# ------------------------------------------------------------ GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled Triton kernel")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hkv", [32, 8])
def test_gpu_llava7b_shapes(dtype, hkv):
    """Compiled kernel vs the reference (on CPU, no TF32) at LLaVA-1.5-7B prefill shapes."""
    B, Hq, L, dh, n_vis = 2, 32, 650, 128, 576
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, L, Hq, dh, generator=g).transpose(1, 2).to("cuda", dtype)
    k = torch.randn(B, L, hkv, dh, generator=g).transpose(1, 2).to("cuda", dtype)
    pos = torch.arange(L)
    visual = ((pos >= 35) & (pos < 35 + n_vis)).repeat(B, 1)
    text = ~visual
    amask = torch.ones(B, L, dtype=torch.long)
    amask[1, :20] = 0   # left padding on the second sample
    text[0, : 35 - 16] = False  # sample 0: 16 text rows before the image
    out = eos_kernels.text_to_visual_importance(q, k, visual.cuda(), text.cuda(), amask.cuda())
    again = eos_kernels.text_to_visual_importance(q, k, visual.cuda(), text.cuda(), amask.cuda())
    assert torch.equal(out, again), "not deterministic run to run"
    ref = eos_kernels.text_to_visual_importance(q.cpu(), k.cpu(), visual, text, amask,
                                                impl="torch")
    # dh = 128 terms per logit and the GPU's exp2 approximation: a little more
    # rounding than the tiny CPU cases, still ~1e-6 relative.
    torch.testing.assert_close(out.cpu(), ref, rtol=5e-5, atol=1e-8)
    assert ref.sum() > 0.1
