//! The AVX-512 kernels, for CPUs with VNNI (Ice Lake and later, Zen 4 and later).
//!
//! One 512-bit register holds a block of all four rows of a tile, and `vpdpbusd`
//! multiplies unsigned weight bytes by signed activation bytes and adds each four
//! products into a 32-bit lane in one instruction (AVX2 needs `maddubs`, `madd` and an
//! add, and saturates at 16 bits). Results equal the AVX2 kernels' up to the order of
//! float additions within a row.

use super::x86::{four_scales, prefetch};
use super::{ActRow, BlockScales, QK, TILE};
use std::arch::x86_64::*;

/// Lane `i` of the result holds row `i / 4`'s value of `four` (rows' scales spread
/// over the four lanes each row's products land in).
#[inline(always)]
unsafe fn per_row_lanes(four: __m128) -> __m512 {
    let index = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    _mm512_permutexvar_ps(index, _mm512_castps128_ps512(four))
}

/// Four f16 values at `at`, widened.
#[inline(always)]
unsafe fn four_halves(at: *const u16) -> __m128 {
    _mm_cvtph_ps(_mm_loadl_epi64(at as *const __m128i))
}

/// Sums each row's four lanes (`[r0 r0 r0 r0 r1 …]`) and subtracts its constant term.
#[inline(always)]
unsafe fn finish(acc: __m512, offset: __m128) -> [f32; TILE] {
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut off = [0f32; TILE];
    _mm_storeu_ps(off.as_mut_ptr(), offset);
    std::array::from_fn(|r| {
        let l = &lanes[4 * r..4 * r + 4];
        ((l[0] + l[1]) + (l[2] + l[3])) - off[r]
    })
}

/// Nibble tiles (Q4_0, Q4_1, Q4_K): as `x86::tile_dot`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, FMA and F16C; the slices are as
/// `x86::tile_dot` requires.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn tile_dot<const A: usize>(
    kb: usize,
    scales: BlockScales,
    mins: BlockScales,
    quants: &[u8],
    acts: [ActRow; A],
) -> [[f32; TILE]; A] {
    debug_assert!(quants.len() >= kb * TILE * 16);
    let with_mins = !mins.is_empty();
    let low = _mm512_set1_epi8(0x0F);
    let eight = _mm_set1_ps(8.0);
    let mut acc = [_mm512_setzero_ps(); A];
    let mut offset = [_mm_setzero_ps(); A];
    for b in 0..kb {
        let dw = four_scales(&scales, b);
        let dw_lanes = per_row_lanes(dw);
        let constant = if with_mins {
            four_scales(&mins, b)
        } else {
            _mm_mul_ps(dw, eight)
        };
        // Rows 0..4 of the block: low nibbles are values 0..16, high nibbles 16..32.
        prefetch(quants.as_ptr().add(b * TILE * 16), 1);
        let q = _mm512_loadu_si512(quants.as_ptr().add(b * TILE * 16) as *const __m512i);
        let lo = _mm512_and_si512(q, low);
        let hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
        for a in 0..A {
            let act = acts[a];
            let p = act.q.as_ptr().add(b * QK);
            let a_lo = _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
            let a_hi = _mm512_broadcast_i32x4(_mm_loadu_si128(p.add(16) as *const __m128i));
            let sums = _mm512_dpbusd_epi32(
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, a_lo),
                hi,
                a_hi,
            );
            let scale = _mm512_mul_ps(dw_lanes, _mm512_set1_ps(*act.d.get_unchecked(b)));
            acc[a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[a]);
            offset[a] = _mm_fmadd_ps(
                constant,
                _mm_set1_ps(*act.offset.get_unchecked(b)),
                offset[a],
            );
        }
    }
    std::array::from_fn(|a| finish(acc[a], offset[a]))
}

