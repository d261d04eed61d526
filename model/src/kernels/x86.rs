//! The AVX2 kernels (x86-64 only: callers check the CPU first).

use super::{ActRow, BlockScales, QK, TILE};
use std::arch::x86_64::*;

/// A row's result from accumulator lanes `[r0 r0 r2 r2 | r1 r1 r3 r3]` (two partial sums
/// per row) less each row's constant term.
#[inline(always)]
unsafe fn finish_pairs(acc: __m256, offset: __m128) -> [f32; TILE] {
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut off = [0f32; TILE];
    _mm_storeu_ps(off.as_mut_ptr(), offset);
    [
        lanes[0] + lanes[1] - off[0],
        lanes[4] + lanes[5] - off[1],
        lanes[2] + lanes[3] - off[2],
        lanes[6] + lanes[7] - off[3],
    ]
}

/// How far ahead of the block being multiplied the kernels ask for the weights, in bytes.
/// A decode step reads every weight once, so it runs at the rate memory delivers them; a
/// core's own prefetcher keeps too few lines in flight for that (on a 2-vCPU Sapphire
/// Rapids VM decode ran 10-17% faster with this).
const PREFETCH_AHEAD: usize = 1024;

/// Asks for the `lines` cache lines `PREFETCH_AHEAD` bytes past `at` (a hint: an address
/// past the weights' end is never read).
#[inline(always)]
pub(super) unsafe fn prefetch(at: *const u8, lines: usize) {
    for line in 0..lines {
        let ahead = at.wrapping_add(PREFETCH_AHEAD + 64 * line);
        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
    }
}

/// Block `b`'s four scales (or minimums), widened: the f16s times the block's bytes where
/// it has them.
#[inline(always)]
pub(super) unsafe fn four_scales(s: &BlockScales, b: usize) -> __m128 {
    let at = s.halves.as_ptr().add((b >> s.shift) * TILE);
    let d = _mm_cvtph_ps(_mm_loadl_epi64(at as *const __m128i));
    if s.bytes.is_empty() {
        return d;
    }
    let bytes = (s.bytes.as_ptr().add(b * TILE) as *const i32).read_unaligned();
    _mm_mul_ps(
        d,
        _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(bytes))),
    )
}

/// Dot products of a tile's four weight rows with `A` activation rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `scales` (and `mins`, unless empty) cover
/// `kb` blocks of four rows (`BlockScales::covers`), `quants` holds
/// `kb * 64` bytes, and each activation row `kb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_dot<const A: usize>(
    kb: usize,
    scales: BlockScales,
    mins: BlockScales,
    quants: &[u8],
    acts: [ActRow; A],
) -> [[f32; TILE]; A] {
    debug_assert!(quants.len() >= kb * TILE * 16);
    // Q4_0's value is d * (q - 8): its constant term is 8d. Q4_K blocks carry theirs.
    let with_mins = !mins.is_empty();
    let eight = _mm_set1_ps(8.0);
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // Lane order of the accumulators: [r0 r0 r2 r2 | r1 r1 r3 r3] (two partial sums per
    // row), which is how one 256-bit load of two rows' nibbles multiplies out.
    let order = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
    let mut acc = [_mm256_setzero_ps(); A];
    let mut offset = [_mm_setzero_ps(); A];
    for b in 0..kb {
        let dw = four_scales(&scales, b);
        let dw_lanes = _mm256_permutevar8x32_ps(_mm256_set_m128(dw, dw), order);
        let constant = if with_mins {
            four_scales(&mins, b)
        } else {
            _mm_mul_ps(dw, eight)
        };
        // Rows 0 and 1 (and 2 and 3) are adjacent: one load each, low nibbles are
        // values 0..16 of the block, high nibbles values 16..32.
        prefetch(quants.as_ptr().add(b * TILE * 16), 1);
        let q01 = _mm256_loadu_si256(quants.as_ptr().add(b * TILE * 16) as *const __m256i);
        let q23 = _mm256_loadu_si256(quants.as_ptr().add((b * TILE + 2) * 16) as *const __m256i);
        let lo01 = _mm256_and_si256(q01, low);
        let hi01 = _mm256_and_si256(_mm256_srli_epi16(q01, 4), low);
        let lo23 = _mm256_and_si256(q23, low);
        let hi23 = _mm256_and_si256(_mm256_srli_epi16(q23, 4), low);
        for a in 0..A {
            let act = acts[a];
            let q = act.q.as_ptr().add(b * QK);
            let a_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(q as *const __m128i));
            let a_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(q.add(16) as *const __m128i));
            // maddubs lanes stay below 2 * 15 * 127 each, so adding two is safe in i16.
            let p01 = _mm256_madd_epi16(
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo01, a_lo),
                    _mm256_maddubs_epi16(hi01, a_hi),
                ),
                ones,
            );
            let p23 = _mm256_madd_epi16(
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo23, a_lo),
                    _mm256_maddubs_epi16(hi23, a_hi),
                ),
                ones,
            );
            let sums = _mm256_hadd_epi32(p01, p23);
            let scale = _mm256_mul_ps(dw_lanes, _mm256_set1_ps(*act.d.get_unchecked(b)));
            acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[a]);
            offset[a] = _mm_fmadd_ps(
                constant,
                _mm_set1_ps(*act.offset.get_unchecked(b)),
                offset[a],
            );
        }
    }
    std::array::from_fn(|a| finish_pairs(acc[a], offset[a]))
}

