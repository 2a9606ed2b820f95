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

from .. import quant_math
from ..cost import layer_macs
from ..ir import Graph, Op, nhwc

FC_DSP_CHUNK = 32  # rows a DSP fully connected layer sums before their output stage (EK_FC_DSP_CHUNK)
FC_DSP_WIDEN_BYTES = 256  # scratch a DSP fully connected layer may add to keep its input widened (in_c <= 128)
SDOT_BLOCK = 16  # output channels of the NEON convolution's register tile (kernels/neon/ek_conv2d_s8)


def sdot_block_starts(out_c: int) -> list[int]:
    """The first channel of each 16-channel block of the SDOT convolution: 0, 16, 32, ..., and when
    out_c is not a multiple of 16 a last block ending at out_c (channels computed twice, the same
    values); fewer than 16 channels: one block from 0 (the missing channels' weights are zero)."""
    starts = list(range(0, out_c - SDOT_BLOCK + 1, SDOT_BLOCK))
    if not starts or starts[-1] + SDOT_BLOCK < out_c:
        starts.append(max(out_c - SDOT_BLOCK, 0))
    return starts


def pack_conv_tile(w: np.ndarray, group: int, block: int = SDOT_BLOCK) -> np.ndarray:
    """A dense convolution's int8 filter (out_c, kh, kw, in_c) in the order the NEON register tile reads
    it (kernels/neon/ek_conv2d_s8): per block of 16 output channels (sdot_block_starts), per group of
    ``group`` taps of the window (K = kh * kw * in_c rounded up to a multiple of ``group``, zeros past
    K), the 16 channels' ``group`` weights side by side. rpi5's SDOT tile reads groups of 4 (one
    64-byte load feeds vdotq_laneq_s32 for 16 channels x 4 taps), rpi4's SMLAL tile groups of 1 (16
    bytes, one tap of 16 channels). Channels past out_c are zero. ``block`` 8 (out_c <= 8, rpi5's
    narrow tile: sdot_narrow): one block of 8 channels, 32 bytes per group of 4 taps."""
    out_c = w.shape[0]
    assert block == SDOT_BLOCK or out_c <= block, "an 8-channel block holds at most 8 channels"
    flat = w.reshape(out_c, -1).astype(np.int8)
    k = flat.shape[1]
    kg = (k + group - 1) // group
    padded = np.zeros((out_c + block, group * kg), np.int8)
    padded[:out_c, :k] = flat
    blocks = [padded[s:s + block].reshape(block, kg, group).transpose(1, 0, 2)
              for s in (sdot_block_starts(out_c) if block == SDOT_BLOCK else [0])]
    return np.ascontiguousarray(np.stack(blocks)).reshape(-1)


SDOT_NARROW = 8  # output channels of rpi5's narrow convolution tile


def sdot_narrow(out_c: int) -> bool:
    """Whether rpi5's SDOT convolution runs a layer of out_c channels with its narrow tile (8 pixels x 8
    channels, kernels/neon/ek_conv2d_s8_sdot.j2; the kernel tests out_c <= 8 the same way), its
    filter packed by pack_conv_tile in one 8-channel block."""
    return out_c <= SDOT_NARROW


def pack_conv_pairs(w: np.ndarray) -> np.ndarray:
    """A dense convolution's int8 filter (out_c, kh, kw, in_c) in the order rpi4's int16-pair tile
    reads it (kernels/neon/ek_conv2d_s8_pairs): per block of 16 output channels (sdot_block_starts),
    per group of 4 taps of the window (each of its kh rows of kw * in_c taps padded with zeros to a
    multiple of 4, so that the kernel reads a row as whole groups), 64 bytes: channels 0-7 x taps
    (0, 1), channels 0-7 x taps (2, 3), channels 8-15 x taps (0, 1), channels 8-15 x taps (2, 3), each
    channel's two weights side by side (SMULL against a pixel's two taps broadcast over the lanes).
    Channels past out_c are zero. A layer of at most 8 channels keeps only channels 0-7's 32 bytes per
    group (the kernel's 8-channel tile)."""
    out_c, kh, kw, in_c = w.shape
    row = kw * in_c  # each window row padded to whole groups of 4 taps (a no-op when in_c % 4 == 0)
    w = np.pad(w.reshape(out_c, kh, row), ((0, 0), (0, 0), (0, -row % 4))).reshape(out_c, 1, 1, -1)
    groups = pack_conv_tile(w, 4).reshape(-1, 2, 8, 2, 2)  # [block x group, channel half, channel, tap pair, tap]
    packed = groups.transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(packed[:, :1] if w.shape[0] <= 8 else packed).reshape(-1)


def pack_fc_pairs(w: np.ndarray) -> np.ndarray:
    """A fully connected layer's int8 filter (out_c, in_c) in the order rpi4's int16-pair kernel
    (kernels/neon: ek_fully_connected_s8_pairs) reads it: per block of 16 rows (sdot_block_starts), per
    step of 16 inputs, the 16 rows' 16 weights (one LDP loads two rows' step). Each row is padded with
    zeros in front to a multiple of 16 inputs, so that the kernel's first step takes the in_c % 16
    odd inputs and every later step reads 16 inputs in place. Rows past out_c are zero."""
    pad = -w.shape[1] % 16
    return pack_conv_tile(np.pad(w.astype(np.int8), ((0, 0), (pad, 0))), 16)


def conv_tile_group(board) -> int:
    """Taps per group of the packed filter of the board's NEON convolution tile (SDOT: 4, else 1)."""
    return 4 if board.get("dotprod") else 1


def conv_blocks_outer(graph: Graph, op, board) -> bool:
    """Whether the board's convolution kernel walks every output pixel once per 16-channel block
    (rpi5, in_c a multiple of 4, windows read in place: a block's output stage is set up once), so
    that it does not write its output in raster order and may not run in place over its input."""
    if op.kind != "conv2d" or board.get("kernel_variant") != "neon" or not board.get("dotprod"):
        return False
    return nhwc(graph.tensors[op.inputs[0]].shape)[3] % 4 == 0 and nhwc(graph.tensors[op.outputs[0]].shape)[3] > 16


def int16_pairs_exact(w: np.ndarray) -> bool:
    """Whether rpi4's int16-pair kernels (kernels/neon: ..._pairs) compute this int8 filter exactly: they add
    two products w x + w' x' in an int16 lane before widening (SMULL + SMLAL2, then SADALP), which fits
    (|.| <= 2 x 127 x 128 = 32512 < 2^15) only when no weight is -128 (x may be: inputs span all of int8).
    A layer with a -128 weight keeps the one-product kernels."""
    return int(np.min(w)) > -128 if w.size else True


CONV_4X2_SCRATCH = 2048  # bytes of scratch the 4x2 kernel may take beyond what ek_conv2d_s8 needs


def conv_4x2_scratch_cap(graph: Graph) -> int:
    """The largest scratch a 4x2 convolution may use in this model: what the dense convolutions need
    with ek_conv2d_s8 (two int16 windows each), or CONV_4X2_SCRATCH if more. A larger window keeps
    ek_conv2d_s8, so the 4x2 kernel never adds more than CONV_4X2_SCRATCH bytes of RAM."""
    need = [4 * int(np.prod(nhwc(graph.tensors[op.inputs[1]].shape)[1:]))
            for op in graph.ops if op.kind == "conv2d"]
    return max([CONV_4X2_SCRATCH] + need)


CONV_4X2_CHUNK_MIN = 16  # the fewest taps per chunk of the K-chunked form (EK_CONV4X2_CHUNK_MIN in the template)
# the most taps the 4x2 kernel sums at a time (EK_CONV4X2_SUM_MAX): its sums are 256 times the dot
# product minus 128 x the odd taps' weights, modulo 2^32 (weights never sign-extended), exact below
# 2^23 in magnitude: |w| <= 128, |x| <= 128 at even taps and |x - 128| <= 256 at odd ones bound it by
# 170 x 128 x 128 + 170 x 128 x 256 = 8,355,840 < 2^23 for 340 taps; a longer window is chunked
CONV_4X2_SUM_MAX = 340