/// Q8_0 tiles. The signed weights are flipped to unsigned (`w + 128`, an XOR of the
/// sign bit) for `vpdpbusd`; the `128 * sum(a)` that adds is taken off per block, as
/// Q4_0's `8 * sum(a)` is.
///
/// # Safety
/// As `tile_dot`, with `quants` holding `kb * 128` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn q8_tile_dot<const A: usize>(
    kb: usize,
    scales: &[u16],
    quants: &[u8],
    acts: [ActRow; A],
) -> [[f32; TILE]; A] {
    debug_assert!(scales.len() >= kb * TILE && quants.len() >= kb * TILE * QK);
    let flip = _mm512_set1_epi8(-128);
    let bias = _mm_set1_ps(128.0);
    // Rows 0 and 1 share one register (32 bytes each), rows 2 and 3 the other; lanes
    // 0..8 are row 0's, 8..16 row 1's. Summing lane pairs leaves [r0 r0 r0 r0 r1 …].
    let pairs = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let mut acc = [_mm512_setzero_ps(); A];
    let mut offset = [_mm_setzero_ps(); A];
    for b in 0..kb {
        let dw = four_halves(scales.as_ptr().add(b * TILE));
        let dw_lanes = per_row_lanes(dw);
        let constant = _mm_mul_ps(dw, bias);
        prefetch(quants.as_ptr().add(b * TILE * QK), 2);
        let w01 = _mm512_xor_si512(
            _mm512_loadu_si512(quants.as_ptr().add(b * TILE * QK) as *const __m512i),
            flip,
        );
        let w23 = _mm512_xor_si512(
            _mm512_loadu_si512(quants.as_ptr().add((b * TILE + 2) * QK) as *const __m512i),
            flip,
        );
        for a in 0..A {
            let act = acts[a];
            let av = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                act.q.as_ptr().add(b * QK) as *const __m256i
            ));
            let s01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w01, av);
            let s23 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w23, av);
            // Adjacent lanes of a row added: [r0 ×4 | r1 ×4 | r2 ×4 | r3 ×4].
            let even = _mm512_permutex2var_epi32(s01, pairs, s23);
            let odd =
                _mm512_permutex2var_epi32(s01, _mm512_add_epi32(pairs, _mm512_set1_epi32(1)), s23);
            let sums = _mm512_add_epi32(even, odd);
            let scale = _mm512_mul_ps(dw_lanes, _mm512_set1_ps(*act.d.get_unchecked(b)));
            acc[a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[a]);
            offset[a] = _mm_fmadd_ps(
                constant,
                _mm_set1_ps(*act.offset.get_unchecked(b)),
                offset[a],
            );
        }
    }
    std::array::from_fn(|a| finish(acc[a], offset[a]))
}

/// Six-bit tiles (Q5_0, Q5_1, Q5_K, Q6_K): as `x86::six_tile_dot`, four rows per
/// register, the sub-scales applied by `vpdpwssd`.
///
/// # Safety
/// As `x86::six_tile_dot`, and the CPU must support AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
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
    let low = _mm512_set1_epi8(0x0F);
    let pair = _mm512_set1_epi8(0x30);
    let bias_bytes = _mm512_set1_epi8(bias as i8);
    // The high plane, loaded into both halves: rows 0 and 1 take bit pairs 0-1 (values
    // 0..16) and 2-3 (16..32), rows 2 and 3 pairs 4-5 and 6-7. Shift counts per 16-bit
    // lane move each into bits 4-5.
    let half = |first: i16, second: i16| {
        _mm512_inserti64x4(_mm512_set1_epi16(first), _mm256_set1_epi16(second), 1)
    };
    let (lo_left, hi_left, hi_right) = (half(4, 0), half(2, 0), half(0, 2));
    // Sub-scales as 16-bit lanes: [r0 lo ×8 | r1 lo ×8 | r2 lo ×8 | r3 lo ×8] from
    // [r0 lo, r0 hi, r1 lo, r1 hi, …].
    let spread = |first: i16| {
        let mut index = [0i16; 32];
        for (lane, slot) in index.iter_mut().enumerate() {
            *slot = 2 * (lane / 8) as i16 + first;
        }
        _mm512_loadu_si512(index.as_ptr() as *const __m512i)
    };
    let (pick_lo, pick_hi) = (spread(0), spread(1));
    let mut acc = [_mm512_setzero_ps(); A];
    let mut offset = [_mm_setzero_ps(); A];
    for b in 0..kb {
        let dw_lanes = per_row_lanes(four_scales(&scales, b));
        prefetch(quants.as_ptr().add(b * TILE * 16), 1);
        if b % 2 == 0 {
            prefetch(high.as_ptr().add(b * QK), 1);
        }
        let q = _mm512_loadu_si512(quants.as_ptr().add(b * TILE * 16) as *const __m512i);
        let h = _mm512_broadcast_i64x4(_mm256_loadu_si256(
            high.as_ptr().add(b * QK) as *const __m256i
        ));
        let lo = _mm512_or_si512(
            _mm512_and_si512(q, low),
            _mm512_and_si512(_mm512_sllv_epi16(h, lo_left), pair),
        );
        let hi = _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16(q, 4), low),
            _mm512_and_si512(
                _mm512_srlv_epi16(_mm512_sllv_epi16(h, hi_left), hi_right),
                pair,
            ),
        );
        let subs = _mm512_cvtepi8_epi16(_mm256_castsi128_si256(_mm_loadl_epi64(
            subscales.as_ptr().add(b * TILE * 2) as *const __m128i,
        )));
        let s_lo = _mm512_permutexvar_epi16(pick_lo, subs);
        let s_hi = _mm512_permutexvar_epi16(pick_hi, subs);
        let constant = if with_mins {
            four_scales(&mins, b)
        } else {
            _mm_setzero_ps()
        };
        for a in 0..A {
            let act = acts[a];
            let p = act.q.as_ptr().add(b * QK);
            let a_lo = _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
            let a_hi = _mm512_broadcast_i32x4(_mm_loadu_si128(p.add(16) as *const __m128i));
            // |q - bias| <= 63 and |a| <= 127: every 16-bit lane stays below 2^15.
            let p_lo = _mm512_sub_epi16(
                _mm512_maddubs_epi16(lo, a_lo),
                _mm512_maddubs_epi16(bias_bytes, a_lo),
            );
            let p_hi = _mm512_sub_epi16(
                _mm512_maddubs_epi16(hi, a_hi),
                _mm512_maddubs_epi16(bias_bytes, a_hi),
            );
            let sums = _mm512_dpwssd_epi32(
                _mm512_dpwssd_epi32(_mm512_setzero_si512(), p_lo, s_lo),
                p_hi,
                s_hi,
            );
            let scale = _mm512_mul_ps(dw_lanes, _mm512_set1_ps(*act.d.get_unchecked(b)));
            acc[a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[a]);
            if with_mins {
                offset[a] = _mm_fmadd_ps(
                    constant,
                    _mm_set1_ps(*act.offset.get_unchecked(b)),
                    offset[a],
                );
            }
        }
    }
    std::array::from_fn(|a| finish(acc[a], offset[a]))
}

