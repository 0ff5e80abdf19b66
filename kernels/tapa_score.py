"""Jitted pieces of the TAPA score, shared by the forward and the backward kernels.

For a tile of `rows` x `cols` (queries x keys in the forward and dQ kernels, keys x queries in the
dK/dV kernel) with positions m (rows) and n (cols):

    s = amp * cos(2 pi turns),   amp = (row_A . col_A) / sqrt(A),   turns = |m - n|^alpha * phi
    phi = (row_P . col_P) / sqrt(P)                  (quadratic phase)
    phi = (sum(row_P) + sum(col_P)) / sqrt(P)        (linear phase)

Every piece is symmetric in rows and cols; only the causal mask is not, so it takes explicit
query / key arguments.
"""

import triton
import triton.language as tl

TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def load_positions(pos_ptr, start, offs, length):
    """Positions of a tile. Rows past the document repeat its last position, so min / max over the
    tile see only real tokens (the loop bounds guarantee the tile holds at least one)."""
    return tl.load(pos_ptr + start + tl.minimum(offs, length - 1))


@triton.jit
def load_rows(ptr, start, offs, length, stride_t, stride_d, dims, NUM_DIMS: tl.constexpr):
    """A (rows, len(dims)) tile of token rows; rows past the document and dims >= NUM_DIMS read 0."""
    tokens = (start + offs).to(tl.int64)
    mask = (offs < length)[:, None] & (dims < NUM_DIMS)[None, :]
    return tl.load(ptr + tokens[:, None] * stride_t + dims[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def load_split_rows(
    ptr, start, offs, length, stride_t, stride_d,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
    PHASE_QUADRATIC: tl.constexpr, AMP_PAIR: tl.constexpr = False, PHASE_PAIR: tl.constexpr = False,
):
    """Amplitude (first AMP dims) and phase (last PHASE dims) parts of a tile, each padded to a
    power of two or, with AMP_PAIR / PHASE_PAIR, a pair of tiles (load_part). The linear phase only
    needs sum(x_P): its phase part is that (rows,) vector, which broadcasts into the score tile like
    the positions do (a (rows, 1) tile and its transpose put the whole phase tile in a blocked
    layout, converted to the mma one through shared memory)."""
    amp = load_part(ptr, start, offs, length, stride_t, stride_d, AMP, AMP_PAD, AMP_PAIR)
    phase = load_part(ptr + AMP * stride_d, start, offs, length, stride_t, stride_d, PHASE, PHASE_PAD, PHASE_PAIR)
    if not PHASE_QUADRATIC:
        phase = tl.sum(phase.to(tl.float32), 1)
    return amp, phase


@triton.jit
def load_part(ptr, start, offs, length, stride_t, stride_d, WIDTH: tl.constexpr, PAD: tl.constexpr,
              PAIR: tl.constexpr):
    """WIDTH dims of token rows from ptr on: one tile padded to PAD (a power of two), or with PAIR
    (WIDTH < PAD: 96 of 128, 48 of 64) two tiles, the first PAD / 2 dims and the rest, so that
    neither the products nor the accumulators of their gradients hold padded dims."""
    if PAIR:
        HI: tl.constexpr = PAD // 2
        if WIDTH - HI <= PAD // 4:
            LO_PAD: tl.constexpr = PAD // 4
        else:
            LO_PAD: tl.constexpr = HI
        part = (
            load_rows(ptr, start, offs, length, stride_t, stride_d, tl.arange(0, HI), HI),
            load_rows(ptr + HI * stride_d, start, offs, length, stride_t, stride_d, tl.arange(0, LO_PAD), WIDTH - HI),
        )
    else:
        part = load_rows(ptr, start, offs, length, stride_t, stride_d, tl.arange(0, PAD), WIDTH)
    return part


@triton.jit
def part_product(row_part, col_part, PAIR: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """row_part . col_part over the part's dims, a (rows, cols) tile (parts from load_part)."""
    if PAIR:
        product = tl.dot(row_part[0], tl.trans(col_part[0]), input_precision=DOT_PRECISION)
        product = tl.dot(row_part[1], tl.trans(col_part[1]), product, input_precision=DOT_PRECISION)
    else:
        product = tl.dot(row_part, tl.trans(col_part), input_precision=DOT_PRECISION)
    return product


@triton.jit
def store_part(
    ptr, value, scale, start, offs, length, stride_t, stride_d, WIDTH: tl.constexpr, PAD: tl.constexpr, PAIR: tl.constexpr,
):
    """Stores scale * value, a part laid out as load_part's (or one column for all its dims), into
    WIDTH dims of token rows from ptr on."""
    if PAIR:
        HI: tl.constexpr = PAD // 2
        store_rows(ptr, value[0] * scale, start, offs, length, stride_t, stride_d, tl.arange(0, HI), HI)
        store_rows(ptr + HI * stride_d, value[1] * scale, start, offs, length, stride_t, stride_d,
                   tl.arange(0, value[1].shape[1]), WIDTH - HI)
    else:
        store_rows(ptr, value * scale, start, offs, length, stride_t, stride_d, tl.arange(0, PAD), WIDTH)


@triton.jit
def store_rows(ptr, value, start, offs, length, stride_t, stride_d, dims, NUM_DIMS: tl.constexpr):
    tokens = (start + offs).to(tl.int64)
    mask = (offs < length)[:, None] & (dims < NUM_DIMS)[None, :]
    tl.store(ptr + tokens[:, None] * stride_t + dims[None, :] * stride_d, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_split_rows(
    ptr, amp, phase, start, offs, length, stride_t, stride_d,
    AMP: tl.constexpr, PHASE: tl.constexpr, AMP_PAD: tl.constexpr, PHASE_PAD: tl.constexpr,
):
    store_rows(ptr, amp, start, offs, length, stride_t, stride_d, tl.arange(0, AMP_PAD), AMP)
    store_rows(ptr + AMP * stride_d, phase, start, offs, length, stride_t, stride_d, tl.arange(0, PHASE_PAD), PHASE)


@triton.jit
def visible_tile_range(
    pos_ptr, start, length, bound,
    TILE: tl.constexpr, SCAN_TILES: tl.constexpr, KEYS: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Token range [lo, hi) of the TILE-sized tiles of the other side that a tile must visit.

    The causal skip test, by positions: a key tile can be visible to a query tile iff its smallest
    key position is <= the query tile's largest position (`bound`); KEYS=False asks the dual
    question (a query tile whose largest position is >= `bound`, the key tile's smallest). The
    range spans the first to the last such tile, found by a vectorised scan of SCAN_TILES tiles per
    step; loops over it then need no runtime `if`, which would stop Triton from pipelining their
    loads. For monotone positions (contiguous, offset, context-parallel chunks) it holds exactly
    the visible tiles; for unsorted ones it may hold invisible tiles, which the mask zeroes.
    """
    n_tiles = tl.cdiv(length, TILE)
    if CAUSAL:
        lo = n_tiles
        hi = n_tiles * 0
        offs = tl.arange(0, SCAN_TILES * TILE)
        for first_tile in range(0, n_tiles, SCAN_TILES):
            pos = load_positions(pos_ptr, start, first_tile * TILE + offs, length)
            if KEYS:
                visible = tl.min(tl.reshape(pos, (SCAN_TILES, TILE)), 1) <= bound
            else:
                visible = tl.max(tl.reshape(pos, (SCAN_TILES, TILE)), 1) >= bound
            tiles = first_tile + tl.arange(0, SCAN_TILES)
            visible = visible & (tiles < n_tiles)
            lo = tl.minimum(lo, tl.min(tl.where(visible, tiles, n_tiles), 0))
            hi = tl.maximum(hi, tl.max(tl.where(visible, tiles + 1, 0), 0))
    else:
        lo = 0
        hi = n_tiles
    return lo * TILE, hi * TILE


@triton.jit
def scanned_tiles(pos_ptr, start, length, first, TILE: tl.constexpr, SCAN_TILES: tl.constexpr, LARGEST: tl.constexpr):
    """One step of the tile scans below: the first token of each of SCAN_TILES tiles from token
    `first`, and each tile's largest (LARGEST) or smallest position."""
    pos = load_positions(pos_ptr, start, first + tl.arange(0, SCAN_TILES * TILE), length)
    pos = tl.reshape(pos, (SCAN_TILES, TILE))
    if LARGEST:
        bound = tl.max(pos, 1)
    else:
        bound = tl.min(pos, 1)
    return first + tl.arange(0, SCAN_TILES) * TILE, bound


@triton.jit
def unmasked_tile_end(
    pos_ptr, start, length, lo, hi, bound,
    TILE: tl.constexpr, SCAN_TILES: tl.constexpr, CAUSAL: tl.constexpr,
):
    """End of the run of key tiles from lo that every query of a tile sees: whole tiles (no key
    past the document) whose largest key position is <= the tiles' smallest query position
    (`bound`). Those take no mask at all; the tiles from there to hi (the diagonal, the document's
    last tile, and with unsorted positions anything after the first partly hidden one) are masked."""
    end = hi
    if CAUSAL:
        for first in range(lo, hi, SCAN_TILES * TILE):
            tiles, largest = scanned_tiles(pos_ptr, start, length, first, TILE, SCAN_TILES, True)
            whole = (tiles + TILE <= length) & (largest <= bound)
            end = tl.minimum(end, tl.min(tl.where(~whole & (tiles < hi), tiles, hi), 0))
    else:
        end = tl.minimum(hi, (length // TILE) * TILE)
    return end


@triton.jit
def hidden_tile_end(
    pos_ptr, start, length, lo, hi, bound,
    TILE: tl.constexpr, SCAN_TILES: tl.constexpr, CAUSAL: tl.constexpr,
):
    """The dual of unmasked_tile_end for the dK/dV kernel's loop over query tiles: end of the run
    of query tiles from lo holding a query that cannot see some key of the key tile, i.e. whose
    smallest query position is below the key tile's largest (`bound`). The tiles from there to hi
    see every key and take no mask (with unsorted positions the run reaches the last such tile).
    Queries past the document need no mask: their dO, lse and delta read 0, so they add nothing."""
    end = lo
    if CAUSAL:
        for first in range(lo, hi, SCAN_TILES * TILE):
            tiles, smallest = scanned_tiles(pos_ptr, start, length, first, TILE, SCAN_TILES, False)
            hidden = (smallest < bound) & (tiles < hi)
            end = tl.maximum(end, tl.max(tl.where(hidden, tiles + TILE, lo), 0))
    return end


@triton.jit
def is_visible(q_pos, k_pos, q_valid, k_valid, CAUSAL: tl.constexpr):
    """Visibility of each (query, key) pair; the arguments come pre-broadcast to the tile's layout."""
    visible = q_valid & k_valid
    if CAUSAL:
        visible = visible & (k_pos <= q_pos)
    return visible


@triton.jit
def approx_log2(x, FAST_MATH: tl.constexpr):
    """log2 of x >= 0: the GPU's approximate lg2 (a single MUFU op, relative error ~2^-22 for x >= 1,
    -inf at 0 as PTX specifies) instead of libdevice's __nv_log2f (~20 instructions and a branch)."""
    if FAST_MATH:
        result = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        result = tl.log2(x)
    return result


@triton.jit
def distance_power(row_pos, col_pos, alpha, log2_scale, FAST_MATH: tl.constexpr):
    """scale * |m - n|^alpha for a tile, 0 where m == n. row_pos (R,), col_pos (C,) int64 -> (R, C)
    fp32; log2_scale = log2(scale), which is how the phase's 1/sqrt(P) rides along for free.

    exp2(alpha log2 d + log2_scale): with FAST_MATH one FFMA and two MUFU ops per score, no branch
    and no select: lg2.approx(0) = -inf and ex2.approx(-inf) = 0 give the diagonal's 0 (alpha > 0).
    The relative error is ~ln2 alpha log2(d) fp32 ulp (the rounding of alpha log2 d), ~1e-6 at
    d = 128K, alpha = 0.5. d is an fp32 difference of positions relative to the row tile's smallest
    (int64 work on the (R,) and (C,) vectors only; an int subtract, abs and int-to-float convert per
    score cost three instructions, the float one): exact while they lie within 2^24 of it, beyond
    that rounded by at most one fp32 ulp of the offset.
    """
    row_min = tl.min(row_pos, 0)
    row_rel = (row_pos - row_min).to(tl.float32)
    col_rel = (col_pos - row_min).to(tl.float32)
    d = tl.abs(row_rel[:, None] - col_rel[None, :])
    if FAST_MATH:
        dist = tl.exp2(alpha * approx_log2(d, FAST_MATH) + log2_scale)
    else:  # numpy warns on log2(0)
        dist = tl.where(d > 0, tl.exp2(alpha * approx_log2(tl.maximum(d, 1.0), FAST_MATH) + log2_scale), 0.0)
    return dist


@triton.jit
def diagonal_distance_power(row_pos, col_pos, alpha, log2_scale, FAST_MATH: tl.constexpr):
    """distance_power for tiles of contiguous positions (row i at r0 + i, col j at c0 + j; rows or
    cols past the document count on from there): |m - n| = |r0 - c0 + i - j| is constant along
    each of the R + C - 1 diagonals, so the power is computed once per diagonal and gathered into
    the tile, instead of two MUFU ops per score. r0 - c0 is rounded to fp32 as distance_power's d."""
    R: tl.constexpr = row_pos.shape[0]
    C: tl.constexpr = col_pos.shape[0]
    DIAGONALS: tl.constexpr = 2 * R if R >= C else 2 * C  # a power of two >= R + C - 1
    offset = (tl.min(row_pos, 0) - tl.min(col_pos, 0)).to(tl.float32) - (C - 1)
    d = tl.abs(offset + tl.arange(0, DIAGONALS).to(tl.float32))  # diagonal k: i - j = k - (C - 1)
    if FAST_MATH:
        per_diagonal = tl.exp2(alpha * approx_log2(d, FAST_MATH) + log2_scale)
    else:
        per_diagonal = tl.where(d > 0, tl.exp2(alpha * approx_log2(tl.maximum(d, 1.0), FAST_MATH) + log2_scale), 0.0)
    diagonal = tl.arange(0, R)[:, None] - tl.arange(0, C)[None, :] + (C - 1)
    # A 1-D gather (a 2-D one would broadcast the vector into an (R, DIAGONALS) tile first).
    return tl.reshape(tl.gather(per_diagonal, tl.reshape(diagonal, (R * C,)), 0), (R, C))


@triton.jit
def phase_product(row_phase, col_phase, PHASE_QUADRATIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  PHASE_PAIR: tl.constexpr = False):
    """phi * sqrt(P) for a tile (linear phase: the parts are the (n,) sums from load_split_rows)."""
    if PHASE_QUADRATIC:
        phi = part_product(row_phase, col_phase, PHASE_PAIR, DOT_PRECISION)
    else:
        phi = row_phase[:, None] + col_phase[None, :]
    return phi


@triton.jit
def turns_to_radians(turns, FAST_MATH: tl.constexpr):
    """2 pi * turns, reduced first in turns (exactly) to [-1/2, 1/2], so the angle lies in [-pi, pi].
    FAST_MATH rounds to the nearest integer in one instruction (cvt.rni: FRND) instead of floor(t + 1/2)."""
    if FAST_MATH:
        nearest = tl.inline_asm_elementwise(
            "cvt.rni.f32.f32 $0, $1;", "=f,f", [turns], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        nearest = tl.floor(turns + 0.5)
    return (turns - nearest) * TWO_PI


@triton.jit
def cos_radians(angle, FAST_MATH: tl.constexpr):
    """cos of an angle in [-pi, pi]; FAST_MATH uses the GPU's approximate cosine (CUDA only)."""
    if FAST_MATH:
        cos = tl.inline_asm_elementwise(
            "cos.approx.f32 $0, $1;", "=f,f", [angle], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        cos = tl.cos(angle)
    return cos


@triton.jit
def sin_radians(angle, FAST_MATH: tl.constexpr):
    """sin of an angle in [-pi, pi]; FAST_MATH uses the GPU's approximate sine (CUDA only)."""
    if FAST_MATH:
        sin = tl.inline_asm_elementwise(
            "sin.approx.f32 $0, $1;", "=f,f", [angle], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        sin = tl.sin(angle)
    return sin


@triton.jit
def score_parts(
    row_amp, row_phase, col_amp, col_phase, row_pos, col_pos, alpha, log2_phase_scale,
    PHASE_QUADRATIC: tl.constexpr, CONTIGUOUS: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_MATH: tl.constexpr,
    AMP_PAIR: tl.constexpr = False, PHASE_PAIR: tl.constexpr = False,
):
    """The parts of a score tile, unscaled where a scale can go elsewhere: the amplitude product
    row_A . col_A (s = amp_scale * amp * cos(angle)), dist = |m - n|^alpha / sqrt(P) and the phase
    angle 2 pi dist (row_P . col_P). Callers fold amp_scale into what they do next (one multiply
    per score fewer); the phase scale rides in dist's exponent. CONTIGUOUS: both tiles' positions
    are contiguous (diagonal_distance_power). AMP_PAIR / PHASE_PAIR: that part is a pair (load_part)."""
    amp = part_product(row_amp, col_amp, AMP_PAIR, DOT_PRECISION)
    if CONTIGUOUS:
        dist = diagonal_distance_power(row_pos, col_pos, alpha, log2_phase_scale, FAST_MATH)
    else:
        dist = distance_power(row_pos, col_pos, alpha, log2_phase_scale, FAST_MATH)
    phi = phase_product(row_phase, col_phase, PHASE_QUADRATIC, DOT_PRECISION, PHASE_PAIR)
    if not PHASE_QUADRATIC:
        # The linear phi broadcasts (rows,) sums of loads, so Triton would lay the power, angle,
        # cos and sin out like the loads and convert them to the dot's layout every tile (through
        # shared memory), recomputing the power in both. Adding 0 * amp (one FFMA) anchors phi in
        # the dot's layout, as the quadratic phi's own dot does. Exact for finite amp.
        phi = phi + amp * 0.0
    return amp, dist, turns_to_radians(dist * phi, FAST_MATH)
