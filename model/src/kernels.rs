//! Matrix multiplication kernels for x86-64 CPUs with AVX2, FMA and F16C: packed Q4_0,
//! Q8_0 and Q4_K, and F16 weights against F32 activations; and portable dense F32.
//!
//! Every kernel here computes each output from its own activation row alone, in a fixed
//! order: a row's result never depends on how many rows share the batch. Replaying a
//! sequence in one prefill therefore rebuilds exactly the cache its decode steps built.
//!
//! Why our own kernel: candle's CPU path computes one dot product per (activation row,
//! weight row) pair and so unpacks every 4-bit weight block again for each activation
//! row, and reads the weights once per row tile. Here the weights are repacked at load
//! into tiles of four rows, block-interleaved, so one pass over a tile unpacks each block
//! once and multiplies it against several activation rows while it sits in registers.
//! That is what makes batched decode and prefill cheaper than one row at a time. The
//! packed form keeps Q4_0's 18 bytes per 32 weights: nothing is expanded.
//!
//! Activations are quantized per block of 32 to 8 bits (as llama.cpp and candle do). The
//! 4-bit weights are used as unsigned nibbles `q` (value `q - 8`), so a single
//! `maddubs` multiplies them; the `- 8 * sum(a)` offset is folded in per block.
//!
//! This module's `unsafe` is SIMD intrinsics behind a runtime CPU check (`attention` has
//! the only other: its portable code compiled for AVX2, behind the same kind of check).
#![allow(unsafe_code)]

use rayon::prelude::*;

/// Values per Q4_0 / Q8_0 block.
const QK: usize = 32;
/// Weight rows per tile.
const TILE: usize = 4;

/// Set to `candle` to use candle's kernels everywhere (to measure ours against them).
pub const KERNELS_ENV: &str = "STRATA_KERNELS";