/// Rows per wide tile: one 512-bit register holds four bytes of each.
pub(super) const WIDE: usize = 16;

/// Each activation row's sixteen outputs: its sums less its constant terms.
#[inline(always)]
unsafe fn wide_finish<const A: usize>(acc: [__m512; A], offset: [__m512; A]) -> [[f32; WIDE]; A] {
    let mut out = [[0f32; WIDE]; A];
    for a in 0..A {
        _mm512_storeu_ps(out[a].as_mut_ptr(), _mm512_sub_ps(acc[a], offset[a]));
    }
    out
}

/// Block `b`'s sixteen scales (or minimums), widened: the f16s times the block's bytes
/// where it has them.
#[inline(always)]
unsafe fn wide_scales(s: &BlockScales, b: usize) -> __m512 {
    let at = s.halves.as_ptr().add((b >> s.shift) * WIDE);
    let d = _mm512_cvtph_ps(_mm256_loadu_si256(at as *const __m256i));
    if s.bytes.is_empty() {
        return d;
    }
    let bytes = _mm_loadu_si128(s.bytes.as_ptr().add(b * WIDE) as *const __m128i);
    _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)))
}

/// Four activation bytes at `at`, in every 32-bit lane.
#[inline(always)]
unsafe fn four_bytes(at: *const i8) -> __m512i {
    _mm512_set1_epi32((at as *const i32).read_unaligned())
}

