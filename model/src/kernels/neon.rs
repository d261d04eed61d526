//! The NEON kernels (aarch64: Apple Silicon, Graviton, Ampere, Raspberry Pi 4 and 5), on
//! the same four-row tiles as AVX2. NEON is part of every aarch64 CPU, so these need no
//! run-time check. Products of 8-bit values are widened to 16 bits (`vmull_s8`,
//! `vmlal_s8`: two products per lane, which cannot overflow) and summed across lanes into
//! 32 bits; a block's float scaling is per row.

// `r` indexes a tile's row in the weights, the scales and every output row at once.
#![allow(clippy::needless_range_loop)]

use super::{ActRow, BlockScales, QK, TILE};
use std::arch::aarch64::*;

/// `Σ w[i] * a[i]` over 16 signed bytes (each product below 2^14 in magnitude, so two per
/// 16-bit lane are safe).
#[inline(always)]
unsafe fn dot16(w: int8x16_t, a: int8x16_t) -> i32 {
    let p = vmlal_s8(
        vmull_s8(vget_low_s8(w), vget_low_s8(a)),
        vget_high_s8(w),
        vget_high_s8(a),
    );
    vaddlvq_s16(p)
}

fn half(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Nibble tiles (Q4_0, Q4_1, Q4_K): as `x86::tile_dot`.
///
/// # Safety
/// `scales` (and `mins`, unless empty) cover `kb` blocks of four rows, `quants` `kb * 64` bytes,
/// and each activation row `kb` blocks.
pub(super) unsafe fn tile_dot<const A: usize>(
    kb: usize,
    scales: BlockScales,
    mins: BlockScales,
    quants: &[u8],
    acts: [ActRow; A],
) -> [[f32; TILE]; A] {
    debug_assert!(quants.len() >= kb * TILE * 16);
    let low = vdupq_n_u8(0x0F);
    let mut out = [[0f32; TILE]; A];
    for b in 0..kb {
        for r in 0..TILE {
            let i = b * TILE + r;
            let q = vld1q_u8(quants.as_ptr().add(i * 16));
            let lo = vreinterpretq_s8_u8(vandq_u8(q, low));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
            let d = scales.value(b, r, TILE);
            // Q4_0's value is d * (q - 8): its constant term is 8d.
            let constant = if mins.is_empty() {
                8.0 * d
            } else {
                mins.value(b, r, TILE)
            };
            for (a, act) in acts.iter().enumerate() {
                let p = act.q.as_ptr().add(b * QK);
                let sum = dot16(lo, vld1q_s8(p)) + dot16(hi, vld1q_s8(p.add(16)));
                out[a][r] += d * act.d[b] * sum as f32 - constant * act.offset[b];
            }
        }
    }
    out
}

/// Q8_0 tiles: as `x86::q8_tile_dot`.
///
/// # Safety
/// As `tile_dot`, with `quants` holding `kb * 128` bytes.
pub(super) unsafe fn q8_tile_dot<const A: usize>(
    kb: usize,
    scales: &[u16],
    quants: &[u8],
    acts: [ActRow; A],
) -> [[f32; TILE]; A] {
    debug_assert!(scales.len() >= kb * TILE && quants.len() >= kb * TILE * QK);
    let mut out = [[0f32; TILE]; A];
    for b in 0..kb {
        for r in 0..TILE {
            let i = b * TILE + r;
            let w = quants.as_ptr().add(i * QK) as *const i8;
            let (w0, w1) = (vld1q_s8(w), vld1q_s8(w.add(16)));
            let d = half(scales[i]);
            for (a, act) in acts.iter().enumerate() {
                let p = act.q.as_ptr().add(b * QK);
                let sum = dot16(w0, vld1q_s8(p)) + dot16(w1, vld1q_s8(p.add(16)));
                out[a][r] += d * act.d[b] * sum as f32;
            }
        }
    }
    out
}

/// Six-bit tiles (Q5_0, Q5_1, Q5_K, Q6_K): as `x86::six_tile_dot`.
///
/// # Safety
/// As `x86::six_tile_dot`.
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
    let low = vdupq_n_u8(0x0F);
    let pair = vdupq_n_u8(0x03);
    let bias = vdupq_n_s8(bias as i8);
    let mut out = [[0f32; TILE]; A];
    for b in 0..kb {
        for r in 0..TILE {
            let i = b * TILE + r;
            let q = vld1q_u8(quants.as_ptr().add(i * 16));
            // This row's bit pairs: values 0..16 in bits 0-1, 16..32 in bits 2-3 (rows 2
            // and 3 keep theirs four bits up).
            let plane = vld1q_u8(high.as_ptr().add(b * QK + (r % 2) * 16));
            let plane = if r >= 2 { vshrq_n_u8(plane, 4) } else { plane };
            let lo = vorrq_u8(vandq_u8(q, low), vshlq_n_u8(vandq_u8(plane, pair), 4));
            let hi = vorrq_u8(
                vshrq_n_u8(q, 4),
                vshlq_n_u8(vandq_u8(vshrq_n_u8(plane, 2), pair), 4),
            );
            let lo = vsubq_s8(vreinterpretq_s8_u8(lo), bias);
            let hi = vsubq_s8(vreinterpretq_s8_u8(hi), bias);
            let (s_lo, s_hi) = (i32::from(subscales[2 * i]), i32::from(subscales[2 * i + 1]));
            let d = scales.value(b, r, TILE);
            let constant = if mins.is_empty() {
                0.0
            } else {
                mins.value(b, r, TILE)
            };
            for (a, act) in acts.iter().enumerate() {
                let p = act.q.as_ptr().add(b * QK);
                let sum = s_lo * dot16(lo, vld1q_s8(p)) + s_hi * dot16(hi, vld1q_s8(p.add(16)));
                out[a][r] += d * act.d[b] * sum as f32 - constant * act.offset[b];
            }
        }
    }
    out
}