/// A six-bit tile block's values for `maddubs`: rows 0-1 values 0..16, rows 0-1 values
/// 16..32, then the same for rows 2-3, each byte the low nibble with its two high bits.
///
/// # Safety
/// AVX2; `quants` points at the block's 64 nibble bytes, `high` at its 32-byte plane.
#[inline(always)]
unsafe fn six_bit_values(quants: *const u8, high: *const u8) -> [__m256i; 4] {
    let low = _mm256_set1_epi8(0x0F);
    let pair = _mm256_set1_epi8(0x30);
    let q01 = _mm256_loadu_si256(quants as *const __m256i);
    let q23 = _mm256_loadu_si256(quants.add(32) as *const __m256i);
    let h = _mm256_loadu_si256(high as *const __m256i);
    let with = |nibbles: __m256i, pairs: __m256i| {
        _mm256_or_si256(
            _mm256_and_si256(nibbles, low),
            _mm256_and_si256(pairs, pair),
        )
    };
    [
        with(q01, _mm256_slli_epi16(h, 4)),
        with(_mm256_srli_epi16(q01, 4), _mm256_slli_epi16(h, 2)),
        with(q23, h),
        with(_mm256_srli_epi16(q23, 4), _mm256_srli_epi16(h, 2)),
    ]
}