/// Wide nibble tiles (Q4_0, Q4_1, Q4_K): sixteen rows, each 32-bit lane one row's output,
/// so every `vpdpbusd` adds four products into sixteen different outputs and a block's
/// scaling is one multiply-add for all sixteen. Per block: `[group g of 4 bytes][row]
/// [4 bytes]` of nibbles (byte `j` holds values `j` and `j + 16`).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, FMA and F16C; `scales` (and `mins`,
/// unless empty) cover `kb` blocks of sixteen rows (`BlockScales::covers`), `quants` holds
/// `kb * 256` bytes, and each activation row `kb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn wide_tile_dot<const A: usize>(
    kb: usize,
    scales: BlockScales,
    mins: BlockScales,
    quants: &[u8],
    acts: [ActRow; A],
) -> [[f32; WIDE]; A] {
    debug_assert!(quants.len() >= kb * WIDE * 16);
    let with_mins = !mins.is_empty();
    let low = _mm512_set1_epi8(0x0F);
    let eight = _mm512_set1_ps(8.0);
    let mut acc = [_mm512_setzero_ps(); A];
    let mut offset = [_mm512_setzero_ps(); A];
    for b in 0..kb {
        let dw = wide_scales(&scales, b);
        let constant = if with_mins {
            wide_scales(&mins, b)
        } else {
            _mm512_mul_ps(dw, eight)
        };
        let base = quants.as_ptr().add(b * WIDE * 16);
        prefetch(base, 4);
        let mut lo = [_mm512_setzero_si512(); 4];
        let mut hi = [_mm512_setzero_si512(); 4];
        for g in 0..4 {
            let q = _mm512_loadu_si512(base.add(g * 64) as *const __m512i);
            lo[g] = _mm512_and_si512(q, low);
            hi[g] = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
        }
        for a in 0..A {
            let act = acts[a];
            let p = act.q.as_ptr().add(b * QK);
            // Two chains of four, so the adds do not wait on each other.
            let mut s_lo = _mm512_setzero_si512();
            let mut s_hi = _mm512_setzero_si512();
            for g in 0..4 {
                s_lo = _mm512_dpbusd_epi32(s_lo, lo[g], four_bytes(p.add(4 * g)));
                s_hi = _mm512_dpbusd_epi32(s_hi, hi[g], four_bytes(p.add(16 + 4 * g)));
            }
            let sums = _mm512_add_epi32(s_lo, s_hi);
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*act.d.get_unchecked(b)));
            acc[a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[a]);
            offset[a] = _mm512_fmadd_ps(
                constant,
                _mm512_set1_ps(*act.offset.get_unchecked(b)),
                offset[a],
            );
        }
    }
    wide_finish(acc, offset)
}

/// Wide Q8_0 tiles: as `wide_tile_dot`, with `[group g of 4 bytes][row][4 bytes]` of
/// signed weights per block, flipped to unsigned as `q8_tile_dot` does.
///
/// # Safety
/// As `wide_tile_dot`, with `quants` holding `kb * 512` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn wide_q8_tile_dot<const A: usize>(
    kb: usize,
    scales: &[u16],
    quants: &[u8],
    acts: [ActRow; A],
) -> [[f32; WIDE]; A] {
    debug_assert!(scales.len() >= kb * WIDE && quants.len() >= kb * WIDE * QK);
    let flip = _mm512_set1_epi8(-128);
    let bias = _mm512_set1_ps(128.0);
    let mut acc = [_mm512_setzero_ps(); A];
    let mut offset = [_mm512_setzero_ps(); A];
    for b in 0..kb {
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(
            scales.as_ptr().add(b * WIDE) as *const __m256i
        ));
        let constant = _mm512_mul_ps(dw, bias);
        let base = quants.as_ptr().add(b * WIDE * QK);
        prefetch(base, 8);
        let mut w = [_mm512_setzero_si512(); 8];
        for (g, w) in w.iter_mut().enumerate() {
            *w = _mm512_xor_si512(_mm512_loadu_si512(base.add(g * 64) as *const __m512i), flip);
        }
        for a in 0..A {
            let act = acts[a];
            let p = act.q.as_ptr().add(b * QK);
            let mut s_even = _mm512_setzero_si512();
            let mut s_odd = _mm512_setzero_si512();
            for g in (0..8).step_by(2) {
                s_even = _mm512_dpbusd_epi32(s_even, w[g], four_bytes(p.add(4 * g)));
                s_odd = _mm512_dpbusd_epi32(s_odd, w[g + 1], four_bytes(p.add(4 * g + 4)));
            }
            let sums = _mm512_add_epi32(s_even, s_odd);
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*act.d.get_unchecked(b)));
            acc[a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[a]);
            offset[a] = _mm512_fmadd_ps(
                constant,
                _mm512_set1_ps(*act.offset.get_unchecked(b)),
                offset[a],
            );
        }
    }
    wide_finish(acc, offset)
}