def conv_4x2_pairs(graph: Graph, op: Op) -> int:
    """Pairs of computed (not all-zero) output channels of a 4x2 layer (conv_4x2_layout's table[0])."""
    w = graph.tensors[op.inputs[1]].data
    return (int(np.count_nonzero(np.any(w.reshape(w.shape[0], -1) != 0, axis=1))) + 1) // 2


def conv_4x2_scratch(k_len: int, pairs: int, cap: int) -> int:
    """Scratch bytes a 4x2 layer over windows of k_len values needs: its four windows as int16 (8 x K
    rounded up to 4) when that fits ``cap``; else the K-chunked form, which gathers the windows a chunk
    at a time and keeps the pairs' partial sums (32 bytes a pair) after the chunk: it takes what
    ek_conv2d_s8 would (4 x K, within cap by conv_4x2_scratch_cap) or at least the sums and
    CONV_4X2_CHUNK_MIN taps; 0 when even that exceeds the cap (the layer keeps ek_conv2d_s8). The
    kernel sizes its chunks from the scratch it gets (ek_kernel_scratch_bytes), at least this."""
    k4 = (k_len + 3) // 4 * 4
    if 8 * k4 <= cap and k4 <= CONV_4X2_SUM_MAX:
        return 8 * k4
    need = max(4 * k_len, 32 * pairs + 8 * CONV_4X2_CHUNK_MIN)
    return need if need <= cap else 0