/// Dot products of a six-bit tile's four weight rows with `A` activation rows:
/// `value = d * sub * (q - bias) - min`, with `q` below 64 and a signed `sub` per 16
/// values. The bias comes off in 16-bit lanes (`maddubs(q, a) - maddubs(bias, a)`), and
/// `madd` against the sub-scales sums pairs, so each block ends as one integer per row.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `scales` (and `mins`, unless empty) cover
/// `kb` blocks of four rows, `quants` `kb * 64` bytes, `high` `kb * 32`, `subscales` `kb * 8`, and
/// each activation row `kb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn six_tile_dot<const A: usize>(
    kb: usize,
    scales: BlockScales,
    mins: BlockScales,
    quants: &[u8],
    high: &[u8],
    subscales: &[i8],
    bias: u8,
    acts: [ActRow; A],
) -> [[f32; TILE]; A] {
    debug_assert!(quants.len() >= kb * TILE * 16);
    debug_assert!(high.len() >= kb * QK && subscales.len() >= kb * TILE * 2);
    let with_mins = !mins.is_empty();
    let bias_bytes = _mm256_set1_epi8(bias as i8);
    // Which 16-bit sub-scale each half of a product register takes (see `subscales`:
    // [r0 lo, r0 hi, r1 lo, r1 hi, r2 lo, …]).
    let pick = |first: i8, second: i8| {
        let mut control = [0i8; 32];
        for (i, byte) in control.iter_mut().enumerate() {
            let lane = if i < 16 { first } else { second };
            *byte = 2 * lane + (i % 2) as i8;
        }
        _mm256_loadu_si256(control.as_ptr() as *const __m256i)
    };
    let (pick_lo01, pick_hi01, pick_lo23, pick_hi23) =
        (pick(0, 2), pick(1, 3), pick(4, 6), pick(5, 7));
    let order = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
    let mut acc = [_mm256_setzero_ps(); A];
    let mut offset = [_mm_setzero_ps(); A];
    for b in 0..kb {
        let dw = four_scales(&scales, b);
        let dw_lanes = _mm256_permutevar8x32_ps(_mm256_set_m128(dw, dw), order);
        prefetch(quants.as_ptr().add(b * TILE * 16), 1);
        if b % 2 == 0 {
            prefetch(high.as_ptr().add(b * QK), 1);
        }
        let [lo01, hi01, lo23, hi23] = six_bit_values(
            quants.as_ptr().add(b * TILE * 16),
            high.as_ptr().add(b * QK),
        );
        let subs = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(
            subscales.as_ptr().add(b * TILE * 2) as *const __m128i,
        )));
        let s_lo01 = _mm256_shuffle_epi8(subs, pick_lo01);
        let s_hi01 = _mm256_shuffle_epi8(subs, pick_hi01);
        let s_lo23 = _mm256_shuffle_epi8(subs, pick_lo23);
        let s_hi23 = _mm256_shuffle_epi8(subs, pick_hi23);
        let constant = if with_mins {
            four_scales(&mins, b)
        } else {
            _mm_setzero_ps()
        };
        for a in 0..A {
            let act = acts[a];
            let q = act.q.as_ptr().add(b * QK);
            let a_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(q as *const __m128i));
            let a_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(q.add(16) as *const __m128i));
            // |q - bias| <= 63 and |a| <= 127: every 16-bit lane stays below 2^15.
            let bias_lo = _mm256_maddubs_epi16(bias_bytes, a_lo);
            let bias_hi = _mm256_maddubs_epi16(bias_bytes, a_hi);
            let part = |w: __m256i, a: __m256i, bias: __m256i, sub: __m256i| {
                _mm256_madd_epi16(_mm256_sub_epi16(_mm256_maddubs_epi16(w, a), bias), sub)
            };
            let p01 = _mm256_add_epi32(
                part(lo01, a_lo, bias_lo, s_lo01),
                part(hi01, a_hi, bias_hi, s_hi01),
            );
            let p23 = _mm256_add_epi32(
                part(lo23, a_lo, bias_lo, s_lo23),
                part(hi23, a_hi, bias_hi, s_hi23),
            );
            let sums = _mm256_hadd_epi32(p01, p23);
            let scale = _mm256_mul_ps(dw_lanes, _mm256_set1_ps(*act.d.get_unchecked(b)));
            acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[a]);
            if with_mins {
                offset[a] = _mm_fmadd_ps(
                    constant,
                    _mm_set1_ps(*act.offset.get_unchecked(b)),
                    offset[a],
                );
            }
        }
    }
    std::array::from_fn(|a| finish_pairs(acc[a], offset[a]))
}

/// Dot products of a Q8_0 tile's four weight rows with `A` activation rows. Signed
/// weights go through `maddubs` as `|w|` times `a` carrying `w`'s sign.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `scales` holds `kb * 4` values, `quants`
/// `kb * 128` bytes, and each activation row `kb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_tile_dot<const A: usize>(
    kb: usize,
    scales: &[u16],
    quants: &[u8],
    acts: [ActRow; A],
) -> [[f32; TILE]; A] {
    debug_assert!(scales.len() >= kb * TILE && quants.len() >= kb * TILE * QK);
    let ones = _mm256_set1_epi16(1);
    // Lanes [r0 r1 r2 r3 | r0 r1 r2 r3]: the halves are summed at the end.
    let mut acc = [_mm256_setzero_ps(); A];
    for b in 0..kb {
        let dw = _mm_cvtph_ps(_mm_loadl_epi64(
            scales.as_ptr().add(b * TILE) as *const __m128i
        ));
        let dw2 = _mm256_set_m128(dw, dw);
        prefetch(quants.as_ptr().add(b * TILE * QK), 2);
        let mut w = [_mm256_setzero_si256(); TILE];
        let mut w_abs = [_mm256_setzero_si256(); TILE];
        for r in 0..TILE {
            w[r] = _mm256_loadu_si256(quants.as_ptr().add((b * TILE + r) * QK) as *const __m256i);
            w_abs[r] = _mm256_sign_epi8(w[r], w[r]);
        }
        for a in 0..A {
            let act = acts[a];
            let av = _mm256_loadu_si256(act.q.as_ptr().add(b * QK) as *const __m256i);
            let mut p = [_mm256_setzero_si256(); TILE];
            for r in 0..TILE {
                p[r] = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(w_abs[r], _mm256_sign_epi8(av, w[r])),
                    ones,
                );
            }
            let sums =
                _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
            let scale = _mm256_mul_ps(dw2, _mm256_set1_ps(*act.d.get_unchecked(b)));
            acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[a]);
        }
    }
    let mut out = [[0f32; TILE]; A];
    for a in 0..A {
        let halves = _mm_add_ps(
            _mm256_castps256_ps128(acc[a]),
            _mm256_extractf128_ps(acc[a], 1),
        );
        _mm_storeu_ps(out[a].as_mut_ptr(), halves);
    }
    out
}