/// Wide six-bit tiles (Q5_0, Q5_1, Q5_K, Q6_K): sixteen rows, one 32-bit lane each, as
/// `wide_tile_dot`. The nibbles are laid out as there; per block, two 64-byte planes hold
/// the high bit pairs in the same `[row][4 bytes]` order: in plane `g / 2`, bits
/// `4 * (g % 2)..+2` of a byte are the top of group `g`'s value `i` (of the first 16) and
/// the next two bits that of value `16 + i`. The sub-scales, `[2][16]` signed bytes per
/// block (values 0..16, then 16..32), scale each half's sums in float; the bias is taken
/// off each half's sums in integers, from the activations' half sums.
///
/// # Safety
/// As `wide_tile_dot`, with `quants` holding `kb * 256` bytes, `high` `kb * 128` and
/// `subscales` `kb * 32`, and each activation row's `halves` `2 * kb` sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn wide_six_tile_dot<const A: usize>(
    kb: usize,
    scales: BlockScales,
    mins: BlockScales,
    quants: &[u8],
    high: &[u8],
    subscales: &[i8],
    bias: u8,
    acts: [ActRow; A],
) -> [[f32; WIDE]; A] {
    debug_assert!(quants.len() >= kb * WIDE * 16);
    debug_assert!(high.len() >= kb * WIDE * 8 && subscales.len() >= kb * WIDE * 2);
    let with_mins = !mins.is_empty();
    let low = _mm512_set1_epi8(0x0F);
    let pair = _mm512_set1_epi8(0x30);
    let bias = i32::from(bias);
    let mut acc = [_mm512_setzero_ps(); A];
    let mut offset = [_mm512_setzero_ps(); A];
    for b in 0..kb {
        let d = wide_scales(&scales, b);
        let sub = |half: usize| {
            let bytes = _mm_loadu_si128(subscales.as_ptr().add((2 * b + half) * WIDE) as *const _);
            _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)))
        };
        let (d_lo, d_hi) = (sub(0), sub(1));
        let constant = if with_mins {
            wide_scales(&mins, b)
        } else {
            _mm512_setzero_ps()
        };
        let base = quants.as_ptr().add(b * WIDE * 16);
        let planes = high.as_ptr().add(b * WIDE * 8);
        prefetch(base, 4);
        prefetch(planes, 2);
        let mut lo = [_mm512_setzero_si512(); 4];
        let mut hi = [_mm512_setzero_si512(); 4];
        for g in 0..4 {
            let q = _mm512_loadu_si512(base.add(g * 64) as *const __m512i);
            let h = _mm512_loadu_si512(planes.add((g / 2) * 64) as *const __m512i);
            // Move this group's two pairs into bits 4-5 (16-bit shifts: what crosses
            // between the bytes is masked off).
            let (lo_top, hi_top) = if g % 2 == 0 {
                (_mm512_slli_epi16(h, 4), _mm512_slli_epi16(h, 2))
            } else {
                (h, _mm512_srli_epi16(h, 2))
            };
            lo[g] = _mm512_or_si512(_mm512_and_si512(q, low), _mm512_and_si512(lo_top, pair));
            hi[g] = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16(q, 4), low),
                _mm512_and_si512(hi_top, pair),
            );
        }
        for a in 0..A {
            let act = acts[a];
            let p = act.q.as_ptr().add(b * QK);
            let mut s_lo = _mm512_setzero_si512();
            let mut s_hi = _mm512_setzero_si512();
            for g in 0..4 {
                s_lo = _mm512_dpbusd_epi32(s_lo, lo[g], four_bytes(p.add(4 * g)));
                s_hi = _mm512_dpbusd_epi32(s_hi, hi[g], four_bytes(p.add(16 + 4 * g)));
            }
            if bias != 0 {
                let halves = act.halves.as_ptr().add(2 * b);
                s_lo = _mm512_sub_epi32(s_lo, _mm512_set1_epi32(bias * i32::from(*halves)));
                s_hi = _mm512_sub_epi32(s_hi, _mm512_set1_epi32(bias * i32::from(*halves.add(1))));
            }
            let sums = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(s_lo),
                d_lo,
                _mm512_mul_ps(_mm512_cvtepi32_ps(s_hi), d_hi),
            );
            acc[a] = _mm512_fmadd_ps(sums, _mm512_set1_ps(*act.d.get_unchecked(b)), acc[a]);
            if with_mins {
                offset[a] = _mm512_fmadd_ps(
                    constant,
                    _mm512_set1_ps(*act.offset.get_unchecked(b)),
                    offset[a],
                );
            }
        }
    }
    wide_finish(acc, offset)
}