/// Whether this CPU can run the kernels (and `STRATA_KERNELS=candle` does not opt out).
pub fn available() -> bool {
    if std::env::var(KERNELS_ENV).is_ok_and(|v| v == "candle") {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The block formats the tiles hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileFormat {
    /// 4-bit: an f16 scale and 16 bytes of nibbles per 32 values.
    Q4_0,
    /// 8-bit: an f16 scale and 32 signed bytes per 32 values.
    Q8_0,
    /// llama.cpp's Q4_K, unpacked at load into Q4_0-shaped blocks of 32 that carry their
    /// own scale and minimum (`value = scale * q - min`): 5 bits per weight instead of 4.5,
    /// and the Q4_0 kernel with one more term.
    Q4K,
}

impl TileFormat {
    /// Bytes of weights (after the scale) per block.
    fn quant_bytes(self) -> usize {
        match self {
            TileFormat::Q4_0 | TileFormat::Q4K => 16,
            TileFormat::Q8_0 => 32,
        }
    }
}

/// A Q4_0 or Q8_0 matrix `[n, k]` repacked into tiles of four rows.
#[derive(Debug)]
pub struct QuantTiles {
    format: TileFormat,
    n: usize,
    k: usize,
    /// `[n / 4][k / 32][4]` f16 scales.
    scales: Vec<u16>,
    /// `[n / 4][k / 32][4][quant_bytes]` weights, as in the file.
    quants: Vec<u8>,
    /// `[n / 4][k / 32][4]` f16 minimums (Q4_K only; empty otherwise).
    mins: Vec<u16>,
}

/// Bytes of one Q4_K super-block of 256 values: d, dmin, 12 bytes of 6-bit scales and
/// mins, 128 bytes of nibbles.
const Q4K_BLOCK_BYTES: usize = 144;

/// Unpacks Q4_K rows into per-32 blocks: (f16 scale, f16 min, Q4_0-ordered nibbles).
fn q4k_to_blocks(bytes: &[u8], n: usize, k: usize) -> Option<(Vec<u16>, Vec<u16>, Vec<u8>)> {
    if !k.is_multiple_of(256) || bytes.len() != n * (k / 256) * Q4K_BLOCK_BYTES {
        return None;
    }
    let kb = k / QK;
    let mut scales = vec![0u16; n * kb];
    let mut mins = vec![0u16; n * kb];
    let mut quants = vec![0u8; n * kb * 16];
    for (sb, block) in bytes.chunks_exact(Q4K_BLOCK_BYTES).enumerate() {
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let dmin = half::f16::from_le_bytes([block[2], block[3]]).to_f32();
        let packed = &block[4..16];
        let qs = &block[16..144];
        for j in 0..8 {
            let (sc, m) = if j < 4 {
                (packed[j] & 63, packed[j + 4] & 63)
            } else {
                (
                    (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
                    (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
                )
            };
            let i = sb * 8 + j; // sub-block index over the whole matrix, row-major
            scales[i] = half::f16::from_f32(d * f32::from(sc)).to_bits();
            mins[i] = half::f16::from_f32(dmin * f32::from(m)).to_bits();
            // Sub-blocks 2g and 2g+1 share 32 bytes: low nibbles, then high nibbles.
            let group = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
            let value = |l: usize| {
                if j % 2 == 0 {
                    group[l] & 0x0F
                } else {
                    group[l] >> 4
                }
            };
            for l in 0..16 {
                quants[i * 16 + l] = value(l) | (value(l + 16) << 4);
            }
        }
    }
    Some((scales, mins, quants))
}

/// Activation rows quantized to 8 bits per block of 32.
struct Q8Rows {
    q: Vec<i8>,
    /// Scale per block.
    d: Vec<f32>,
    /// `d * sum(q)` per block: what a weight block's constant term multiplies.
    offset: Vec<f32>,
}

impl QuantTiles {
    /// Repacks GGUF Q4_0 / Q8_0 data of a `[n, k]` matrix; `None` when this CPU or shape
    /// is not supported (the caller then uses candle's kernels).
    pub fn from_ggml(format: TileFormat, bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if !available() || !n.is_multiple_of(TILE) || !k.is_multiple_of(QK) {
            return None;
        }
        let qb = format.quant_bytes();
        let kb = k / QK;
        // Row-major blocks first (scale, optional min, weights), then tiled.
        let (row_scales, row_mins, row_quants) = match format {
            TileFormat::Q4K => q4k_to_blocks(bytes, n, k)?,
            _ => {
                let block = 2 + qb;
                if bytes.len() != n * kb * block {
                    return None;
                }
                let scales = bytes
                    .chunks_exact(block)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect();
                let quants = bytes
                    .chunks_exact(block)
                    .flat_map(|b| b[2..].iter().copied())
                    .collect();
                (scales, Vec::new(), quants)
            }
        };
        let mut scales = vec![0u16; n * kb];
        let mut mins = vec![0u16; row_mins.len()];
        let mut quants = vec![0u8; n * kb * qb];
        for t in 0..n / TILE {
            for b in 0..kb {
                for r in 0..TILE {
                    let src = (t * TILE + r) * kb + b;
                    let dst = (t * kb + b) * TILE + r;
                    scales[dst] = row_scales[src];
                    if !row_mins.is_empty() {
                        mins[dst] = row_mins[src];
                    }
                    quants[dst * qb..(dst + 1) * qb]
                        .copy_from_slice(&row_quants[src * qb..(src + 1) * qb]);
                }
            }
        }
        Some(QuantTiles {
            format,
            n,
            k,
            scales,
            quants,
            mins,
        })
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features (columns).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Dequantizes row `row` into `out` (`k` values): an embedding lookup.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let kb = self.k / QK;
        let (t, r) = (row / TILE, row % TILE);
        let qb = self.format.quant_bytes();
        for b in 0..kb {
            let i = (t * kb + b) * TILE + r;
            let d = half::f16::from_bits(self.scales[i]).to_f32();
            let q = &self.quants[i * qb..(i + 1) * qb];
            let dst = &mut out[b * QK..(b + 1) * QK];
            match self.format {
                TileFormat::Q4_0 => {
                    for j in 0..16 {
                        dst[j] = d * (f32::from(q[j] & 0x0F) - 8.0);
                        dst[j + 16] = d * (f32::from(q[j] >> 4) - 8.0);
                    }
                }
                TileFormat::Q4K => {
                    let min = half::f16::from_bits(self.mins[i]).to_f32();
                    for j in 0..16 {
                        dst[j] = d * f32::from(q[j] & 0x0F) - min;
                        dst[j + 16] = d * f32::from(q[j] >> 4) - min;
                    }
                }
                TileFormat::Q8_0 => {
                    for (v, &q) in dst.iter_mut().zip(q) {
                        *v = d * f32::from(q as i8);
                    }
                }
            }
        }
    }

    /// `out[m, n] = x[m, k] · selfᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "activations are not [m, k]");
        assert_eq!(out.len(), m * self.n, "output is not [m, n]");
        if m == 0 {
            return;
        }
        let acts = quantize_rows(x, m, self.k);
        let kb = self.k / QK;
        for_each_tile(self.n, m, out, |t, tile_out| {
            self.tile(t, kb, &acts, m, tile_out)
        });
    }

    /// One tile against every activation row, two rows at a time.
    fn tile(&self, t: usize, kb: usize, acts: &Q8Rows, m: usize, out: &mut [f32]) {
        let qb = self.format.quant_bytes();
        let scales = &self.scales[t * kb * TILE..(t + 1) * kb * TILE];
        let quants = &self.quants[t * kb * TILE * qb..(t + 1) * kb * TILE * qb];
        let q8 = self.format == TileFormat::Q8_0;
        let mins = if self.mins.is_empty() {
            &[][..]
        } else {
            &self.mins[t * kb * TILE..(t + 1) * kb * TILE]
        };
        let row = |a: usize| ActRow {
            q: &acts.q[a * kb * QK..(a + 1) * kb * QK],
            d: &acts.d[a * kb..(a + 1) * kb],
            offset: &acts.offset[a * kb..(a + 1) * kb],
        };
        let mut a = 0;
        while a < m {
            let n = (m - a).min(4);
            // SAFETY: `available()` was checked when the tiles were built; slice lengths
            // are `kb` blocks by construction.
            let rows: Vec<[f32; TILE]> = unsafe {
                match (q8, n) {
                    (false, 4) => x86::tile_dot::<4>(
                        kb,
                        scales,
                        mins,
                        quants,
                        [row(a), row(a + 1), row(a + 2), row(a + 3)],
                    )
                    .to_vec(),
                    (false, 3) => x86::tile_dot::<3>(
                        kb,
                        scales,
                        mins,
                        quants,
                        [row(a), row(a + 1), row(a + 2)],
                    )
                    .to_vec(),
                    (false, 2) => {
                        x86::tile_dot::<2>(kb, scales, mins, quants, [row(a), row(a + 1)]).to_vec()
                    }
                    (false, _) => x86::tile_dot::<1>(kb, scales, mins, quants, [row(a)]).to_vec(),
                    (true, 4) => x86::q8_tile_dot::<4>(
                        kb,
                        scales,
                        quants,
                        [row(a), row(a + 1), row(a + 2), row(a + 3)],
                    )
                    .to_vec(),
                    (true, 3) => {
                        x86::q8_tile_dot::<3>(kb, scales, quants, [row(a), row(a + 1), row(a + 2)])
                            .to_vec()
                    }
                    (true, 2) => {
                        x86::q8_tile_dot::<2>(kb, scales, quants, [row(a), row(a + 1)]).to_vec()
                    }
                    (true, _) => x86::q8_tile_dot::<1>(kb, scales, quants, [row(a)]).to_vec(),
                }
            };
            for (i, r) in rows.iter().enumerate() {
                out[(a + i) * TILE..(a + i + 1) * TILE].copy_from_slice(r);
            }
            a += n;
        }
    }
}

/// Runs `tile(t, out)` for every tile of four weight rows, in parallel, each writing its
/// `[m][4]` results, then lays them out as `out[m, n]`.
fn for_each_tile(n: usize, m: usize, out: &mut [f32], tile: impl Fn(usize, &mut [f32]) + Sync) {
    let tiles = n / TILE;
    // Results land tile-major ([tile][row][4]) so each task owns a contiguous slice.
    let mut tiled = vec![0f32; m * n];
    let threads = rayon::current_num_threads().max(1);
    let tiles_per_task = tiles.div_ceil(threads * 8).max(1);
    tiled
        .par_chunks_mut(tiles_per_task * TILE * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * tiles_per_task;
            for (i, tile_out) in chunk.chunks_mut(TILE * m).enumerate() {
                tile(first + i, tile_out);
            }
        });
    if m == 1 {
        out.copy_from_slice(&tiled);
        return;
    }
    for t in 0..tiles {
        for a in 0..m {
            let src = &tiled[(t * m + a) * TILE..(t * m + a + 1) * TILE];
            out[a * n + t * TILE..a * n + (t + 1) * TILE].copy_from_slice(src);
        }
    }
}

/// An F16 matrix `[n, k]` multiplied with F32 activations: the weights are widened to F32
/// in registers, so activations keep their full range (candle's F16 path rounds them to
/// F16, and its small-batch GEMM repacks the whole matrix on every call).
#[derive(Debug)]
pub struct F16Matrix {
    n: usize,
    k: usize,
    data: Vec<half::f16>,
}

impl F16Matrix {
    /// Wraps row-major F16 weights; gives them back when this CPU or shape is not
    /// supported.
    pub fn new(data: Vec<half::f16>, n: usize, k: usize) -> Result<Self, Vec<half::f16>> {
        if !available() || !n.is_multiple_of(TILE) || !k.is_multiple_of(8) || data.len() != n * k {
            return Err(data);
        }
        Ok(F16Matrix { n, k, data })
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features (columns).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `row`, widened: an embedding lookup.
    pub fn row(&self, row: usize, out: &mut [f32]) {
        for (o, w) in out
            .iter_mut()
            .zip(&self.data[row * self.k..(row + 1) * self.k])
        {
            *o = w.to_f32();
        }
    }

    /// `out[m, n] = x[m, k] · selfᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "activations are not [m, k]");
        assert_eq!(out.len(), m * self.n, "output is not [m, n]");
        if m == 0 {
            return;
        }
        let k = self.k;
        for_each_tile(self.n, m, out, |t, tile_out| {
            let w = &self.data[t * TILE * k..(t + 1) * TILE * k];
            let mut a = 0;
            while a < m {
                let n = (m - a).min(2);
                let rows = &x[a * k..(a + n) * k];
                // SAFETY: `available()` was checked in `new`; `w` holds four rows of `k`
                // values and `rows` `n` rows of `k`, `k` a multiple of 8.
                let r = unsafe {
                    match n {
                        2 => x86::f16_tile_dot::<2>(k, w, rows).to_vec(),
                        _ => x86::f16_tile_dot::<1>(k, w, rows).to_vec(),
                    }
                };
                for (i, r) in r.iter().enumerate() {
                    tile_out[(a + i) * TILE..(a + i + 1) * TILE].copy_from_slice(r);
                }
                a += n;
            }
        });
    }
}

/// Whether our portable kernels are used (`STRATA_KERNELS=candle` opts out everywhere).
pub fn portable_enabled() -> bool {
    !std::env::var(KERNELS_ENV).is_ok_and(|v| v == "candle")
}

/// Dense F32 weights `[n, k]` against F32 activations, in portable code.
///
/// Why our own: candle's GEMM picks its blocking by the number of activation rows, so a
/// row's result depends on which other rows share its batch. Here every output is one
/// dot product in a fixed order, whatever the batch: a sequence replayed in one prefill
/// gets bit for bit the keys and values that decoding it step by step produced.
#[derive(Debug)]
pub struct DenseMatrix {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl DenseMatrix {
    /// Wraps row-major weights; gives them back when the shape is not supported.
    pub fn new(data: Vec<f32>, n: usize, k: usize) -> Result<Self, Vec<f32>> {
        if !portable_enabled() || !n.is_multiple_of(TILE) || data.len() != n * k {
            return Err(data);
        }
        Ok(DenseMatrix { n, k, data })
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features (columns).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `row`: an embedding lookup.
    pub fn row(&self, row: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.data[row * self.k..(row + 1) * self.k]);
    }

    /// `out[m, n] = x[m, k] · selfᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "activations are not [m, k]");
        assert_eq!(out.len(), m * self.n, "output is not [m, n]");
        if m == 0 {
            return;
        }
        let k = self.k;
        for_each_tile(self.n, m, out, |t, tile_out| {
            for a in 0..m {
                let row = &x[a * k..(a + 1) * k];
                for r in 0..TILE {
                    let w = &self.data[(t * TILE + r) * k..(t * TILE + r + 1) * k];
                    tile_out[a * TILE + r] = dot(row, w);
                }
            }
        });
    }
}

/// Lanes of the portable dot product: independent partial sums the compiler vectorizes.
const LANES: usize = 8;

/// `Σ a[i] · b[i]` in one fixed order (eight interleaved partial sums, then a fixed tree),
/// so the same inputs give the same bits wherever they are computed.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ac = a.chunks_exact(LANES);
    let mut bc = b.chunks_exact(LANES);
    for (x, y) in (&mut ac).zip(&mut bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail
}

/// One quantized activation row.
#[derive(Clone, Copy)]
struct ActRow<'a> {
    q: &'a [i8],
    d: &'a [f32],
    offset: &'a [f32],
}

fn quantize_rows(x: &[f32], m: usize, k: usize) -> Q8Rows {
    let kb = k / QK;
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * kb];
    let mut offset = vec![0f32; m * kb];
    for (i, block) in x.chunks_exact(QK).enumerate() {
        let amax = block.iter().fold(0f32, |acc, v| acc.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (dst, v) in q[i * QK..(i + 1) * QK].iter_mut().zip(block) {
            let v = (v * inv).round().clamp(-127.0, 127.0) as i8;
            *dst = v;
            sum += i32::from(v);
        }
        d[i] = scale;
        offset[i] = scale * sum as f32;
    }
    Q8Rows { q, d, offset }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActRow, QK, TILE};
    use std::arch::x86_64::*;

    /// Dot products of a tile's four weight rows with `A` activation rows.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `scales` holds `kb * 4` values, `quants`
    /// `kb * 64` bytes, and each activation row `kb` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_dot<const A: usize>(
        kb: usize,
        scales: &[u16],
        mins: &[u16],
        quants: &[u8],
        acts: [ActRow; A],
    ) -> [[f32; TILE]; A] {
        debug_assert!(scales.len() >= kb * TILE && quants.len() >= kb * TILE * 16);
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
            let dw = _mm_cvtph_ps(_mm_loadl_epi64(
                scales.as_ptr().add(b * TILE) as *const __m128i
            ));
            let dw_lanes = _mm256_permutevar8x32_ps(_mm256_set_m128(dw, dw), order);
            let constant = if with_mins {
                _mm_cvtph_ps(_mm_loadl_epi64(
                    mins.as_ptr().add(b * TILE) as *const __m128i
                ))
            } else {
                _mm_mul_ps(dw, eight)
            };
            // Rows 0 and 1 (and 2 and 3) are adjacent: one load each, low nibbles are
            // values 0..16 of the block, high nibbles values 16..32.
            let q01 = _mm256_loadu_si256(quants.as_ptr().add(b * TILE * 16) as *const __m256i);
            let q23 =
                _mm256_loadu_si256(quants.as_ptr().add((b * TILE + 2) * 16) as *const __m256i);
            let lo01 = _mm256_and_si256(q01, low);
            let hi01 = _mm256_and_si256(_mm256_srli_epi16(q01, 4), low);
            let lo23 = _mm256_and_si256(q23, low);
            let hi23 = _mm256_and_si256(_mm256_srli_epi16(q23, 4), low);
            for a in 0..A {
                let act = acts[a];
                let q = act.q.as_ptr().add(b * QK);
                let a_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(q as *const __m128i));
                let a_hi =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(q.add(16) as *const __m128i));
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
        let mut out = [[0f32; TILE]; A];
        for a in 0..A {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a]);
            let mut off = [0f32; TILE];
            _mm_storeu_ps(off.as_mut_ptr(), offset[a]);
            out[a] = [
                lanes[0] + lanes[1] - off[0],
                lanes[4] + lanes[5] - off[1],
                lanes[2] + lanes[3] - off[2],
                lanes[6] + lanes[7] - off[3],
            ];
        }
        out
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
            let mut w = [_mm256_setzero_si256(); TILE];
            let mut w_abs = [_mm256_setzero_si256(); TILE];
            for r in 0..TILE {
                w[r] =
                    _mm256_loadu_si256(quants.as_ptr().add((b * TILE + r) * QK) as *const __m256i);
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
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::{ActRow, TILE};

    /// Never called: `available()` is false off x86-64.
    pub(super) unsafe fn q8_tile_dot<const A: usize>(
        _: usize,
        _: &[u16],
        _: &[u8],
        _: [ActRow; A],
    ) -> [[f32; TILE]; A] {
        unreachable!("the Q8_0 kernels only run on x86-64")
    }

    /// Never called: `available()` is false off x86-64.
    pub(super) unsafe fn f16_tile_dot<const A: usize>(
        _: usize,
        _: &[half::f16],
        _: &[f32],
    ) -> [[f32; TILE]; A] {
        unreachable!("the F16 kernels only run on x86-64")
    }

    /// Never called: `available()` is false off x86-64.
    pub(super) unsafe fn tile_dot<const A: usize>(
        _: usize,
        _: &[u16],
        _: &[u16],
        _: &[u8],
        _: [ActRow; A],
    ) -> [[f32; TILE]; A] {
        unreachable!("the Q4_0 kernels only run on x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_candle_and_the_dequantized_weights() {
        if !available() {
            eprintln!("skipping: this CPU lacks AVX2/FMA/F16C");
            return;
        }
        for (ggml, format) in [
            (GgmlDType::Q4_0, TileFormat::Q4_0),
            (GgmlDType::Q8_0, TileFormat::Q8_0),
        ] {
            check_format(ggml, format);
        }
    }

    fn check_format(ggml: GgmlDType, format: TileFormat) {
        let (n, k) = (12, 256);
        let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, ggml).unwrap();
        let tiles = QuantTiles::from_ggml(format, &q.data().unwrap(), n, k).unwrap();
        let dequantized = q.dequantize(&Device::Cpu).unwrap();
        let mut row = vec![0f32; k];
        tiles.dequantize_row(5, &mut row);
        let want = dequantized.get(5).unwrap().to_vec1::<f32>().unwrap();
        // Q4_K's scale times sub-scale is rounded to f16 once unpacked: within 0.1%.
        for (a, b) in row.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs().max(0.05),
                "{format:?}: {a} vs {b}"
            );
        }
        let candle = QMatMul::from_qtensor(q).unwrap();
        for m in [1, 2, 3, 4, 7, 9] {
            let x = random(m * k, 7 + m as u32);
            let mut ours = vec![0f32; m * n];
            tiles.matmul(&x, m, &mut ours);
            let xt = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
            let theirs: Vec<f32> = candle
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let exact: Vec<f32> = xt
                .matmul(&dequantized.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for i in 0..m * n {
                assert!(
                    (ours[i] - theirs[i]).abs() < 5e-3,
                    "m={m} [{i}]: {} vs candle {}",
                    ours[i],
                    theirs[i]
                );
                assert!(
                    (ours[i] - exact[i]).abs() < 0.1 + 0.01 * exact[i].abs(),
                    "m={m} [{i}]: {} vs exact {}",
                    ours[i],
                    exact[i]
                );
            }
        }
    }

    #[test]
    fn f16_matrix_matches_an_f32_matmul_of_the_same_weights() {
        if !available() {
            eprintln!("skipping: this CPU lacks AVX2/FMA/F16C");
            return;
        }
        let (n, k) = (8, 64);
        let w: Vec<half::f16> = random(n * k, 3)
            .into_iter()
            .map(half::f16::from_f32)
            .collect();
        let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let matrix = F16Matrix::new(w, n, k).unwrap();
        for m in [1, 2, 3] {
            let x = random(m * k, 11 + m as u32);
            let mut ours = vec![0f32; m * n];
            matrix.matmul(&x, m, &mut ours);
            for a in 0..m {
                for r in 0..n {
                    let exact: f32 = (0..k).map(|j| x[a * k + j] * wide[r * k + j]).sum();
                    assert!((ours[a * n + r] - exact).abs() < 1e-4, "m={m} a={a} r={r}");
                }
            }
        }
        let mut row = vec![0f32; k];
        matrix.row(3, &mut row);
        assert_eq!(row, wide[3 * k..4 * k]);
    }

    #[test]
    fn unsupported_shapes_fall_back() {
        assert!(QuantTiles::from_ggml(TileFormat::Q4_0, &[0u8; 18 * 3], 3, 32).is_none());
        assert!(QuantTiles::from_ggml(TileFormat::Q4_0, &[0u8; 17], 4, 32).is_none());
        assert!(QuantTiles::from_ggml(TileFormat::Q8_0, &[0u8; 18 * 4], 4, 32).is_none());
    }
}
