"""The C++ sliding-window kernel of ``blocks`` (float32 and bfloat16 on CPU)."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longswap.kernels import blocks, cpp, window_cpu
from longswap.kernels.reference import reference_attention
from longswap.patterns import dilated, shifted_groups, sliding_window
from tests.kernels.test_backends import assert_matches_reference
from tests.kernels.test_band import inputs


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls ``blocks`` makes to the kernel."""
    calls = []

    def counted(*args):
        calls.append(args[3])
        return window_cpu.window_attention(*args)

    monkeypatch.setattr(blocks, "window_attention", counted)
    return calls


@pytest.mark.parametrize(
    ("batch", "heads", "q_len", "kv_len", "pattern"),
    [
        (2, (2, 2), 1000, 1000, sliding_window(100)),  # several backward segments
        (1, (4, 2), 700, 900, sliding_window(150)),  # cached keys before the queries
        (2, (4, 1), 129, 129, sliding_window(64, sinks=3)),  # a short last block, sinks
        (1, (2, 2), 300, 300, sliding_window(70, sinks=100)),  # sinks inside the window
        (1, (2, 1), 127, 127, sliding_window(500, sinks=4)),  # window and sinks past L
        (1, (4, 2), 1, 900, sliding_window(150, sinks=4)),  # a decoding step
        (2, (2, 2), 7, 300, sliding_window(1)),  # each query sees itself only
        (2, (4, 2), 500, 500, dilated(20, 3)),  # three interleaved windows
        (1, (2, 1), 700, 903, dilated(64, 4)),  # cached keys: residues shift by the offset
        (1, (2, 2), 3, 40, dilated(8, 5)),  # fewer queries than residues
        (1, (4, 2), 1, 900, dilated(30, 7)),  # a decoding step
    ],
    ids=str,
)
def test_kernel_equals_reference(batch, heads, q_len, kv_len, pattern, kernel_calls):
    q, k, v = inputs(batch, *heads, q_len, kv_len)
    assert_matches_reference(pattern, q, k, v, None, 2e-5)
    if pattern.covers(kv_len):  # dense at this length: the backend runs SDPA's kernel
        assert kernel_calls == []
        out = window_cpu.window_attention(q, k, v, pattern, q.shape[-1] ** -0.5)
        ref = reference_attention(q, k, v, pattern, q.shape[-1] ** -0.5)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)  # the kernel called directly
    else:
        assert kernel_calls == [pattern]


def test_kernel_takes_any_gradient_layout():
    """Gradients arriving transposed (as from an output projection) are read correctly."""
    q, k, v = inputs(1, 2, 2, 200, 200)
    pattern = sliding_window(50, sinks=2)
    out = window_cpu.window_attention(q, k, v, pattern, 0.25)
    ref = blocks.blocks_attention(q, k, v, pattern, 0.25, force_math=True)
    w = torch.randn(1, 200, 2, 16).transpose(1, 2)  # rows not contiguous in (B, H, L, D)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), w),
        torch.autograd.grad(ref, (q, k, v), w),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("heads", "q_len", "kv_len", "pattern"),
    [
        ((2, 2), 1000, 1000, sliding_window(100)),
        ((4, 2), 700, 900, sliding_window(150, sinks=4)),  # cached keys, sinks
        ((4, 2), 500, 500, dilated(20, 3)),
    ],
    ids=str,
)
def test_bfloat16_kernel_equals_reference(heads, q_len, kv_len, pattern, kernel_calls):
    """bfloat16 windows run the kernel: outputs and gradients (bfloat16) within bfloat16's
    rounding of the float32 oracle's on the same rounded inputs."""
    from tests.kernels.test_selection_cpu import relative_error

    q, k, v = inputs(2, *heads, q_len, kv_len, dim=64, dtype=torch.bfloat16)
    exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
    w = torch.randn(2, heads[0], q_len, 64)
    out = blocks.blocks_attention(q, k, v, pattern, 0.125)
    ref = reference_attention(*exact, pattern, 0.125)
    assert kernel_calls == [pattern] and out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 8e-3
    got = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), exact)
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == torch.bfloat16 and relative_error(a, b) < 8e-3, name


def test_kernel_serves_float32_and_bfloat16_windows_on_cpu(kernel_calls, monkeypatch):
    q, k, v = inputs(1, 2, 2, 300, 300)
    blocks.blocks_attention(q, k, v, sliding_window(16) | dilated(4, 40), 0.25)  # band
    blocks.blocks_attention(q, k, v, shifted_groups(64), 0.25)  # tiles
    blocks.blocks_attention(q, k, v, sliding_window(40), 0.25, force_math=True)
    blocks.blocks_attention(q, k, v, sliding_window(40), 0.25, torch.ones(1, 300, dtype=bool))
    q16, k16, v16 = (t.detach().half() for t in (q, k, v))
    blocks.blocks_attention(q16, k16, v16, sliding_window(40), 0.25)  # float16: band
    assert kernel_calls == []
    assert window_cpu.window_kernel_applies(sliding_window(40), q.bfloat16())
    monkeypatch.setenv(cpp.SWITCH, "0")  # switched off: pure PyTorch throughout
    cpp.compiled.cache_clear()
    try:
        assert not window_cpu.window_kernel_applies(sliding_window(40), q)
    finally:
        cpp.compiled.cache_clear()


