"""Triton kernels of softmax splatting: the same fused design and math as the CUDA kernels
(``csrc/cuda/kernels.cuh``, ``csrc/taps.h``); this module imports Triton, so only the Triton
backend imports it, lazily.

Forward: one lane per source pixel and block of lanes adds the block's weighted channels (and
the weight, the normaliser's lane) to its four taps of a pixel-major accumulator with
``tl.atomic_add``, a target's lanes side by side in quads (vector atomics on sm_90), then a
second kernel writes the result planes from it, divided, and the normaliser. Backward: one
lane per target pixel prepares ``gN = grad / D'`` and ``gD``, then one lane per source pixel
gathers from its taps and writes only its own gradients: no atomics. Sizes are widened to 64
bits on entry, so every index and product of sizes is 64-bit; sizes are never specialised (a
size of 1 stays a runtime value, as it does for every other size). Atomics are relaxed:
splatting needs no ordering between them. The launcher disables FMA contraction (docs/spec.md,
floating point).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..modes import EPS as _EPS
from ..modes import Kind, Normalisation

# The mode codes (softsplat.modes) as compile-time constants of the kernels.
SUM, AVG, LINEAR, SOFT, STABLE, MAX = (tl.constexpr(int(k)) for k in Kind)
ADDEPS, ZEROEPS, CLIPEPS, RAW = (tl.constexpr(int(k)) for k in Normalisation)
EPS = tl.constexpr(_EPS)


@triton.jit
def _wide(size):
    """``size`` as a 64-bit scalar, whether the launcher passed it as a runtime integer or, as
    Inductor passes every integer argument equal to 1, as a Python ``int`` constexpr (which has
    no ``.to``)."""
    return tl.cast(size, tl.int64)


@triton.jit
def _taps(pixel, flow_ptr, sfn, sfc, sfy, sfx, H, W, ACC: tl.constexpr):
    """Target coordinates, corner and bilinear weights of every pixel; `lands` is false for a
    non-finite target or one entirely outside (checked in floating point, before conversion)."""
    x = pixel % W
    y = (pixel // W) % H
    n = pixel // (W * H)
    base = n * sfn + y * sfy + x * sfx
    fx = x.to(ACC) + tl.load(flow_ptr + base).to(ACC)
    fy = y.to(ACC) + tl.load(flow_ptr + base + sfc).to(ACC)
    lands = (fx >= -1.0) & (fx < W.to(ACC)) & (fy >= -1.0) & (fy < H.to(ACC))  # NaN fails
    fx = tl.where(lands, fx, 0.0)
    fy = tl.where(lands, fy, 0.0)
    x0f = tl.floor(fx)
    y0f = tl.floor(fy)
    x0 = x0f.to(tl.int64)
    y0 = y0f.to(tl.int64)
    east = fx - x0f
    west = x0f + 1.0 - fx
    south = fy - y0f
    north = y0f + 1.0 - fy
    return n, x, y, lands, x0, y0, east, west, south, north


@triton.jit
def _weight(metric_ptr, n, x, y, smn, smy, smx, mask, KIND: tl.constexpr, ACC: tl.constexpr):
    """1, metric or exp(metric); no maximum subtracted, exactly the reference. STABLE and MAX:
    the metric itself (each tap's weight is _tap_weight)."""
    if KIND == LINEAR or KIND == STABLE or KIND == MAX:
        return tl.load(metric_ptr + n * smn + y * smy + x * smx, mask=mask, other=0.0).to(ACC)
    elif KIND == SOFT:
        return tl.exp(tl.load(metric_ptr + n * smn + y * smy + x * smx, mask=mask, other=0.0).to(ACC))
    else:
        return tl.full(x.shape, 1.0, ACC)


@triton.jit
def _tap_weight(m, max_ptr, target, keep, KIND: tl.constexpr):
    """STABLE: exp(metric - M(target)); 0 where M is -inf (only metrics of -inf landed there).
    MAX (max_weight of taps.h): 1 where metric == M(target), else 0; 0 where M is -inf, NaN
    where M is NaN."""
    reached = tl.load(max_ptr + target, mask=keep, other=float("-inf"))
    if KIND == MAX:
        wins = tl.where(keep & (reached != float("-inf")) & (m == reached), 1.0, 0.0)
        return tl.where(reached != reached, reached, wins)
    else:
        return tl.where(keep & (reached != float("-inf")), tl.exp(m - reached), 0.0)  # NaN stays NaN


@triton.jit
def _atomic_float_max(ptr, value, mask, ACC: tl.constexpr):
    """``*ptr = max(*ptr, value)`` as replaces_maximum (taps.h) takes it, NaN winning, through
    integer atomics on the bits, so that compiled and interpreted kernels run the same logic:
    a non-negative float orders as its bits taken as a signed integer, a negative one inversely
    as its bits taken unsigned. Every NaN is first made the positive quiet NaN (which then beats
    every other value both ways) and -0.0 is made +0.0."""
    value = tl.where(value != value, float("nan"), value + 0.0)
    if ACC == tl.float64:
        signed = value.to(tl.int64, bitcast=True)
        tl.atomic_max(ptr.to(tl.pointer_type(tl.int64)), signed, mask=mask & (signed >= 0), sem="relaxed")
        tl.atomic_min(ptr.to(tl.pointer_type(tl.uint64)), value.to(tl.uint64, bitcast=True), mask=mask & (signed < 0),
                      sem="relaxed")
    else:
        signed = value.to(tl.int32, bitcast=True)
        tl.atomic_max(ptr.to(tl.pointer_type(tl.int32)), signed, mask=mask & (signed >= 0), sem="relaxed")
        tl.atomic_min(ptr.to(tl.pointer_type(tl.uint32)), value.to(tl.uint32, bitcast=True), mask=mask & (signed < 0),
                      sem="relaxed")


@triton.jit(do_not_specialize=["N", "H", "W"])
def _splat_max_kernel(flow_ptr, sfn, sfc, sfy, sfx, metric_ptr, smn, smy, smx, max_ptr, N, H, W,
                      KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """M of stable splatting, into max_ptr filled with -inf: an atomic max per kept tap; MAX:
    per kept tap of positive weight (counts_for_maximum of taps.h)."""
    N, H, W = _wide(N), _wide(H), _wide(W)
    pixel = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = pixel < N * H * W
    pixel = tl.where(valid, pixel, 0)
    n, x, y, lands, x0, y0, east, west, south, north = _taps(pixel, flow_ptr, sfn, sfc, sfy, sfx, H, W, ACC)
    lands = lands & valid
    m = tl.load(metric_ptr + n * smn + y * smy + x * smx, mask=valid, other=0.0).to(ACC)
    t_nw = n * H * W + y0 * W + x0
    if KIND == MAX:  # taps of weight 0 take no part
        on_nw = (west * north) > 0.0
        on_ne = (east * north) > 0.0
        on_sw = (west * south) > 0.0
        on_se = (east * south) > 0.0
    else:
        on_nw = lands
        on_ne = lands
        on_sw = lands
        on_se = lands
    _atomic_float_max(max_ptr + t_nw, m, lands & on_nw & (x0 >= 0) & (y0 >= 0), ACC)
    _atomic_float_max(max_ptr + t_nw + 1, m, lands & on_ne & (x0 + 1 <= W - 1) & (y0 >= 0), ACC)
    _atomic_float_max(max_ptr + t_nw + W, m, lands & on_sw & (x0 >= 0) & (y0 + 1 <= H - 1), ACC)
    _atomic_float_max(max_ptr + t_nw + W + 1, m, lands & on_se & (x0 + 1 <= W - 1) & (y0 + 1 <= H - 1), ACC)


@triton.jit
def _add_to_tap(target, v, b, w, keep, KIND: tl.constexpr):
    """One tap's share of the values v added at `target` where `keep`: b * v for sum, else
    b * (v * w), the oracle's order."""
    if KIND == SUM:
        tl.atomic_add(target, b * v, mask=keep, sem="relaxed")
    else:
        tl.atomic_add(target, b * (v * w), mask=keep, sem="relaxed")


@triton.jit(do_not_specialize=["N", "C", "H", "W", "LANES"])
def _splat_fwd_kernel(
    input_ptr, sin_n, sin_c, sin_y, sin_x,
    flow_ptr, sfn, sfc, sfy, sfx,
    metric_ptr, smn, smy, smx,
    max_ptr,  # STABLE, MAX: M [N, 1, H, W] contiguous
    acc_ptr,  # [N, H, W, LANES], contiguous, zeroed: the channels, the normaliser, padding
    N, C, H, W, LANES,
    KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, CHANNELS: tl.constexpr,
):
    """A program: BLOCK source pixels (axis 0) and a block of CHANNELS accumulator lanes (axis
    1: an image of few pixels and many channels still fills the device). Its lanes' values are
    loaded as one [BLOCK, CHANNELS] tile (the loads in flight together): the channels, 1 in the
    normaliser's lane (b * (1 * w) is b * w), 0 in the padding; and added to the four taps, the
    lanes of a target side by side in quads of four (LANES is a multiple of 4), so that sm_90
    takes a quad in one vector atomic add."""
    N, C, H, W, LANES = _wide(N), _wide(C), _wide(H), _wide(W), _wide(LANES)
    pixel = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = pixel < N * H * W
    pixel = tl.where(valid, pixel, 0)
    n, x, y, lands, x0, y0, east, west, south, north = _taps(pixel, flow_ptr, sfn, sfc, sfy, sfx, H, W, ACC)
    lands = lands & valid
    w = _weight(metric_ptr, n, x, y, smn, smy, smx, valid, KIND, ACC)
    in_w = x0 >= 0
    in_e = x0 + 1 <= W - 1
    in_n = y0 >= 0
    in_s = y0 + 1 <= H - 1
    keep_nw = lands & in_w & in_n
    keep_ne = lands & in_e & in_n
    keep_sw = lands & in_w & in_s
    keep_se = lands & in_e & in_s
    d_nw = n * H * W + y0 * W + x0  # tap offsets in [N, H, W]; masked where not kept
    b_nw = (west * north)[:, None]
    b_ne = (east * north)[:, None]
    b_sw = (west * south)[:, None]
    b_se = (east * south)[:, None]
    if KIND == STABLE or KIND == MAX:  # a weight per tap
        w_nw = _tap_weight(w, max_ptr, d_nw, keep_nw, KIND)[:, None]
        w_ne = _tap_weight(w, max_ptr, d_nw + 1, keep_ne, KIND)[:, None]
        w_sw = _tap_weight(w, max_ptr, d_nw + W, keep_sw, KIND)[:, None]
        w_se = _tap_weight(w, max_ptr, d_nw + W + 1, keep_se, KIND)[:, None]
    else:
        w_nw = w[:, None]
        w_ne = w[:, None]
        w_sw = w[:, None]
        w_se = w[:, None]
    # Each tap's first lane: a multiple of 4 (hinted, so that the adds can be vector ones).
    a_nw = tl.multiple_of(d_nw * LANES, 4)[:, None]
    a_ne = tl.multiple_of((d_nw + 1) * LANES, 4)[:, None]
    a_sw = tl.multiple_of((d_nw + W) * LANES, 4)[:, None]
    a_se = tl.multiple_of((d_nw + W + 1) * LANES, 4)[:, None]
    source = (n * sin_n + y * sin_y + x * sin_x)[:, None]
    # The lane blocks from this program's, every (programs of axis 1) blocks: one block per
    # program, unless LANES has more blocks than the launcher gives that axis (CHANNEL_PROGRAMS).
    for first in range(tl.program_id(1).to(tl.int64) * CHANNELS, LANES, tl.num_programs(1).to(tl.int64) * CHANNELS):
        lane = tl.max_contiguous(tl.multiple_of(first + tl.arange(0, CHANNELS).to(tl.int64), 4), 4)[None, :]
        # Whole quads in or out (the mask constant over each, as a vector add needs it).
        in_block = (first + (tl.arange(0, CHANNELS) // 4 * 4).to(tl.int64))[None, :] < LANES
        v = tl.load(input_ptr + source + lane * sin_c, mask=lands[:, None] & (lane < C), other=0.0).to(ACC)
        if KIND != SUM:
            v = tl.where(lane == C, 1.0, v)
        _add_to_tap(acc_ptr + a_nw + lane, v, b_nw, w_nw, keep_nw[:, None] & in_block, KIND)
        _add_to_tap(acc_ptr + a_ne + lane, v, b_ne, w_ne, keep_ne[:, None] & in_block, KIND)
        _add_to_tap(acc_ptr + a_sw + lane, v, b_sw, w_sw, keep_sw[:, None] & in_block, KIND)
        _add_to_tap(acc_ptr + a_se + lane, v, b_se, w_se, keep_se[:, None] & in_block, KIND)


@triton.jit
def _safe(D, NORM: tl.constexpr):
    """D' of docs/spec.md; NaN stays NaN."""
    if NORM == ADDEPS:
        return D + EPS
    elif NORM == RAW:  # raw: no division
        return tl.full(D.shape, 1.0, D.dtype)
    elif NORM == ZEROEPS:
        return tl.where(D == 0.0, 1.0, D)
    else:
        return tl.where(D < EPS, EPS, D)


@triton.jit
def _store_rounded(ptr, value, mask):
    """value stored at ptr in ptr's dtype, rounded to nearest, ties to even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        # By integer arithmetic as torch's cast rounds: the same bits compiled and interpreted
        # (the interpreter's own float32-to-bfloat16 conversion truncates, and its "rtne" rounds
        # ties away from zero).
        bits = value.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(value != value, 0x7FC0, rounded).to(tl.uint16)
        tl.store(ptr, rounded.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "C", "H", "W", "LANES"])
def _splat_finish_kernel(acc_ptr, result_ptr, norm_ptr, N, C, H, W, LANES, NORM: tl.constexpr, DIVIDE: tl.constexpr,
                         HAS_NORM: tl.constexpr, BLOCK: tl.constexpr, CHANNELS: tl.constexpr):
    """From the forward's accumulator [N, H, W, LANES]: result [N, C, H, W] = sums / D' (DIVIDE;
    else sums) in result's dtype (the compute dtype, or the input's 16-bit one: no cast pass
    follows), and D [N, 1, H, W] (HAS_NORM) by the programs of the first channel block. A
    program: BLOCK targets (axis 0), its lanes read as [BLOCK, CHANNELS] tiles (a target's lanes
    side by side) and written to CHANNELS planes."""
    N, C, H, W, LANES = _wide(N), _wide(C), _wide(H), _wide(W), _wide(LANES)
    HW = H * W
    target = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = target < N * HW
    target = tl.where(valid, target, 0)
    n = target // HW
    pixel = target % HW
    lanes = acc_ptr + (target * LANES)[:, None]
    if HAS_NORM:
        D = tl.load(acc_ptr + target * LANES + C, mask=valid, other=1.0)
        if tl.program_id(1) == 0:
            tl.store(norm_ptr + target, D, mask=valid)
        divisor = _safe(D, NORM)[:, None]
    for first in range(tl.program_id(1).to(tl.int64) * CHANNELS, C, tl.num_programs(1).to(tl.int64) * CHANNELS):
        channel = first + tl.arange(0, CHANNELS).to(tl.int64)[None, :]
        mask = valid[:, None] & (channel < C)
        value = tl.load(lanes + channel, mask=mask, other=0.0)
        if DIVIDE:
            value = value / divisor
        _store_rounded(result_ptr + (n * C * HW + pixel)[:, None] + channel * HW, value, mask)


@triton.jit(do_not_specialize=["N", "C", "H", "W"])
def _splat_bwd_prepare_kernel(
    grad_ptr, sgn, sgc, sgy, sgx,
    out_ptr, norm_ptr,  # contiguous; unused for sum
    gnorm_ptr, sdn, sdy, sdx,  # gradient of the normaliser output; HAS_GNORM
    g_ptr,  # [N, K, H, W] with K = C (+1 for the normalised kinds): planar, coalesced
    N, C, H, W,
    KIND: tl.constexpr, NORM: tl.constexpr, HAS_GNORM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    N, C, H, W = _wide(N), _wide(C), _wide(H), _wide(W)
    pixel = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = pixel < N * H * W
    x = pixel % W
    y = (pixel // W) % H
    n = pixel // (W * H)
    HW = H * W
    K = C + (1 if KIND != SUM else 0)
    row = g_ptr + n * K * HW + (pixel - n * HW)  # channel c at row + c * HW
    if KIND == SUM:
        for c in range(0, C):
            grad = tl.load(grad_ptr + n * sgn + c * sgc + y * sgy + x * sgx, mask=valid, other=0.0).to(ACC)
            tl.store(row + c * HW, grad, mask=valid)
    else:
        D = tl.load(norm_ptr + pixel, mask=valid, other=1.0).to(ACC)
        divisor = _safe(D, NORM)
        gD = tl.zeros(x.shape, ACC)
        for c in range(0, C):
            gN = tl.load(grad_ptr + n * sgn + c * sgc + y * sgy + x * sgx, mask=valid, other=0.0).to(ACC) / divisor
            tl.store(row + c * HW, gN, mask=valid)
            gD -= gN * tl.load(out_ptr + (n * C + c) * HW + y * W + x, mask=valid, other=0.0).to(ACC)
        if NORM == ZEROEPS:
            gD = tl.where(D == 0.0, 0.0, gD)
        if NORM == CLIPEPS:
            gD = tl.where(D >= EPS, gD, 0.0)
        if NORM == RAW:
            gD = tl.zeros(x.shape, ACC)
        if HAS_GNORM:
            gD += tl.load(gnorm_ptr + n * sdn + y * sdy + x * sdx, mask=valid, other=0.0).to(ACC)
        tl.store(row + C * HW, gD, mask=valid)


@triton.jit
def _tap_terms(g_nw, g_ne, g_sw, g_se, offset, keep_nw, keep_ne, keep_sw, keep_se, b_nw, b_ne, b_sw, b_se,
               a_nw, a_ne, a_sw, a_se, north, south, west, east):
    """For the plane at ``offset`` of the taps' prepared gradients q: the gather sum(b * q) and the
    flow terms sum(d b / d fx, fy * q * a), with ``a`` the value each tap splatted. A tap that
    is not kept adds nothing (not even 0 * inf)."""
    q_nw = tl.load(g_nw + offset, mask=keep_nw, other=0.0)
    q_ne = tl.load(g_ne + offset, mask=keep_ne, other=0.0)
    q_sw = tl.load(g_sw + offset, mask=keep_sw, other=0.0)
    q_se = tl.load(g_se + offset, mask=keep_se, other=0.0)
    gathered = b_nw * q_nw + b_ne * q_ne + b_sw * q_sw + b_se * q_se
    p_nw = tl.where(keep_nw, q_nw * a_nw, 0.0)
    p_ne = tl.where(keep_ne, q_ne * a_ne, 0.0)
    p_sw = tl.where(keep_sw, q_sw * a_sw, 0.0)
    p_se = tl.where(keep_se, q_se * a_se, 0.0)
    dfx = (-north) * p_nw + north * p_ne + (-south) * p_sw + south * p_se
    dfy = (-west) * p_nw + (-east) * p_ne + west * p_sw + east * p_se
    return gathered, dfx, dfy


@triton.jit(do_not_specialize=["N", "C", "H", "W"])
def _splat_bwd_kernel(
    input_ptr, sin_n, sin_c, sin_y, sin_x,
    flow_ptr, sfn, sfc, sfy, sfx,
    metric_ptr, smn, smy, smx,
    g_ptr,
    max_ptr,  # STABLE, MAX: M [N, 1, H, W] contiguous
    grad_input_ptr, grad_flow_ptr, grad_metric_ptr,  # contiguous
    N, C, H, W,
    KIND: tl.constexpr, WANT_INPUT: tl.constexpr, WANT_FLOW: tl.constexpr, WANT_METRIC: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    N, C, H, W = _wide(N), _wide(C), _wide(H), _wide(W)
    pixel = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = pixel < N * H * W
    pixel = tl.where(valid, pixel, 0)
    n, x, y, lands, x0, y0, east, west, south, north = _taps(pixel, flow_ptr, sfn, sfc, sfy, sfx, H, W, ACC)
    lands = lands & valid
    w = _weight(metric_ptr, n, x, y, smn, smy, smx, valid, KIND, ACC)
    keep_nw = lands & (x0 >= 0) & (y0 >= 0)
    keep_ne = lands & (x0 + 1 <= W - 1) & (y0 >= 0)
    keep_sw = lands & (x0 >= 0) & (y0 + 1 <= H - 1)
    keep_se = lands & (x0 + 1 <= W - 1) & (y0 + 1 <= H - 1)
    K = C + (1 if KIND != SUM else 0)
    HW = H * W
    g_nw = g_ptr + n * K * HW + y0 * W + x0  # channel c at g_nw + c * HW
    g_ne = g_nw + 1
    g_sw = g_nw + W
    g_se = g_sw + 1
    b_nw = west * north
    b_ne = east * north
    b_sw = west * south
    b_se = east * south
    if KIND == STABLE or KIND == MAX:  # per-tap weights, folded into the gathers; the per-pixel factor is then 1
        d_nw = n * H * W + y0 * W + x0
        w_nw = _tap_weight(w, max_ptr, d_nw, keep_nw, KIND)
        w_ne = _tap_weight(w, max_ptr, d_nw + 1, keep_ne, KIND)
        w_sw = _tap_weight(w, max_ptr, d_nw + W, keep_sw, KIND)
        w_se = _tap_weight(w, max_ptr, d_nw + W + 1, keep_se, KIND)
        b_nw = b_nw * w_nw
        b_ne = b_ne * w_ne
        b_sw = b_sw * w_sw
        b_se = b_se * w_se
        w = tl.full(x.shape, 1.0, ACC)
    else:
        w_nw = tl.full(x.shape, 1.0, ACC)
        w_ne = w_nw
        w_sw = w_nw
        w_se = w_nw
    grad_fx = tl.zeros(x.shape, ACC)
    grad_fy = tl.zeros(x.shape, ACC)
    grad_w = tl.zeros(x.shape, ACC)
    source = input_ptr + n * sin_n + y * sin_y + x * sin_x
    for c in range(0, C):
        v = tl.load(source + c * sin_c, mask=valid, other=0.0).to(ACC)
        splatted = v * w if KIND != SUM else v
        # Computed for every pixel, landed or not, as autograd does through the oracle.
        gathered, dfx, dfy = _tap_terms(
            g_nw, g_ne, g_sw, g_se, c * HW, keep_nw, keep_ne, keep_sw, keep_se, b_nw, b_ne, b_sw, b_se,
            splatted * w_nw, splatted * w_ne, splatted * w_sw, splatted * w_se, north, south, west, east,
        )
        grad_fx += dfx
        grad_fy += dfy
        if WANT_INPUT:
            result = gathered * w if KIND != SUM else gathered
            tl.store(grad_input_ptr + ((n * C + c) * H + y) * W + x, result.to(grad_input_ptr.dtype.element_ty), mask=valid)
        grad_w += gathered * v
    if KIND != SUM:
        gathered, dfx, dfy = _tap_terms(
            g_nw, g_ne, g_sw, g_se, C * HW, keep_nw, keep_ne, keep_sw, keep_se, b_nw, b_ne, b_sw, b_se,
            w * w_nw, w * w_ne, w * w_sw, w * w_se, north, south, west, east,
        )
        grad_w += gathered
        grad_fx += dfx
        grad_fy += dfy
    if WANT_FLOW:
        grad_fx = tl.where(lands, grad_fx, 0.0)
        grad_fy = tl.where(lands, grad_fy, 0.0)
        tl.store(grad_flow_ptr + ((n * 2) * H + y) * W + x, grad_fx, mask=valid)
        tl.store(grad_flow_ptr + ((n * 2 + 1) * H + y) * W + x, grad_fy, mask=valid)
    if WANT_METRIC:
        if KIND == MAX:  # the winners are piecewise constant in the metric: no gradient
            tl.store(grad_metric_ptr + (n * H + y) * W + x, tl.zeros(x.shape, ACC), mask=valid)
        else:
            derivative = w if KIND == SOFT else tl.full(x.shape, 1.0, ACC)  # STABLE: w_k folded in
            tl.store(grad_metric_ptr + (n * H + y) * W + x, grad_w * derivative, mask=valid)
