"""Decisions the fast kernels need, taken at generate time.

- The input offset folded into the bias ("kernel sums", as CMSIS-NN calls them): a weighted
  layer computes sum_i w_i * (x_i + offset) + bias. With
  folded_bias = bias + offset * sum_i w_i the kernels compute folded_bias + sum_i w_i * x_i, a
  pure int8 x int8 dot product. A padded tap, which the reference skips, then has to read the
  input zero point (-offset) so that its w * (zp + offset) = 0 is still added. Integer sums are
  exact in any order, so the result is the same integer the reference computes
  (passes/verify.py bounds both forms).
- Scratch: the Cortex-M DSP kernels gather two output pixels' windows (im2col) widened to int16
  into one static buffer whose size is planned here, so the kernels never size memory at run
  time (no VLA, no malloc) and the ELF's RAM counts it.
"""
from __future__ import annotations

import numpy as np

from ..ir import Graph, Op

FC_DSP_CHUNK = 32  # rows a DSP fully connected layer sums before their output stage (EK_FC_DSP_CHUNK)
SDOT_BLOCK = 16  # output channels of the NEON convolution's register tile (kernels/neon/ek_conv2d_s8)


def sdot_block_starts(out_c: int) -> list[int]:
    """The first channel of each 16-channel block of the SDOT convolution: 0, 16, 32, ..., and when
    out_c is not a multiple of 16 a last block ending at out_c (channels computed twice, the same
    values); fewer than 16 channels: one block from 0 (the missing channels' weights are zero)."""
    starts = list(range(0, out_c - SDOT_BLOCK + 1, SDOT_BLOCK))
    if not starts or starts[-1] + SDOT_BLOCK < out_c:
        starts.append(max(out_c - SDOT_BLOCK, 0))
    return starts


def pack_conv_tile(w: np.ndarray, group: int) -> np.ndarray:
    """A dense convolution's int8 filter (out_c, kh, kw, in_c) in the order the NEON register tile reads
    it (kernels/neon/ek_conv2d_s8): per block of 16 output channels (sdot_block_starts), per group of
    ``group`` taps of the window (K = kh * kw * in_c rounded up to a multiple of ``group``, zeros past
    K), the 16 channels' ``group`` weights side by side. rpi5's SDOT tile reads groups of 4 (one
    64-byte load feeds vdotq_laneq_s32 for 16 channels x 4 taps), rpi4's SMLAL tile groups of 1 (16
    bytes, one tap of 16 channels). Channels past out_c are zero."""
    out_c = w.shape[0]
    flat = w.reshape(out_c, -1).astype(np.int8)
    k = flat.shape[1]
    kg = (k + group - 1) // group
    padded = np.zeros((out_c + SDOT_BLOCK, group * kg), np.int8)
    padded[:out_c, :k] = flat
    blocks = [padded[s:s + SDOT_BLOCK].reshape(SDOT_BLOCK, kg, group).transpose(1, 0, 2)
              for s in sdot_block_starts(out_c)]
    return np.ascontiguousarray(np.stack(blocks)).reshape(-1)


def pack_conv_sdot(w: np.ndarray) -> np.ndarray:
    """The filter for rpi5's SDOT tile: pack_conv_tile with groups of 4 taps."""
    return pack_conv_tile(w, 4)


def conv_tile_group(board) -> int:
    """Taps per group of the packed filter of the board's NEON convolution tile (SDOT: 4, else 1)."""
    return 4 if board.get("dotprod") else 1


def channel_weight_sums(graph: Graph, op: Op) -> np.ndarray:
    """sum of a weighted layer's int8 weights per output channel (int64)."""
    w = graph.tensors[op.inputs[1]].data.astype(np.int64)
    if op.kind == "depthwise_conv2d":
        return w.reshape(-1, w.shape[3]).sum(axis=0)
    return w.reshape(w.shape[0], -1).sum(axis=1)


def folded_bias(graph: Graph, op: Op) -> np.ndarray:
    """bias + input_offset * sum(weights of the channel), as int32 (verify.py proves it fits)."""
    sums = channel_weight_sums(graph, op)
    bias = graph.tensors[op.inputs[2]].data.astype(np.int64) if len(op.inputs) > 2 else np.zeros_like(sums)
    folded = bias + int(op.attrs["input_offset"]) * sums
    assert np.all(np.abs(folded) < 2 ** 31), "verify.check_int8_arithmetic must refuse this layer first"
    return folded.astype(np.int32)


def scratch_bytes(layers, board, portable=()) -> int:
    """Bytes of the static scratch the board's kernel variant needs for these layers (0 when it
    needs none). The Cortex-M DSP kernels ("dsp") widen int8 to int16 for SMLAD: a dense
    convolution gathers the windows of two output pixels (2 x K int16, K = kh * kw * in_c), a
    fully connected layer keeps the sums of up to FC_DSP_CHUNK rows (int32) and widens its input
    vector once only when the scratch the other layers need leaves room for it (in_c int16, to a
    word boundary; otherwise it sign-extends in its loop), a depthwise one lists its
    taps' input pointers (kh x kw), keeps one output pixel's sums (int32 for out_c rounded down to a
    multiple of 4) and a row of zero points (in_c bytes). The x86 and NEON
    kernel gathers two windows as int8 (2 x K bytes), the NEON register tile four, each padded
    to whole 16-byte (SDOT) or 8-byte loads; the NEON depthwise kernel keeps the tap table
    (64-bit pointers) and the zero-point row. Kernels in ``portable`` are built from their portable
    source (project.cold_kernels) and need none of the variant's scratch."""
    need = 0
    for layer in layers:
        variant = None if layer.kernel in portable else board.get("kernel_variant")
        _, kh, kw, k_in = layer.dims.get("filter", (0, 0, 0, 0))
        if layer.kernel == "ek_conv2d_s8" and variant in ("dsp", "x86", "neon"):
            # four pixels' windows for the NEON register tile, rounded up to whole loads (SDOT 16
            # bytes, rpi4 8)
            load = 16 if board.get("dotprod") else 8
            windows = 4 * ((kh * kw * k_in + load - 1) // load * load) if variant == "neon" else \
                (4 if variant == "dsp" else 2) * kh * kw * k_in
            need = max(need, windows)
        elif layer.kernel == "ek_fully_connected_s8" and variant == "dsp":
            need = max(need, 4 * min(max(layer.dims["filter"][0] & ~3, 4), FC_DSP_CHUNK))  # never 0: defined
        elif layer.kernel == "ek_depthwise_conv2d_s8" and variant == "dsp":
            need = max(need, 4 * kh * kw + 4 * (layer.dims["output"][3] & ~3) + layer.dims["input"][3])
        elif layer.kernel == "ek_lstm_s8":  # every board: the int16 cell state and four gates
            need = max(need, 2 * 5 * layer.params["hidden"])
        elif layer.kernel == "ek_depthwise_conv2d_s8" and variant == "neon":
            need = max(need, 8 * kh * kw + layer.dims["input"][3])
    return (need + 7) // 8 * 8