def test_build_failure_warns_once_and_the_band_path_serves(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no build cached there

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    cpp.compiled.cache_clear()
    try:
        failed = "no C.. compiler found.*sliding_window.*pure-PyTorch"
        with pytest.warns(RuntimeWarning, match=failed):
            assert window_cpu.extension() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the failure is reported once, not per call
            q, k, v = inputs(1, 2, 2, 300, 300)
            assert not window_cpu.window_kernel_applies(sliding_window(40), q)
            assert_matches_reference(sliding_window(40), q, k, v, None, 2e-5)
    finally:
        cpp.compiled.cache_clear()


def test_a_cached_build_loads_without_building(monkeypatch):
    """Another checkout or environment with the same sources loads the build as it is."""
    from torch.utils import cpp_extension

    if window_cpu.extension() is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setattr(cpp_extension, "load", pytest.fail)
    cpp.compiled.cache_clear()
    try:
        assert cpp.compiled("window_attention") is not None
        assert cpp.kernel_status()["window_attention"] == "cached"
    finally:
        cpp.compiled.cache_clear()


@pytest.fixture
def kernel():
    """The compiled extension (its entry points called directly, as a careless caller would)."""
    ext = window_cpu.extension()
    if ext is None:
        pytest.skip("the C++ window kernel could not be built here")
    return ext


def _args(q=(1, 2, 16, 8), k=(1, 2, 16, 8), v=None, window=4, sinks=0, scale=0.5, block=8, own=1):
    """The kernel's forward arguments: random q, k, v of these shapes, then the settings."""
    return [*(torch.randn(*shape) for shape in (q, k, v or k)), window, sinks, scale, block, own]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (_args(q=(1, 3, 16, 8)), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
        (_args(q=(1, 2, 16, 16), k=(1, 2, 16, 32)), "share the head dim D"),
        (_args(q=(2, 2, 16, 8)), "share the batch size"),
        (_args(v=(1, 2, 15, 8)), r"k and v must agree on \(Hkv, Lk\)"),
        (_args(q=(1, 2, 17, 8)), r"Lq \(17\) must not exceed Lk \(16\)"),
        (_args(q=(2, 16, 8)), "must be a 4-D float32 CPU tensor"),
        (_args(window=0), "window must be >= 1, got 0"),
        (_args(sinks=-1), r"sinks must lie in \[0, Lk = 16\], got -1"),
        (_args(sinks=17), r"sinks must lie in \[0, Lk = 16\], got 17"),
        (_args(scale=float("inf")), "scale must be a finite positive number"),
        (_args(scale=0.0), "scale must be a finite positive number"),
        (_args(block=0), r"block must lie in \[1, 4096\]"),
        (_args(own=0), r"own_block must be >= 1 \(1: none\), got 0"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_forward_checks_every_argument(kernel, args, message):
    with pytest.raises(RuntimeError, match=message):
        kernel.forward(*args)


def test_forward_checks_dtypes_and_layouts(kernel):
    q, k, v, *rest = _args()
    with pytest.raises(RuntimeError, match="4-D float32 CPU tensor.*Double"):
        kernel.forward(q, k.double(), v, *rest)
    with pytest.raises(RuntimeError, match="stride 1 along D.*contiguous"):
        kernel.forward(q.transpose(2, 3), k, v, *rest)  # D and L swapped: q (1, 2, 8, 16)
    overlapping = torch.randn(128).as_strided((1, 2, 16, 8), (0, 8, 4, 1))  # rows 4 apart
    with pytest.raises(RuntimeError, match="stride >= D along L"):
        kernel.forward(q, overlapping, v, *rest)


def test_backward_checks_out_grad_and_lse(kernel):
    q, k, v, *tail = _args()
    out, lse = kernel.forward(q, k, v, *tail)
    with pytest.raises(RuntimeError, match=r"grad must be \(B, Hq, Lq, Dv\) = \(1, 2, 16, 8\)"):
        kernel.backward(out[:, :, :8], q, k, v, out, lse, *tail)
    with pytest.raises(RuntimeError, match=r"out must be \(B, Hq, Lq, Dv\)"):
        kernel.backward(out, q, k, v, out[:, :1], lse, *tail)
    with pytest.raises(RuntimeError, match=r"lse must be a contiguous float32 CPU tensor"):
        kernel.backward(out, q, k, v, out, lse[..., :8], *tail)
    with pytest.raises(RuntimeError, match=r"lse must be a contiguous"):
        kernel.backward(out, q, k, v, out, lse.transpose(0, 1), *tail)
    with pytest.raises(RuntimeError, match=r"query heads \(2\) must be a multiple"):
        kernel.backward(out, q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1), out, lse, *tail)


def test_window_wider_than_the_keys_is_the_whole_causal_row(kernel):
    """A window beyond every length (2**31 - 1 on 16 keys) sees what a window of 16 sees."""
    q, k, v, *_ = _args()
    wide, _ = kernel.forward(q, k, v, 2**31 - 1, 0, 0.5, 8, 1)
    exact, _ = kernel.forward(q, k, v, 16, 0, 0.5, 8, 1)
    torch.testing.assert_close(wide, exact, rtol=0, atol=0)


def test_huge_dilation_makes_one_window_per_query():
    """A dilation far beyond the length costs one window per query, not one per residue."""
    assert len(window_cpu._residues(dilated(3, 2**31 - 1), 5, 9)) == 5


fuzz = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 2),
        "heads": st.sampled_from([(1, 1), (2, 1), (3, 1), (4, 2), (6, 3)]),
        "q_len": st.integers(1, 260),
        "extra": st.sampled_from([0, 0, 1, 5, 70]),
        "dims": st.sampled_from([(8, 8), (16, 16), (16, 8), (1, 4), (24, 40)]),
        "pattern": st.one_of(
            st.builds(sliding_window, st.integers(1, 300), st.sampled_from([0, 0, 1, 4, 80])),
            st.builds(dilated, st.integers(1, 40), st.integers(1, 9)),
        ),
        "scale": st.sampled_from([0.05, 0.25, 1.0]),
        "strided": st.booleans(),  # (B, L, H, D) memory, as a projection leaves it
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=max(100, settings.default.max_examples))
@given(s=fuzz)
def test_kernel_fuzzed_against_the_oracle(s):
    """Random shapes (grouped heads, odd lengths, cached keys, Dv != D, strided rows)."""
    g = torch.Generator().manual_seed(s["seed"])
    (hq, hkv), (dim, dim_v) = s["heads"], s["dims"]
    q_len, kv_len = s["q_len"], s["q_len"] + s["extra"]

    def rand(heads: int, length: int, d: int) -> torch.Tensor:
        if s["strided"]:
            x = torch.randn(s["batch"], length, heads, d, generator=g).transpose(1, 2)
        else:
            x = torch.randn(s["batch"], heads, length, d, generator=g)
        return x.requires_grad_()

    q, k, v = rand(hq, q_len, dim), rand(hkv, kv_len, dim), rand(hkv, kv_len, dim_v)
    out = window_cpu.window_attention(q, k, v, s["pattern"], s["scale"])
    ref = reference_attention(q, k, v, s["pattern"], s["scale"])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    w = torch.randn(ref.shape, generator=g)
    for name, a, b in zip(
        "qkv",
        torch.autograd.grad(out, (q, k, v), w),
        torch.autograd.grad(ref, (q, k, v), w),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_build_is_keyed_by_torch_version_and_keeps_ieee_math(monkeypatch, tmp_path):
    """A new torch builds its own copy; NaN handling is not left to -ffast-math."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no build cached there

    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        return "built"

    monkeypatch.setattr(cpp_extension, "load", record)
    cpp.compiled.cache_clear()
    try:
        assert window_cpu.extension() == "built"
    finally:
        cpp.compiled.cache_clear()
    isa, abi = torch.backends.cpu.get_cpu_capability(), cpp.abi_tag()
    assert seen["name"] == cpp.extension_name("window_attention", isa, torch.__version__, abi)
    assert seen["sources"][0].endswith("csrc/window_attention.cpp")
    name = cpp.extension_name("window_attention", "AVX2", "2.13.0+cpu", abi)
    assert name.startswith("longswap_window_attention_avx2_torch2_13_0_cpu_")
    assert cpp.extension_name("window_attention", "AVX2", "2.14.1", abi) != (
        cpp.extension_name("window_attention", "AVX2", "2.13.0", abi)
    )
    assert cpp.extension_name("selection_decode", "AVX2", "2.13.0", abi) != (
        cpp.extension_name("window_attention", "AVX2", "2.13.0", abi)
    )
    assert not any("fast-math" in flag or "finite-math" in flag for flag in seen["extra_cflags"])


def test_nan_in_the_kernel_follows_the_oracle(kernel_calls):
    """A NaN query or key makes NaN exactly the rows that see it (IEEE arithmetic)."""
    q, k, v = (t.detach() for t in inputs(1, 2, 2, 300, 300))
    q[0, 0, 10, 0] = k[0, 1, 200, 3] = float("nan")
    pattern = sliding_window(50, sinks=2)
    out = blocks.blocks_attention(q, k, v, pattern, 0.25)
    ref = reference_attention(q, k, v, pattern, 0.25)
    assert kernel_calls == [pattern]
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), atol=2e-5, rtol=2e-5)