/// Dot products of four F16 weight rows with `A` F32 activation rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` holds `4 * k` values, `x` `A * k`, and
/// `k` is a multiple of 8.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_tile_dot<const A: usize>(
    k: usize,
    w: &[half::f16],
    x: &[f32],
) -> [[f32; TILE]; A] {
    debug_assert!(w.len() >= TILE * k && x.len() >= A * k && k.is_multiple_of(8));
    let mut acc = [[_mm256_setzero_ps(); TILE]; A];
    let wp = w.as_ptr() as *const u16;
    let xp = x.as_ptr();
    for j in (0..k).step_by(8) {
        let mut wv = [_mm256_setzero_ps(); TILE];
        for (r, wv) in wv.iter_mut().enumerate() {
            *wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(r * k + j) as *const __m128i));
        }
        for (a, acc) in acc.iter_mut().enumerate() {
            let xv = _mm256_loadu_ps(xp.add(a * k + j));
            for r in 0..TILE {
                acc[r] = _mm256_fmadd_ps(wv[r], xv, acc[r]);
            }
        }
    }
    let mut out = [[0f32; TILE]; A];
    for a in 0..A {
        for r in 0..TILE {
            let v = acc[a][r];
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            out[a][r] = _mm_cvtss_f32(s);
        }
    }
    out
}

/// Activations as 8-bit blocks of 32, as `super::quantize_blocks` computes them (bit for
/// bit, NaN and infinities included), a block at a time in registers: the portable loop
/// compiles to one scalar max, round and convert per value, with the half sums kept in
/// memory, and took as long as the matmuls of a small model's decode.
///
/// # Safety
/// The CPU must support AVX2; `q` holds `x.len()` values, `d` and `offset` one per block
/// of `x` and `halves` two.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_blocks(
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    offset: &mut [f32],
    halves: &mut [i16],
) {
    debug_assert!(q.len() >= x.len() && d.len() >= x.len() / QK && halves.len() >= x.len() / 16);
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let (top, bottom) = (_mm256_set1_ps(127.0), _mm256_set1_ps(-127.0));
    // packs' lane order undone: 32-bit groups [0 4 1 5 2 6 3 7].
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, block) in x.chunks_exact(QK).enumerate() {
        let p = block.as_ptr();
        let v = [0, 8, 16, 24].map(|at| _mm256_loadu_ps(p.add(at)));
        // maxps returns its second operand where either is NaN: NaNs are skipped, as
        // f32::max skips them.
        let mut most = _mm256_setzero_ps();
        for v in v {
            most = _mm256_max_ps(_mm256_and_ps(v, magnitude), most);
        }
        let half = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
        let quarter = _mm_max_ps(half, _mm_movehl_ps(half, half));
        let amax = _mm_cvtss_f32(_mm_max_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let ints = v.map(|v| {
            let y = _mm256_mul_ps(v, inv);
            // NaN (an infinity times 0) becomes 0, as `NaN as i8` does.
            let y = _mm256_and_ps(y, _mm256_cmp_ps(y, y, _CMP_ORD_Q));
            let y = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_cvttps_epi32(_mm256_max_ps(_mm256_min_ps(y, top), bottom))
        });
        let words = [
            _mm256_packs_epi32(ints[0], ints[1]),
            _mm256_packs_epi32(ints[2], ints[3]),
        ];
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words[0], words[1]), order);
        _mm256_storeu_si256(q.as_mut_ptr().add(b * QK) as *mut __m256i, bytes);
        let sum = |a: __m256i, b: __m256i| {
            let s = _mm256_add_epi32(a, b);
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
        };
        let sums = [sum(ints[0], ints[1]) as i16, sum(ints[2], ints[3]) as i16];
        halves[2 * b..2 * b + 2].copy_from_slice(&sums);
        d[b] = scale;
        offset[b] = scale * f32::from(sums[0] + sums[1]);
    }
}
