"""The x86-64 kernels (kernels/x86, the host board's variant) with their AVX2 path compiled in
(-mavx2), and again with AVX-VNNI (-mavx2 -mavxvnni) where the CPU has it, -Wall -Wextra -Werror,
AddressSanitizer + UndefinedBehaviorSanitizer, run on this machine against the numpy reference over the same random shapes and parameters as test_kernels_c.py (which
builds the same files without -mavx2, i.e. their portable path): 0 differing elements."""
import platform
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import CBuild, float_graph, quantize_with_random_data
from test_kernels_c import (SETTINGS, _check, activations, input_range, observers, test_add_s8, test_conv2d_s8, test_depthwise_conv2d_s8,  # noqa: F401
                            test_fully_connected_s8, test_max_pool2d_s8_wide)


def _has_avx2() -> bool:
    try:
        return platform.machine() in ("x86_64", "AMD64") and " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_avx2(), reason="needs an x86-64 CPU with AVX2")


def _has_avx_vnni() -> bool:
    try:
        return " avx_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _has_avx512_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags and " avx512vl" in flags


@pytest.fixture(scope="module", params=[
    ("-mavx2",),
    pytest.param(("-mavx2", "-mavxvnni"), marks=pytest.mark.skipif(not _has_avx_vnni(), reason="needs AVX-VNNI"),
                 id="vnni"),
    pytest.param(("-mavx2", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni"),
                 marks=pytest.mark.skipif(not _has_avx512_vnni(), reason="needs AVX512-VNNI with VL"),
                 id="vnni512")], ids=lambda flags: "-".join(f[2:] for f in flags))
def cbuild(tmp_path_factory, request):
    """Overrides conftest's: kernel objects with the AVX2 path (vpmaddwd), then with AVX-VNNI, then with
    AVX512-VNNI (either: vpdpbusd over u8 inputs, the convolution's register tile; the path -march=native
    takes on a CPU that has it), sanitized."""
    return CBuild(tmp_path_factory.mktemp("kernel_objects_" + "_".join(f[2:] for f in request.param)),
                  sanitize=True, extra_flags=request.param)


@pytest.fixture(autouse=True)
def _vnni_only_where_it_is_used(request):
    """The VNNI build changes only the convolution and fully connected kernels: the other kernels' cases
    (the same code as in the -mavx2 build) are not run twice."""
    if "[vnni" in request.node.name and request.node.originalname in (  # [vnni] and [vnni512]
            "test_add_s8", "test_depthwise_conv2d_s8", "test_max_pool2d_s8_wide"):
        pytest.skip("no VNNI path in this kernel: covered by the -mavx2 build")


@pytest.mark.parametrize("shape", [(1, 7, 5, 64), (1, 4, 4, 41), (1, 3, 9, 16), (1, 5, 6, 8)])
def test_wide_channels_take_the_vector_paths(cbuild, tmp_path, shape):
    """Depthwise with 16-channel and 8-channel steps and a scalar tail, pointwise 1x1 over wide channels,
    K with 32-, 16-, 8-wide steps and a zero-padded tail (VNNI) or 16- and 8-wide steps and a tail (vpmaddwd),
    output channels not a multiple of 4 (5)."""
    from edgekit import reference
    from helpers import c_matches_reference
    rng = np.random.default_rng(sum(shape))
    c = shape[3]
    for kind, w_shape, attrs in [
            ("depthwise_conv2d", (1, 3, 3, c), dict(padding=(1, 1, 1, 1), depth_multiplier=1)),
            ("conv2d", (24, 1, 1, c), dict(padding=(0, 0, 0, 0))),
            ("conv2d", (5, 3, 3, c), dict(padding=(1, 0, 2, 1)))]:
        attrs = dict(stride=(1, 1), dilation=(1, 1), activation="relu", **attrs)
        out_c = c if kind == "depthwise_conv2d" else w_shape[0]
        kh, kw = w_shape[1:3]
        p = attrs["padding"]
        oh, ow = shape[1] + p[0] + p[1] - kh + 1, shape[2] + p[2] + p[3] - kw + 1
        g = float_graph(kind, [shape], attrs, {"w": rng.normal(0, 0.3, w_shape), "b": rng.normal(0, 0.3, out_c)},
                        (1, oh, ow, out_c))
        q = quantize_with_random_data(g, rng)
        x = rng.integers(-128, 128, size=(5,) + shape[1:]).astype(np.int8)
        got, ref = c_matches_reference(q, tmp_path / kind / str(kh), cbuild, {"x0": x})
        assert (tmp_path / kind / str(kh) / "include" / "ek_x86.h").exists()
        assert int(np.sum(got != ref)) == 0, kind
        assert reference is not None


@st.composite
def wide_conv_case(draw):
    """Convolutions for the VNNI tile: out_c over one and several 16-channel blocks (a last block that
    overlaps the one before, fewer than 16 channels), K not a multiple of 4, windows in the padding, dilation,
    stride, pixel counts not a multiple of 4."""
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    c, o = draw(st.integers(1, 24)), draw(st.sampled_from([1, 3, 8, 15, 16, 17, 24, 32, 40]))
    kh, kw = draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (2, 5)]))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(4))
    oh = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1:
        padding = (padding[0] + kh * dilation[0], padding[1], padding[2] + kw * dilation[1], padding[3])
        oh = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return dict(h=h, w=w, c=c, o=o, k=(kh, kw), stride=stride, dilation=dilation, padding=padding, out=(oh, ow),
                act=draw(activations), wscale=draw(st.floats(min_value=0.01, max_value=2.0)), rng=draw(input_range()),
                observer=draw(observers), seed=draw(st.integers(0, 2 ** 31)))


@given(wide_conv_case())
@SETTINGS
def test_conv2d_s8_tile(cbuild, case):
    """The convolution over 1-40 output channels and 1-24 input channels: the VNNI builds' register tile
    (4 pixels x 16 channels over the packed filter), the -mavx2 build's 4 x 2 dot products over the plain one
    (the same generated arrays); 0 differing elements."""
    rng = np.random.default_rng(case["seed"])
    kh, kw = case["k"]
    attrs = dict(stride=case["stride"], dilation=case["dilation"], padding=case["padding"], activation=case["act"])
    g = float_graph("conv2d", [(1, case["h"], case["w"], case["c"])], attrs,
                    {"w": rng.normal(0, case["wscale"], (case["o"], kh, kw, case["c"])),
                     "b": rng.normal(0, case["wscale"], case["o"])}, (1, *case["out"], case["o"]))
    _check(g, rng, cbuild, {"x0": case["rng"]}, case["observer"])