def conv_4x2_chunk(k_len: int, pairs: int, scratch: int) -> int:
    """Taps the 4x2 kernel gathers at a time with this much scratch (the template's kc): K rounded up
    to 4 when the four windows fit and K is at most CONV_4X2_SUM_MAX, else the chunk left after the
    pairs' sums (a multiple of 4, at most CONV_4X2_SUM_MAX); a chunk below CONV_4X2_CHUNK_MIN makes the
    kernel take its portable form."""
    k4 = (k_len + 3) // 4 * 4
    if 8 * k4 <= scratch and k4 <= CONV_4X2_SUM_MAX:
        return k4
    return min(max((scratch - 32 * pairs) // 8, 0) & ~3, CONV_4X2_SUM_MAX)


def conv_4x2_chosen(graph: Graph, op: Op, cap: int) -> bool:
    """Whether a dense int8 convolution runs the Cortex-M DSP kernel with 4 pixel x 2 channel register
    blocks (kernels/dsp/ek_conv2d_s8_4x2): its blocks pay off from a few pixels and a window of at
    least two words, and its scratch (4 windows of K int16) must stay within ``cap``
    (conv_4x2_scratch_cap). Others keep ek_conv2d_s8, as do spatial convolutions over 4-8 input
    channels; a 1x1 convolution over 8 channels takes the 4x2 kernel (VWW's 48x48x8 -> 16: 5.8 -> 3.4
    per MAC), and so does a first layer over 1-3 channels (an image, a spectrogram): its window is
    gathered once for all output channels, a pair at a time, instead of once per pair of pixels
    (M4: KWS's 10x4 over 1 channel 2.19 -> 1.78 per MAC, VWW's and ResNet-8's 3x3 over 3 channels
    5.41 -> 4.75 and 3.77 -> 3.18). A window whose four copies exceed the cap takes the K-chunked
    form when the pairs' partial sums leave room for a chunk (conv_4x2_scratch)."""
    _, kh, kw, in_c = nhwc(graph.tensors[op.inputs[1]].shape)
    pixels = int(np.prod(nhwc(graph.tensors[op.outputs[0]].shape)[1:3]))
    return ((in_c > 8 or in_c <= 3 or kh * kw == 1) and pixels >= 4 and kh * kw * in_c >= 8 and
            conv_4x2_small(graph, op) and conv_4x2_scratch(kh * kw * in_c, conv_4x2_pairs(graph, op), cap) > 0)


def conv_4x2_small(graph: Graph, op: Op) -> bool:
    """Whether every accumulator of the layer stays below 2^30 in magnitude (|folded bias| + 128 *
    sum|w| per channel, and the record's bias, which adds 128 * the odd positions' weights): the
    4x2 kernel keeps its sums doubled for its one-SMMLAR output stage. Other layers (huge biases or
    very long windows; none in practice) keep ek_conv2d_s8. Channels of zero weights are written as
    constants, not summed: their biases do not count."""
    w = graph.tensors[op.inputs[1]].data
    flat = w.reshape(w.shape[0], -1).astype(np.int64)
    live = np.any(flat != 0, axis=1)
    flat = flat[live]
    folded = np.abs(folded_bias(graph, op).astype(np.int64))[live]
    return bool(np.all(folded + 128 * np.abs(flat).sum(axis=1) + 128 * np.abs(flat[:, 1::2]).sum(axis=1) < 2 ** 30))


def pack_conv_4x2(w: np.ndarray) -> np.ndarray:
    """A dense convolution's int8 filter (out_c, kh, kw, in_c) in the order ek_conv2d_s8_4x2 reads it:
    per pair of output channels (c0, c1) (an odd last channel beside zeros), per block of four window
    positions k0..k3 (K = kh * kw * in_c rounded up to a multiple of 4, zeros past K), c0's word
    [k0, k1, k2, k3] then c1's, the even positions stored ^ 0x80: read as int16 lanes a word is
    (256 w1 + w0 + 128, 256 w3 + w2 + 128) and never needs sign-extending (the template's header)."""
    out_c = w.shape[0]
    flat = w.reshape(out_c, -1).astype(np.int8)
    k = flat.shape[1]
    k4 = (k + 3) // 4 * 4
    pairs = (out_c + 1) // 2
    padded = np.zeros((2 * pairs, k4), np.int8)
    padded[:out_c, :k] = flat
    padded[:, 0::2] ^= np.int8(-128)  # even positions + 128 as an unsigned byte
    # [pair, channel j, block b, r] -> [pair, b, j, r]
    blocks = padded.reshape(pairs, 2, k4 // 4, 4)
    return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3)).reshape(-1)


def _conv_4x2_record(op: Op, oc: int, bias: int) -> list[int]:
    """{2 x bias (the folded bias + 128 x the odd positions' weights), multiplier, (oc << 16) | (shift byte << 8) | code}: code r - 1 for r = -shift in
    2..20 (the kernel derives the output stage's constant from r and the output offset), else 0xFF
    (the generic stage, which reads the shift byte); see the template."""
    m, shift = int(op.attrs["multiplier"][oc]), int(op.attrs["shift"][oc])
    if not -128 <= shift < 128 or not 0 <= oc < 1 << 15 or not -2 ** 30 <= bias < 2 ** 30:
        raise ValueError(f"layer {op.name}: channel {oc} shift {shift} or bias {bias} does not fit the 4x2 record")
    r = -shift
    code = r - 1 if 2 <= r <= 20 else 0xFF
    return [2 * bias, m, (oc << 16) | ((shift & 0xFF) << 8) | code]  # the kernel's sums are doubled


def conv_4x2_generic(graph: Graph, op: Op) -> bool:
    """Whether a 4x2 layer's table has a record outside the fast output stage (code 0xFF: a shift
    outside -20..-2; 0xFE: the odd last channel's partner), the kernel's ek_conv4x2_channel_any."""
    _, table = conv_4x2_layout(graph, op)
    codes = table[2:2 + 6 * int(table[0])][2::3] & 0xFF
    return bool(np.any(codes >= 0xFE))


def conv_4x2_narrow(op: Op) -> bool:
    """Whether a 4x2 layer's activation narrows [-128, 127] (the kernel's `narrow`: a clamp after SSAT)."""
    return int(op.attrs["act_min"]) > -128 or int(op.attrs["act_max"]) < 127


def conv_4x2_layout(graph: Graph, op: Op) -> tuple[np.ndarray, np.ndarray]:
    """ek_conv2d_s8_4x2's filter and table. Output channels with a nonzero weight are packed
    (pack_conv_4x2, in pairs); the table is [pairs, constants], a record per packed channel
    (_conv_4x2_record; the odd last one's partner {0, 0, 0xFE}: nothing to write), then
    (oc << 8) | value for each channel whose weights are all zero: its output is the same for every
    pixel, the requantized bias clamped to the activation (a pruned model's channels), so the kernel
    writes it instead of computing it."""
    w = graph.tensors[op.inputs[1]].data
    out_c = w.shape[0]
    live = np.any(w.reshape(out_c, -1) != 0, axis=1)
    bias = folded_bias(graph, op).astype(np.int64)
    # the kernel's sums leave out 128 * (the odd positions' weights) (pack_conv_4x2): the record adds it
    odd = w.reshape(out_c, -1)[:, 1::2].astype(np.int64).sum(axis=1)
    computed = np.flatnonzero(live)
    packed = pack_conv_4x2(w[computed]) if len(computed) else np.zeros(4, np.int8)
    records = [_conv_4x2_record(op, int(oc), int(bias[oc] + 128 * odd[oc])) for oc in computed]
    if len(records) % 2:
        records.append([0, 0, 0xFE])
    dead = np.flatnonzero(~live)
    # all weights zero: the accumulator is the bias (folded_bias adds offset * 0)
    value = quant_math.multiply_by_quantized_multiplier(bias[dead], op.attrs["multiplier"][dead],
                                                        op.attrs["shift"][dead]) + int(op.attrs["output_offset"])
    value = np.clip(value, int(op.attrs["act_min"]), int(op.attrs["act_max"]))
    constants = [(int(oc) << 8) | (int(v) & 0xFF) for oc, v in zip(dead, value)]
    table = [len(records) // 2, len(constants)] + [x for rec in records for x in rec] + constants
    return packed, np.array(table, np.int64).astype(np.int32)


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


DW_DSP_REC = 13  # words per group of four channels in depthwise_dsp_records, before the taps' weights


def depthwise_dsp_takes_records(op: Op) -> bool:
    """Whether the Cortex-M DSP depthwise kernel reads requantization records after this layer's biases:
    a dense int8 depthwise layer with a depth multiplier of 1 and at least four channels (the others run
    the portable loop, which reads the out_c biases only)."""
    return (op.kind == "depthwise_conv2d" and op.attrs.get("depth_multiplier", 1) == 1
            and op.attrs["multiplier"].shape[0] >= 4)


def _int16_pair(lo: int, hi: int) -> int:
    """Two int16 in one int32 word, lo in the low half (the lanes SMLABB / SMLATT read)."""
    word = (lo & 0xFFFF) | ((hi & 0xFFFF) << 16)
    return word - (1 << 32) if word >= 1 << 31 else word


def depthwise_dsp_records(graph: Graph, op: Op, unrolled: bool = True) -> np.ndarray:
    """The DSP depthwise kernel's records, made once here instead of per pixel at run time: per group of
    four channels (out_c rounded down to 4) DW_DSP_REC int32 words {hs, b0..b3, m0, c0, m1, c1, m2, c2, m3,
    c3}, then (only when ``unrolled``: the layer's geometry has unrolled code, depthwise_dsp_unrolled) one
    two words per tap (kh x kw, row by row), its four channels' weights as int16 pairs (c0, c2) and
    (c1, c3) (widened here, so the kernel loads them with one LDRD), then per window
    column two words, its weights summed over the rows as int16 pairs (c0, c2) and (c1, c3) (|sum| <=
    25 x 128). The tap-table path reads only the first DW_DSP_REC words of a group (its weights come
    from the filter), so a layer without unrolled code stores those alone: b the folded bias,
    m the multiplier, c = 2^(r - 2) + output_offset * 2^(r - 1) for r = -shift, hs the four right shifts
    r - 1, one per byte. The unrolled code then walks one pointer per group for biases, weights and
    requantization (the filter array stays for the tap-table path, the tail channels and the portable
    loop). With r in 2..22 the kernel's stage is one
    64-bit multiply-accumulate, a shift and a saturation per value, the offset folded into c (see the
    template). A group with another shift, or a layer whose activation bounds narrow [-128, 127] (SSAT
    alone clamps to int8), has hs = -1: the kernel takes the generic stage from the quant arrays."""
    a = op.attrs
    bias = folded_bias(graph, op).astype(np.int64)
    m, shift = a["multiplier"].astype(np.int64), a["shift"].astype(np.int64)
    offset = int(a["output_offset"])
    narrow = int(a["act_min"]) > -128 or int(a["act_max"]) < 127
    w = graph.tensors[op.inputs[1]].data.astype(np.int8)
    taps = w.reshape(-1, w.shape[-1])  # (kh * kw, out_c)
    groups = []
    for c0 in range(0, len(m) & ~3, 4):
        r = -shift[c0:c0 + 4]
        fast = not narrow and bool(np.all((r >= 2) & (r <= 22)))
        hs = sum(int(r[k] - 1) << (8 * k) for k in range(4)) if fast else -1
        words = [hs, *bias[c0:c0 + 4]]
        for k in range(4):
            cst = (1 << int(r[k] - 2)) + offset * (1 << int(r[k] - 1)) if fast else 0
            words += [int(m[c0 + k]), cst]
        if not unrolled:
            groups.append(words)
            continue
        # per tap, its weights already widened (one LDRD instead of LDR and two SXTB16 a tap)
        words += [_int16_pair(int(t[lo]), int(t[hi])) for t in taps[:, c0:c0 + 4] for lo, hi in ((0, 2), (1, 3))]
        # per window column, the sums of its weights over the rows as int16 pairs (c0, c2) and (c1, c3):
        # a left / right edge pixel multiplies a padded column's sum by the zero point once
        sums = w.reshape(w.shape[1], w.shape[2], -1)[:, :, c0:c0 + 4].astype(np.int64).sum(axis=0)  # (kw, 4)
        words += [_int16_pair(int(s[lo]), int(s[hi])) for s in sums for lo, hi in ((0, 2), (1, 3))]
        groups.append(words)
    return np.array(groups, dtype=np.int64).reshape(-1).astype(np.int32)


FC_ROWS4_MIN_SHARE = 0.01  # fully connected layers doing less of a model's MACs keep ek_fully_connected_s8


def _fc_rows4_shape(graph: Graph, op: Op) -> bool:
    if op.kind != "fully_connected":
        return False
    out_c, in_c = graph.tensors[op.inputs[1]].shape
    return out_c >= 4 and in_c >= 4


def fc_rows4_layers(graph: Graph) -> set[str]:
    """The dense int8 fully connected layers that run the Cortex-M DSP kernel that never sign-extends
    its weights (kernels/dsp/ek_fully_connected_s8_rows4): those with at least four rows and four
    inputs, when together they do at least FC_ROWS4_MIN_SHARE of the model's MACs. Otherwise (a
    classifier's last layer after convolutions) they keep ek_fully_connected_s8, which is then built
    from its portable source for size (project.cold_kernels): the kernel's code would buy nothing."""
    fc = [op for op in graph.ops if _fc_rows4_shape(graph, op)]
    total = sum(layer_macs(graph, op) for op in graph.ops)
    if sum(layer_macs(graph, op) for op in fc) < FC_ROWS4_MIN_SHARE * total:
        return set()
    return {op.name for op in fc}


def pack_fc_rows4(w: np.ndarray) -> np.ndarray:
    """A fully connected layer's int8 weights (out_c, in_c) in the order ek_fully_connected_s8_rows4
    reads them: per group of eight rows (up to out_c & ~7, then one group of four), per block of four
    inputs, the group's rows' words [w0 ^ 0x80, w1, w2 ^ 0x80, w3] (the even bytes offset by 128: read
    as unsigned they are w + 128, see the kernel); then the group's in_c % 4 last weights, row after
    row; then the out_c % 4 last rows, unchanged. The same bytes as the plain filter, reordered (no
    flash grows)."""
    out_c, in_c = w.shape
    full, vec_c, vec8 = in_c & ~3, out_c & ~3, out_c & ~7
    enc = w.astype(np.int8).view(np.uint8).copy()
    enc[:vec_c, 0:full:2] ^= 0x80
    parts = []
    for start, rows in [(g, 8) for g in range(0, vec8, 8)] + ([(vec8, 4)] if vec_c > vec8 else []):
        group = enc[start:start + rows]
        parts.append(group[:, :full].reshape(rows, full // 4, 4).transpose(1, 0, 2).reshape(-1))
        parts.append(group[:, full:].reshape(-1))
    parts.append(enc[vec_c:].reshape(-1))
    return np.concatenate(parts).view(np.int8)


FC_ROWS4_REC = 13  # words of a group's record (EK_FC4_REC)


def fc_rows4_records(graph: Graph, op: Op) -> np.ndarray:
    """ek_fully_connected_s8_rows4's records (int32). b: the folded bias plus, for the rows packed in
    groups of four, 128 * the sum of their odd-position weights among the in_c & ~3 first (the kernel's
    sums carry -128 times it), modulo 2^32. With one multiplier and one shift for the layer (TFLite's
    per-tensor weights), r = -shift in 2..22 and every accumulator below 2^30 in magnitude (|folded
    bias| + 128 * sum |w| per row): {r, m, 2c, 2b_0 .. 2b_out_c-1}, c = 2^(r - 2) + output_offset *
    2^(r - 1); the kernel keeps the sums doubled and its output stage is SMMLAR, ADD, ASR and SSAT per
    value. Otherwise {-1, 0, 0}, then FC_ROWS4_REC words per group of four rows (the last padded):
    {hs, b0..b3, m0, c0, m1, c1, m2, c2, m3, c3}, hs the four r - 1, one per byte; a group with a shift
    outside 2..22, and the group of the out_c % 4 last rows (computed apart), has hs = -1 and the
    shifts in place of the c: the generic stage."""
    w = graph.tensors[op.inputs[1]].data.astype(np.int64)
    a = op.attrs
    out_c, in_c = w.shape
    vec_c, full = out_c & ~3, in_c & ~3
    folded = folded_bias(graph, op).astype(np.int64)
    bias = folded.copy()
    bias[:vec_c] += 128 * w[:vec_c, 1:full:2].sum(axis=1)
    m, shift = a["multiplier"].astype(np.int64), a["shift"].astype(np.int64)
    offset = int(a["output_offset"])

    def const(r: int) -> int:
        return (1 << (r - 2)) + offset * (1 << (r - 1))

    small = int(np.max(np.abs(folded) + 128 * np.abs(w).sum(axis=1))) < 2 ** 30  # every |accumulator| < 2^30
    if np.all(m == m[0]) and np.all(shift == shift[0]) and 2 <= -int(shift[0]) <= 22 and small:
        r = -int(shift[0])
        words = [r, int(m[0]), 2 * const(r), *(2 * bias)]
    else:
        groups = (out_c + 3) // 4
        pad = 4 * groups - out_c
        bias, m, shift = (np.concatenate([v, np.zeros(pad, np.int64)]) for v in (bias, m, shift))
        words = [-1, 0, 0]
        for g in range(groups):
            rows = slice(4 * g, 4 * g + 4)
            r = -shift[rows]
            fast = 4 * g < vec_c and bool(np.all((r >= 2) & (r <= 22)))
            words += [sum(int(r[k] - 1) << (8 * k) for k in range(4)) if fast else -1, *bias[rows]]
            for k in range(4):
                words += [int(m[4 * g + k]), const(int(r[k])) if fast else int(shift[4 * g + k])]
    return (np.array(words, np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


X86_VNNI_MAX_K = 65536  # EK_X86_VNNI_MAX_K: the longest dot product the x86 VNNI path takes


def x86_u8_bias(graph: Graph, op: Op) -> np.ndarray:
    """The x86 variant's bias array of a dense convolution / fully connected layer: folded_bias, then
    -128 * sum(weights) per output channel. With VNNI (vpdpbusd: unsigned x signed bytes) the kernels
    read the int8 input x as u = x + 128, and sum w * u - 128 * sum w = sum w * x; the portable and
    the vpmaddwd paths read the first half only. Dot products longer than X86_VNNI_MAX_K (where
    sum w * u could pass 2^31) never take VNNI: no second half then."""
    bias = folded_bias(graph, op)
    w = graph.tensors[op.inputs[1]].data
    if w[0].size > X86_VNNI_MAX_K:
        return bias
    return np.concatenate([bias, (-128 * channel_weight_sums(graph, op)).astype(np.int32)])


def x86_conv_filter(w: np.ndarray) -> np.ndarray:
    """The x86 variant's filter array of a dense convolution: per 16-output-channel block, per group of 4
    taps, the 16 channels' 4 weights (pack_conv_tile(w, 4), rpi5's SDOT layout). Every path of
    kernels/x86/ek_conv2d_s8 reads it: the VNNI tile (one 32-byte load gives 8 channels' 4 weights for
    vpdpbusd against a pixel's 4 inputs broadcast), the AVX2 tile (16 bytes widened: 4 channels' 4 weights
    for vpmaddwd) and the scalar loop; output channels in vector lanes need no horizontal sums."""
    return pack_conv_tile(w, 4)


SDOT_PAD_COPY_MAX = 64 * 1024  # bytes of scratch rpi5's convolution may take for a padded copy of its input


def sdot_span(in_hw, out_hw, kernel, stride, dilation, padding) -> tuple[int, int, bool]:
    """Rows and columns of the input (with its padding) that a convolution's windows read, from the
    first window's corner, and whether they all lie inside the input (no padding read)."""
    span = [(o - 1) * s + (k - 1) * d + 1 for o, k, s, d in zip(out_hw, kernel, stride, dilation)]
    inside = padding[0] == 0 and padding[1] == 0 and span[0] <= in_hw[0] and span[1] <= in_hw[1]
    return span[0], span[1], inside


def layer_span(layer) -> tuple[int, int, bool]:
    """sdot_span of a planned convolution layer (its dims and kernel params)."""
    _, kh, kw, _ = layer.dims["filter"]
    _, in_h, in_w, _ = layer.dims["input"]
    _, out_h, out_w, _ = layer.dims["output"]
    p = layer.params
    return sdot_span((in_h, in_w), (out_h, out_w), (kh, kw), (p["stride_h"], p["stride_w"]),
                     (p["dilation_h"], p["dilation_w"]), (p["pad_top"], p["pad_left"]))


def sdot_widened_c(graph: Graph, op) -> int:
    """The input channels rpi5's SDOT convolution (a board with dotprod) packs this layer's filter for:
    in_c, or in_c rounded
    up to a multiple of 4 (zero weights in the added channels) when that adds at most a third more
    taps (in_c 3, 6, 7, 9-11, ...) and the input's padded span with the added channels fits
    SDOT_PAD_COPY_MAX: the kernel then reads its windows as runs from that copy (a VWW-like first
    layer over 3 channels: 4 taps per SDOT lane instead of windows gathered per pixel). in_c 1, 2 or
    5 keep their gathered windows (4x, 2x, 1.6x the SDOTs)."""
    in_c = nhwc(graph.tensors[op.inputs[0]].shape)[3]
    c4 = (in_c + 3) // 4 * 4
    if op.kind != "conv2d" or c4 == in_c or 3 * c4 > 4 * in_c:
        return in_c
    a = op.attrs
    _, in_h, in_w, _ = nhwc(graph.tensors[op.inputs[0]].shape)
    _, out_h, out_w, _ = nhwc(graph.tensors[op.outputs[0]].shape)
    _, kh, kw, _ = graph.tensors[op.inputs[1]].shape
    span_h, span_w, _ = sdot_span((in_h, in_w), (out_h, out_w), (kh, kw), a["stride"], a["dilation"],
                                  (a["padding"][0], a["padding"][2]))
    return c4 if span_h * span_w * c4 + 16 <= SDOT_PAD_COPY_MAX else in_c


def sdot_runs(layer) -> bool:
    """Whether rpi5's SDOT convolution reads this layer's windows as runs (kernels/neon/ek_conv2d_s8_sdot.j2):
    in_c (the filter's, sdot_widened_c) a multiple of 4, or window rows (dilation_w 1) of kw * in_c a
    multiple of 4 bytes (a 10x4 window over 1 channel), read from the padded copy. Else its windows
    are gathered."""
    _, _, kw, c4 = layer.dims["filter"]
    return c4 % 4 == 0 or (layer.params["dilation_w"] == 1 and kw * c4 % 4 == 0)


def sdot_pad_copy_bytes(layer) -> int:
    """Scratch of rpi5's convolution over in_c % 4 == 0 or widened (kernels/neon/ek_conv2d_s8_sdot.j2):
    the table of its windows' run offsets (one per 16-byte step when a run is a multiple of 16
    bytes; a run is a window row with dilation_w 1, else a tap), 16-byte aligned, then, when some
    window reaches into the padding or in_c is widened (the filter's channels, sdot_widened_c) or not a
    multiple of 4 (sdot_runs), the
    span of the input the windows read (rows x columns x channels, zero points in the padding) and
    16 bytes for loads past a run's end, so that every window is read in place without bounds. Only
    the table when that span is over SDOT_PAD_COPY_MAX bytes (the kernel then takes its run-pointer
    table)."""
    _, kh, kw, c4 = layer.dims["filter"]
    in_c = layer.dims["input"][3]
    runs, run_len = (kh, kw * c4) if layer.params["dilation_w"] == 1 else (kh * kw, c4)
    steps = runs * (run_len // 16 if run_len % 16 == 0 else 1)
    table = (4 * steps + 15) // 16 * 16
    span_h, span_w, inside = layer_span(layer)
    copy = 0 if inside and c4 == in_c and c4 % 4 == 0 else span_h * span_w * c4 + 16
    return table + copy if copy <= SDOT_PAD_COPY_MAX else table


X86_PAD_COPY_MAX = 128 * 1024  # bytes of scratch the x86 VNNI convolution may take for a padded copy of its input


def x86_pad_copy_bytes(layer) -> int:
    """Scratch of the x86 VNNI convolution tile (kernels/x86/ek_conv2d_s8) over in_c % 4 == 0: the span of
    the input its windows read (rows x columns x channels, zero points in the padding) as u8, so that each
    window is read in place as runs of whole groups of 4 taps; 0 (the tile gathers each window) for other
    in_c or a span over X86_PAD_COPY_MAX bytes. The kernel takes the copy when the scratch has room."""
    in_c = layer.dims["input"][3]
    span_h, span_w, _ = layer_span(layer)
    copy = span_h * span_w * in_c
    return copy if in_c % 4 == 0 and copy <= X86_PAD_COPY_MAX else 0


DW_PAD_COPY_MAX = 64 * 1024  # bytes of scratch the NEON 3x3 depthwise may take for its padded bands of input rows


def dw_pad_copy_bytes(layer) -> int:
    """Scratch of the NEON 3x3 depthwise (kernels/neon/ek_depthwise_conv2d_s8.c.j2, ek_dw_neon_3x3): a
    copy of the input rows a band of output rows reads, over the columns its windows read, with the
    padding filled with zero points, so that every pixel reads its nine taps at fixed offsets (no
    border tests). All rows when that is at most DW_PAD_COPY_MAX bytes, else as many output rows a band
    as that holds, at least one (the kernel fits its bands to the scratch it finds)."""
    _, in_h, in_w, in_c = layer.dims["input"]
    _, out_h, out_w, _ = layer.dims["output"]
    p = layer.params
    cols = (out_w - 1) * p["stride_w"] + 2 * p["dilation_w"] + 1
    one_band = (2 * p["dilation_h"] + 1) * cols * in_c
    every_row = ((out_h - 1) * p["stride_h"] + 2 * p["dilation_h"] + 1) * cols * in_c
    return min(every_row, max(DW_PAD_COPY_MAX, one_band))


PAIRS_PAD_COPY_MAX = SDOT_PAD_COPY_MAX  # the same cap for rpi4's pair convolution's padded copy


def pairs_pad_copy_bytes(layer) -> int:
    """Scratch of rpi4's pair convolution (kernels/neon/ek_conv2d_s8_pairs.j2) with the padded copy of its
    input: when some window reaches into the padding, the span of the input the windows read (rows x
    columns x in_c, zero points in the padding) and 16 bytes for loads past a row's last group, after
    the scratch it takes otherwise (the run table, offsets and zero-point row, or the gathered windows
    and row offsets) rounded up to 16 bytes; 0 when every window lies inside the input or the span is
    over PAIRS_PAD_COPY_MAX bytes (the kernel then reads the input as before). The kernel decides
    by ek_kernel_scratch_bytes with the same sums."""
    _, kh, kw, in_c = layer.dims["filter"]
    span_h, span_w, inside = layer_span(layer)
    used = 36 * kh * kw + in_c if in_c % 4 == 0 else 4 * kh * ((kw * in_c + 3) // 4 * 4) + 4 * kh
    copy = span_h * span_w * in_c + 16
    return 0 if inside or copy > PAIRS_PAD_COPY_MAX else (used + 15) // 16 * 16 + copy


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
    to whole 16-byte (SDOT) or 8-byte loads (rpi5, and rpi4's pair tile, with in_c a multiple of 4: no gather, a table of
    4 run pointers and an offset per tap and a row of in_c zero points instead); the NEON depthwise kernel keeps the tap table
    (64-bit pointers) and the zero-point row, or for a 3x3 filter padded bands of input rows (dw_pad_copy_bytes). Kernels in ``portable`` are built from their portable
    source (project.cold_kernels) and need none of the variant's scratch."""
    need = 0
    for layer in layers:
        variant = None if layer.kernel in portable else board.get("kernel_variant")
        _, kh, kw, k_in = layer.dims.get("filter", (0, 0, 0, 0))
        if layer.kernel == "ek_conv2d_s8_4x2":  # four pixels' windows as int16, whole or in chunks
            need = max(need, layer.params["scratch_4x2"])
        elif layer.kernel in ("ek_conv2d_s8", "ek_conv2d_s8_pairs") and variant in ("dsp", "x86", "neon"):
            # four pixels' windows for the NEON register tile, rounded up to whole loads (SDOT 16
            # bytes, rpi4 8)
            load = 16 if board.get("dotprod") else 8
            windows = 4 * ((kh * kw * k_in + load - 1) // load * load) if variant == "neon" else \
                (4 if variant == "dsp" else 2) * kh * kw * k_in
            if variant == "x86" and layer.kernel == "ek_conv2d_s8":
                # the VNNI tile gathers four pixels' windows as u8, the AVX2 tile two as int16, K rounded up
                # to whole groups of 4 taps; the VNNI tile over in_c % 4 == 0 reads a padded u8 copy of the
                # input span instead when there is room (x86_pad_copy_bytes)
                windows = max(4 * ((kh * kw * k_in + 3) // 4 * 4), x86_pad_copy_bytes(layer))
            if variant == "neon" and layer.kernel == "ek_conv2d_s8_pairs" and k_in % 4 == 0:
                # rpi4's pair tile reads such windows in place: 4 run pointers and an int32 offset per tap,
                # a row of in_c zero points (the gathered windows of other shapes need the 4 x K above)
                windows = max(windows, 36 * kh * kw + k_in)
            elif variant == "neon" and board.get("dotprod") and sdot_runs(layer):
                # rpi5 reads such windows as runs: a table of run offsets and, when windows reach into
                # the padding, the padded span of the input (sdot_pad_copy_bytes); without room for
                # that, 4 run pointers and an int32 offset per tap, a row of in_c zero points (the
                # gathered windows of other shapes need the 4 x K above)
                windows = max(windows, 36 * kh * kw + k_in, sdot_pad_copy_bytes(layer))
            elif variant == "neon" and layer.kernel == "ek_conv2d_s8_pairs":
                # rpi4's pair tile over 1-3 channels: four windows of kh rows padded to whole groups of 4,
                # then an int32 offset per row
                windows = 4 * kh * ((kw * k_in + 3) // 4 * 4) + 4 * kh
            if variant == "neon" and layer.kernel == "ek_conv2d_s8_pairs":
                # and, when windows reach into the padding, the padded copy of the span they read
                windows = max(windows, pairs_pad_copy_bytes(layer))
            need = max(need, windows)
        elif layer.kernel == "ek_fully_connected_s8_rows4":  # row sums, the input as (P, Q) pairs in chunks
            out_c, _, _, in_c = layer.dims["filter"]
            need = max(need, 4 * min(out_c & ~3, FC_DSP_CHUNK) + 2 * min(in_c & ~3, FC_DSP_WIDEN_BYTES // 2))
        elif layer.kernel == "ek_fully_connected_s8" and variant == "dsp":
            sums = 4 * min(max(layer.dims["filter"][0] & ~3, 4), FC_DSP_CHUNK)  # never 0: defined
            widened = 4 * ((layer.dims["filter"][3] + 1) // 2)  # the input as int16 pairs
            # a short input is widened once (44 instead of 48 instructions per 32 MACs) for at most
            # FC_DSP_WIDEN_BYTES more RAM; a longer one is sign-extended in the loop unless other layers'
            # scratch has room for it anyway (the kernel decides by ek_kernel_scratch_bytes)
            need = max(need, sums + widened if widened <= FC_DSP_WIDEN_BYTES else sums)
        elif layer.kernel == "ek_depthwise_conv2d_s8" and variant == "dsp":
            need = max(need, 4 * kh * kw + 4 * (layer.dims["output"][3] & ~3) + layer.dims["input"][3])
        elif layer.kernel == "ek_lstm_s8":  # every board: the int16 cell state and four gates
            need = max(need, 2 * 5 * layer.params["hidden"])
        elif layer.kernel in ("ek_depthwise_conv2d_s8", "ek_depthwise_conv2d_s8_pairs") and variant == "neon":
            need = max(need, dw_pad_copy_bytes(layer) if (kh, kw) == (3, 3) else 8 * kh * kw + layer.dims["input"][3])
    return (need + 7) // 8 * 8


# The Cortex-M DSP kernels that call their portable loop for shapes or parameters they do not handle.
DSP_FALLBACK_KERNELS = ("ek_conv2d_s8", "ek_add_s8", "ek_fully_connected_s8", "ek_conv2d_s8_4x2",
                        "ek_fully_connected_s8_rows4")


def dsp_fallbacks_unused(graph: Graph, layers, board, scratch: int, portable=()) -> list[str]:
    """The kernels of DSP_FALLBACK_KERNELS this model uses whose portable fallback no layer reaches:
    the project builds them without it (EK_<KERNEL>_FALLBACK 0 in ek_nn.h), since the fallback's
    code is most of a kernel's flash again (ResNet-8: 1.7 KB). "ek_conv2d_s8_shift_any" in the list:
    no dense convolution has a channel shift >= 0, so the DSP convolution drops that output stage
    (EK_CONV2D_S8_SHIFT_ANY 0, 0.5 KB). "ek_conv2d_s8_4x2_chunked": no 4x2 layer gathers its
    windows in chunks (EK_CONV2D_S8_4X2_CHUNKED 0, 1.6 KB). "ek_conv2d_s8_4x2_narrow" / "_wide": no 4x2
    layer's activation narrows / keeps [-128, 127] (conv_4x2_narrow), so the kernel's output stage is
    built in one of its two forms (EK_CONV2D_S8_4X2_NARROW / _WIDE 0, ResNet-8: ~1 KB);
    "ek_conv2d_s8_4x2_any": no 4x2 record takes the generic stage (conv_4x2_generic;
    EK_CONV2D_S8_4X2_ANY 0, which also drops a test per channel); "ek_conv2d_s8_4x2_dilated" /
    "_constants": no 4x2 layer has a dilation > 1 / a channel of zero weights (EK_CONV2D_S8_4X2_DILATED /
    _CONSTANTS 0: the gathers' dilation is the constant 1, the constant channels' loop is left out).
    "ek_add_s8_loop": the add's tables
    are on (add_tables) and every DSP add layer is long enough for them (ADD_TABLE_MIN elements), so
    the add is built with the table path alone (EK_ADD_S8_LOOP 0; a row band of such a layer shorter
    than that then takes the tables too: the same result); "ek_add_s8_table_zero" / "_narrow" /
    "_wide": no add layer that takes the tables has an output shift of 0 / an activation narrowing
    [-128, 127] / neither (EK_ADD_S8_TABLE_ZERO / _NARROW / _WIDE 0: that form of the table loop is
    left out). The tests mirror the first lines of
    each kernel in kernels/dsp (a change there must change them here; test_kernels_dsp runs every
    shape class against both); ``scratch``: the planned scratch bytes; ``portable``: kernels built
    from their portable source anyway (project.cold_kernels)."""
    if board.get("kernel_variant") != "dsp":
        return []
    used, reached = set(), set()
    chunked = False  # a 4x2 layer whose windows are gathered in chunks (its K-chunked form)
    shift_any = False  # a dense convolution with a channel shift >= 0: its out-of-line output stage
    forms_4x2 = set()  # "narrow" / "wide" / "any": the 4x2 output stages some layer takes
    add_short = False  # a DSP add layer shorter than the tables pay for: the add's loop without them
    forms_add = set()  # "zero" / "narrow" / "wide": the table loop's forms the long add layers take
    for layer in layers:
        k = layer.kernel
        if k not in DSP_FALLBACK_KERNELS or k in portable:
            continue
        used.add(k)
        if k == "ek_conv2d_s8":
            _, kh, kw, _ = layer.dims["filter"]
            k_len = kh * kw * layer.dims["input"][3]
            fallback = 4 * k_len > scratch or k_len < 4
            shift_any = shift_any or (not fallback and int(np.max(graph.ops[layer.index].attrs["shift"])) >= 0)
        elif k == "ek_conv2d_s8_4x2":  # its portable form over the packed filter: a scratch too small
            _, kh, kw, k_in = layer.dims["filter"]
            kc, k4 = conv_4x2_chunk(kh * kw * k_in, layer.params["pairs_4x2"], scratch), (kh * kw * k_in + 3) // 4 * 4
            fallback = kc < k4 and kc < CONV_4X2_CHUNK_MIN
            chunked = chunked or (not fallback and kc < k4)
            op = graph.ops[layer.index]
            if not fallback:  # the portable form has its own output stage
                forms_4x2.add("narrow" if conv_4x2_narrow(op) else "wide")
                forms_4x2 |= {"any"} if conv_4x2_generic(graph, op) else set()
                forms_4x2 |= {"dilated"} if max(op.attrs.get("dilation", (1, 1))) > 1 else set()
                forms_4x2 |= {"constants"} if conv_4x2_layout(graph, op)[1][1] > 0 else set()
        elif k == "ek_add_s8":
            p = layer.params
            same = all(layer.dims[r][1:] == layer.dims["output"][1:] for r in ("input1", "input2"))
            fallback = (p["left_shift"] > 22 or max(p["input1_shift"], p["input2_shift"], p["output_shift"]) > 0
                        or not same)
            long_add = int(np.prod(layer.dims["output"])) >= ADD_TABLE_MIN
            add_short = add_short or (not fallback and not long_add)
            if not fallback and long_add:
                narrow = p["act_min"] > -128 or p["act_max"] < 127
                forms_add.add("zero" if p["output_shift"] == 0 else "narrow" if narrow else "wide")
        elif k == "ek_fully_connected_s8_rows4":  # a chunk of row sums and one block of 4 inputs' pairs
            fallback = 4 * min(layer.dims["filter"][0] & ~3, FC_DSP_CHUNK) + 8 > scratch
        else:  # fully connected: the sums of a chunk of rows must fit the scratch
            vec_c = layer.dims["filter"][0] & ~3
            fallback = 4 * min(vec_c, FC_DSP_CHUNK) > scratch
        if fallback:
            reached.add(k)
    unused = sorted(used - reached)
    unused += ["ek_conv2d_s8_shift_any"] if "ek_conv2d_s8" in used and not shift_any else []
    if "ek_conv2d_s8_4x2" in used:
        unused += [] if chunked else ["ek_conv2d_s8_4x2_chunked"]
        unused += [f"ek_conv2d_s8_4x2_{form}" for form in ("narrow", "wide", "any", "dilated", "constants")
                   if form not in forms_4x2]
    if "ek_add_s8" in used and add_tables(layers, board, scratch, portable):
        unused += [] if add_short else ["ek_add_s8_loop"]
        unused += [f"ek_add_s8_table_{form}" for form in ("zero", "narrow", "wide") if form not in forms_add]
    return unused


ADD_TABLE_BYTES = 2 * 256 * 4  # the DSP add's two rescale tables (int32 per int8 value of each input)
ADD_TABLE_MIN = 256  # elements from which the tables pay (EK_ADD_TABLE_MIN in kernels/dsp/ek_add_s8)


def add_tables(layers, board, scratch: int, portable=()) -> bool:
    """Whether the Cortex-M DSP add builds its inputs' rescale tables in the scratch (EK_ADD_S8_TABLES):
    a long add (>= ADD_TABLE_MIN elements) then costs two table loads, a sum and the output stage per
    element instead of three rescales. Only when the other layers' scratch already holds the tables
    (``scratch`` >= ADD_TABLE_BYTES), so no model needs more RAM for them."""
    if board.get("kernel_variant") != "dsp" or "ek_add_s8" in portable or scratch < ADD_TABLE_BYTES:
        return False
    return any(layer.kernel == "ek_add_s8" and int(np.prod(layer.dims["output"])) >= ADD_TABLE_MIN
               for layer in layers)


DW_DSP_MAX_TAPS = 25  # the largest window (kh * kw) the DSP depthwise kernel unrolls
DW_DSP_MAX_OFFSET = 4095  # Thumb-2 LDR's immediate: every tap's byte offset fits in the instruction
# Flash the unrolled interior code may take per model: one geometry costs about 88 bytes a tap (a pixel pair's
# 12-15 instructions and a single pixel's 9, 32-bit each) and 480 bytes of output stage and loop (measured with
# arm-none-eabi-gcc 12 -O2: 1,248-1,328 B for a 3x3 since the weights are widened at generate time, 1,484 B
# before, 2.3 KB before the records). The geometries that save the most get it first. 9 KB: VWW's non-weight
# flash stays near 0.2x of TFLM's runtime (goal <= 0.25x) with most of its nine geometries unrolled.
DW_DSP_CODE_BUDGET = 9000
DW_DSP_TAP_BYTES = 88
DW_DSP_BODY_BYTES = 480
# A left / right edge function (one pixel, some window columns in the padding): ~32 bytes a tap + 160
# (406-446 B for a 3x3; 518 B before the weights were widened at generate time).
DW_DSP_EDGE_TAP_BYTES = 32
DW_DSP_EDGE_BODY_BYTES = 160
# A pair function (two neighbouring pixels whose window rows are inside, one or both with window columns
# in the padding): ~64 bytes a tap + 300.
DW_DSP_PAIR_TAP_BYTES = 64
DW_DSP_PAIR_BODY_BYTES = 300


def _dw_dsp_geometry(layer) -> tuple | None:
    """The key (in_w, in_c, kh, kw, stride_w, dil_h, dil_w) the DSP depthwise kernel matches a layer's
    unrolled code by (ek_dw_interior), or None for a layer that cannot have any."""
    if layer.kernel != "ek_depthwise_conv2d_s8" or layer.params.get("depth_multiplier", 1) != 1:
        return None
    _, _, in_w, in_c = layer.dims["input"]
    _, kh, kw, out_c = layer.dims["filter"]
    if out_c < 4 or in_c != out_c:
        return None
    p = layer.params
    return in_w, in_c, kh, kw, p["stride_w"], p["dilation_h"], p["dilation_w"]


def depthwise_dsp_unrolled(layer, shapes: list[dict]) -> bool:
    """Whether the kernel runs unrolled code for this layer (its geometry is one of ``shapes``,
    depthwise_dsp_shapes): only then do its records hold the taps' weights and column sums. The same
    rule as the kernel's run-time match, which picks the records' length from it."""
    key = _dw_dsp_geometry(layer)
    return key is not None and any(key == tuple(s[k] for k in _DW_DSP_KEY) for s in shapes)


_DW_DSP_KEY = ("in_w", "in_c", "kh", "kw", "stride_w", "dil_h", "dil_w")


def depthwise_dsp_shapes(layers, board) -> list[dict]:
    """The window geometries the Cortex-M DSP depthwise kernel gets an unrolled interior path for:
    the distinct (input width and channels, window, stride_w, dilation) of the model's dense int8
    depthwise layers with a depth multiplier of 1 and at least four channels. For an output pixel
    whose window lies inside the input, each tap's input and filter byte offsets (from the window's
    top-left pixel, channel c) are constants of the geometry, so the generated code reads them as LDR
    immediates: no tap table, no bounds checks, no loop counter. ``step`` is the next output pixel's
    offset (stride_w * channels), for the pair path. Each geometry costs flash, so the ones whose
    interior pixels save the most (estimated from their count and channels) are unrolled first,
    within DW_DSP_CODE_BUDGET; the others, windows larger than
    DW_DSP_MAX_TAPS and offsets past an LDR immediate keep the tap-table path (the kernel matches
    the layer's shape at run time)."""
    if board.get("kernel_variant") != "dsp":
        return []
    found: dict[tuple, dict] = {}
    for layer in layers:
        key = _dw_dsp_geometry(layer)
        if key is None:
            continue
        in_w, in_c, kh, kw = key[:4]
        out_c = in_c
        p = layer.params
        if kh * kw > DW_DSP_MAX_TAPS:
            continue
        taps = [((ky * p["dilation_h"] * in_w + kx * p["dilation_w"]) * in_c, (ky * kw + kx) * out_c)
                for ky in range(kh) for kx in range(kw)]
        step = p["stride_w"] * in_c
        if max(t[0] for t in taps) + step > DW_DSP_MAX_OFFSET or max(t[1] for t in taps) > DW_DSP_MAX_OFFSET:
            continue
        shape = found.setdefault(key, dict(zip(_DW_DSP_KEY, key),
                                           taps=taps, step=step, macs=0, gain=0, edges={}, pairs={}))
        shape["macs"] += layer.macs
        # what the interior code saves, for ranking the geometries: per interior pixel its tap table
        # (~8 instructions a tap) and ~15 instructions per channel (measured on the MLPerf Tiny layers:
        # 17 per 8 MACs against 14 per 4 plus the loop's call)
        (_, out_h, out_w, _), (_, in_h, _, _) = layer.dims["output"], layer.dims["input"]
        rows_in = sum(1 for oy in range(out_h) if 0 <= oy * p["stride_h"] - p["pad_top"] and
                      oy * p["stride_h"] - p["pad_top"] + (kh - 1) * p["dilation_h"] < in_h)
        cols_in = sum(1 for ox in range(out_w) if 0 <= ox * p["stride_w"] - p["pad_left"] and
                      ox * p["stride_w"] - p["pad_left"] + (kw - 1) * p["dilation_w"] < in_w)
        shape["gain"] += rows_in * cols_in * (8 * kh * kw + 15 * in_c)
        # border pixels (some of the window in the padding): the window rows and columns inside the input,
        # counted per kind (rows inside ky0..ky1 - 1, columns kx0..kx1 - 1)
        row_kinds = _inside_counts(out_h, p["stride_h"], p["pad_top"], kh, p["dilation_h"], in_h)
        col_kinds = _inside_counts(out_w, p["stride_w"], p["pad_left"], kw, p["dilation_w"], in_w)
        for (ky0, ky1), n_rows in row_kinds.items():
            for (kx0, kx1), n_cols in col_kinds.items():
                if (ky1 - ky0, kx1 - kx0) != (kh, kw):
                    edge = (ky0, ky1, kx0, kx1)
                    macs = n_rows * n_cols * (ky1 - ky0) * (kx1 - kx0) * out_c
                    shape["edges"][edge] = shape["edges"].get(edge, 0) + macs
        for pair, n in _border_pairs(out_h, out_w, p, kh, kw, in_h, in_w).items():
            shape["pairs"][pair] = shape["pairs"].get(pair, 0) + n * out_c
    chosen, spent = [], 0
    for shape in sorted(found.values(), key=lambda s: -s["gain"]):
        cost = DW_DSP_BODY_BYTES + DW_DSP_TAP_BYTES * len(shape["taps"])
        if spent + cost <= DW_DSP_CODE_BUDGET:
            chosen.append(shape)
            spent += cost
    # then the edge functions of the chosen geometries (left / right border pixels whose rows are inside),
    # most MACs first, in what is left of the budget
    edges = sorted(((macs, i, edge) for i, shape in enumerate(chosen) for edge, macs in shape["edges"].items()),
                   key=lambda e: -e[0])
    kept: dict[int, list] = {}
    for _, i, edge in edges:
        cost = DW_DSP_EDGE_BODY_BYTES + DW_DSP_EDGE_TAP_BYTES * len(chosen[i]["taps"])
        if spent + cost <= DW_DSP_CODE_BUDGET:
            spent += cost
            kept.setdefault(i, []).append(_edge_taps(chosen[i], *edge))
    # then pair functions (a border pixel beside an interior one, or two border pixels, all window rows
    # inside: the weights loaded once for both, ~20 instructions per four channels less than two single
    # pixels), most pixels first, in what is left
    pairs = sorted(((n, i, pair) for i, shape in enumerate(chosen) for pair, n in shape["pairs"].items()),
                   key=lambda e: -e[0])
    kept_pairs: dict[int, list] = {}
    for _, i, pair in pairs:
        cost = DW_DSP_PAIR_BODY_BYTES + DW_DSP_PAIR_TAP_BYTES * len(chosen[i]["taps"])
        taps = _pair_taps(chosen[i], *pair)
        if taps is not None and spent + cost <= DW_DSP_CODE_BUDGET:
            spent += cost
            kept_pairs.setdefault(i, []).append(taps)
    return [{**{k: v for k, v in shape.items() if k not in ("edges", "pairs")}, "id": i, "edges": kept.get(i, []),
             "pairs": kept_pairs.get(i, [])}
            for i, shape in enumerate(chosen)]


def _border_pairs(out_h: int, out_w: int, p: dict, kh: int, kw: int, in_h: int, in_w: int) -> dict:
    """{(a0, a1, b0, b1): count} of the pixel pairs the DSP depthwise kernel could run as one pair
    function: neighbours (ox, ox + 1) from an even pixel index (the in-place contract, as the interior
    pairs) in rows whose window rows are all inside, both with window columns inside (a0 .. a1 - 1 and
    b0 .. b1 - 1), not both wholly inside (that is the interior pair)."""
    def cols(ox):
        inside = [t for t in range(kw) if 0 <= ox * p["stride_w"] - p["pad_left"] + t * p["dilation_w"] < in_w]
        return (inside[0], inside[-1] + 1) if inside else None
    kinds = [cols(ox) for ox in range(out_w)]
    counts: dict[tuple, int] = {}
    for oy in range(out_h):
        y0 = oy * p["stride_h"] - p["pad_top"]
        if y0 < 0 or y0 + (kh - 1) * p["dilation_h"] >= in_h:
            continue
        for ox in range((oy * out_w) % 2, out_w - 1, 2):
            a, b = kinds[ox], kinds[ox + 1]
            if a is not None and b is not None and (a, b) != ((0, kw), (0, kw)):
                counts[(*a, *b)] = counts.get((*a, *b), 0) + 1
    return counts


def _pair_taps(shape: dict, a0: int, a1: int, b0: int, b1: int) -> dict | None:
    """A pair function's taps: per tap (weight index, pixel A's input offset, pixel B's) from A's first
    inside column of the window's first row (None: the tap's column is in the padding, added once per
    column from the records' column sums), and the padded columns of each; None when an offset does not
    fit an LDR immediate (or B's window would start before A's first inside column)."""
    col = shape["dil_w"] * shape["in_c"]
    row = shape["dil_h"] * shape["in_w"] * shape["in_c"]
    taps = []
    for ky in range(shape["kh"]):
        for kx in range(shape["kw"]):
            off_a = ky * row + (kx - a0) * col if a0 <= kx < a1 else None
            off_b = ky * row + (kx - a0) * col + shape["step"] if b0 <= kx < b1 else None
            if any(o is not None and not 0 <= o <= DW_DSP_MAX_OFFSET for o in (off_a, off_b)):
                return None
            taps.append((ky * shape["kw"] + kx, off_a, off_b))
    return {"a0": a0, "a1": a1, "b0": b0, "b1": b1, "taps": taps,
            "pad_a": [kx for kx in range(shape["kw"]) if not a0 <= kx < a1],
            "pad_b": [kx for kx in range(shape["kw"]) if not b0 <= kx < b1]}


def _inside_counts(out_n: int, stride: int, pad: int, k: int, dilation: int, size: int) -> dict:
    """{(k0, k1): number of output rows (or columns) whose window taps k0 .. k1 - 1 lie inside the
    input} along one axis, for the windows with at least one tap inside (ek_dw_tap_range's ranges)."""
    counts: dict[tuple, int] = {}
    for o in range(out_n):
        inside = [t for t in range(k) if 0 <= o * stride - pad + t * dilation < size]
        if inside:
            key = (inside[0], inside[-1] + 1)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _edge_taps(shape: dict, ky0: int, ky1: int, kx0: int, kx1: int) -> dict:
    """A border function's taps: input offsets from the first inside row and column's pixel (None for
    a tap in the padding, which adds weight x zero point), filter offsets as in the interior."""
    taps = []
    for ky in range(shape["kh"]):
        for kx in range(shape["kw"]):
            f_off = (ky * shape["kw"] + kx) * shape["in_c"]
            if ky0 <= ky < ky1 and kx0 <= kx < kx1:
                in_off = ((ky - ky0) * shape["dil_h"] * shape["in_w"] + (kx - kx0) * shape["dil_w"]) * shape["in_c"]
                taps.append((in_off, f_off))
            else:
                taps.append((None, f_off))
    return {"ky0": ky0, "ky1": ky1, "kx0": kx0, "kx1": kx1, "taps": taps}
