//! Causal attention on the CPU, tiled in the flash style, in portable code.
//!
//! Why our own: candle's batched matmuls choose their blocking by shape, so a position's
//! scores depend on how many positions were computed beside it. Here each output row is
//! its own fixed-order reduction over the positions it may see, so a prefill of a whole
//! history gives bit for bit what decoding it one token at a time gave: the property a
//! resumed answer needs to equal its undisturbed twin.
//!
//! How: keys are visited in tiles of [`KEY_TILE`] positions (transposed once per tile, so
//! that a row's scores are vector sums over the head's dimensions), at fixed places (0, 64, 128,
//! ...), with an online softmax (a running maximum, a running sum and a rescaled
//! accumulator per row), so no score is kept beyond the tile being visited: attention
//! memory is O(rows x tile), whatever the context. A task carries a block of
//! [`ROW_BLOCK`] query rows of all the query heads that share one kv head through the
//! tiles, so each tile of keys is transposed, and each tile of keys and values read, once
//! per block rather than once per row and head: for one decoded token, transposing had
//! cost more than the scores. A row's scores keep one running sum per eight keys, the
//! dimensions outermost, so the sums are independent and the CPU overlaps them. A row's
//! operations, in order, depend only on its own position and the fixed tile boundaries,
//! never on the rows or heads beside it: blocking changes how often memory is read, not
//! the bits.
//!
//! Where the CPU has AVX2, the same code is compiled for it (eight lanes, no fused
//! multiply-adds, so the same bits), behind a runtime check, and a tile's keys are
//! transposed eight by eight in registers: the `unsafe` here.
#![allow(unsafe_code)]

/// Key positions per tile of the online softmax.
const KEY_TILE: usize = 64;
/// Query rows one task carries through the tiles together.
const ROW_BLOCK: usize = 64;

/// The shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (query heads are grouped onto them, adjacent ones together).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// One kv buffer: `[kv_heads, capacity, head_dim]` F32 values, read from `offset`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvBuffer<'a> {
    /// The buffer's storage.
    pub data: &'a [f32],
    /// Where element `(0, 0, 0)` is.
    pub offset: usize,
    /// Elements from one kv head to the next.
    pub head_stride: usize,
}

impl KvBuffer<'_> {
    fn row(&self, head: usize, position: usize, head_dim: usize) -> &[f32] {
        let at = self.offset + head * self.head_stride + position * head_dim;
        &self.data[at..at + head_dim]
    }
}

/// One query row's online-softmax state: the largest score so far, the sum of
/// `exp(score - max)`, and the values weighted the same way.
struct RowState {
    max: f32,
    sum: f32,
    acc: Vec<f32>,
}

impl RowState {
    fn new(head_dim: usize) -> Self {
        RowState {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            acc: vec![0.0; head_dim],
        }
    }

    /// Folds in one tile's scores (overwritten with their weights) and their value rows.
    #[inline(always)]
    fn absorb<'v>(&mut self, scores: &mut [f32], values: impl Iterator<Item = &'v [f32]>) {
        // A maximum is the same in any order: take it lane by lane.
        let mut lanes = [f32::NEG_INFINITY; LANES];
        for chunk in scores.chunks(LANES) {
            for (m, &s) in lanes.iter_mut().zip(chunk) {
                *m = m.max(s);
            }
        }
        let tile_max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let max = self.max.max(tile_max);
        if max != self.max {
            // What was summed against the old maximum is rescaled to the new one (the
            // first tile rescales zeros).
            let correction = exp(self.max - max);
            self.sum *= correction;
            for a in &mut self.acc {
                *a *= correction;
            }
            self.max = max;
        }
        for s in scores.iter_mut() {
            *s = exp(*s - max);
        }
        // The weights' sum: by position in the tile into eight lanes, then a fixed tree.
        let mut sums = [0f32; LANES];
        for chunk in scores.chunks(LANES) {
            for (a, &w) in sums.iter_mut().zip(chunk) {
                *a += w;
            }
        }
        self.sum += ((sums[0] + sums[4]) + (sums[2] + sums[6]))
            + ((sums[1] + sums[5]) + (sums[3] + sums[7]));
        match self.acc.len() {
            16 => weighted_sum::<16>(&mut self.acc, scores, values),
            32 => weighted_sum::<32>(&mut self.acc, scores, values),
            64 => weighted_sum::<64>(&mut self.acc, scores, values),
            128 => weighted_sum::<128>(&mut self.acc, scores, values),
            _ => {
                for (&w, v) in scores.iter().zip(values) {
                    for (a, x) in self.acc.iter_mut().zip(v) {
                        *a += w * x;
                    }
                }
            }
        }
    }

    fn finish(&self, out: &mut [f32]) {
        let inv = 1.0 / self.sum;
        for (o, a) in out.iter_mut().zip(&self.acc) {
            *o = a * inv;
        }
    }
}

/// Lanes of the score loop: eight keys' sums in one vector register.
const LANES: usize = 8;

/// `acc += Σ w_j v_j` for a head of `HD` values, the sums held in registers across the
/// tile.
#[inline(always)]
fn weighted_sum<'v, const HD: usize>(
    acc: &mut [f32],
    weights: &[f32],
    values: impl Iterator<Item = &'v [f32]>,
) {
    let Ok(acc) = <&mut [f32; HD]>::try_from(acc) else {
        return;
    };
    let mut a = *acc;
    for (&w, v) in weights.iter().zip(values) {
        if let Ok(v) = <&[f32; HD]>::try_from(v) {
            for d in 0..HD {
                a[d] += w * v[d];
            }
        }
    }
    *acc = a;
}

/// `e^x` for the softmax's `x <= 0`, in plain arithmetic that vectorises (libm's `expf` is
/// a call per value): `x = n ln 2 + f ln 2` with `n` whole and `|f| <= 1/2`, `2^f` from its
/// Taylor series to the 6th power (relative error under 2e-7), `2^n` written into the
/// exponent bits. Below -87 the answer is 0 to within f32's normal range.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2: f32 = std::f32::consts::LN_2;
    // Adding and taking away 1.5 x 2^23 rounds to a whole number (to even) in f32.
    const ROUND: f32 = 12_582_912.0;
    let t = x.max(-87.0) * LOG2E;
    let shifted = t + ROUND;
    let n = shifted - ROUND;
    let y = (t - n) * LN2;
    let p = 1.0
        + y * (1.0
            + y * (0.5
                + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    // `n` sits in the low bits of `shifted`: its exponent field is taken from there with
    // integer arithmetic (a float-to-integer cast would not vectorise).
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    p * scale
}

/// Eight-key vectors per tile: the tile's keys transposed are `[head_dim][CHUNKS]` of them.
const CHUNKS: usize = KEY_TILE / LANES;

/// One tile's keys, `[len, head_dim]` as the cache holds them, transposed into
/// `keys_t[d * CHUNKS + c][l] = key (c * LANES + l), dimension d`: a row's scores are then
/// sums over the head's dimensions of whole vectors of keys, with no sum across lanes.
#[inline(always)]
fn transpose_keys(tile: &[f32], hd: usize, keys_t: &mut [[f32; LANES]]) {
    for (jj, key) in tile.chunks_exact(hd).enumerate() {
        let (c, l) = (jj / LANES, jj % LANES);
        for (d, &k) in key.iter().enumerate() {
            keys_t[d * CHUNKS + c][l] = k;
        }
    }
}

/// [`transpose_keys`] with AVX2: eight keys by eight dimensions at a time through
/// registers (a transpose moves values, so the bits are the portable version's).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_keys_avx2(tile: &[f32], hd: usize, keys_t: &mut [[f32; LANES]]) {
    use std::arch::x86_64::*;
    let len = tile.len() / hd;
    if !hd.is_multiple_of(LANES) || keys_t.len() < hd * CHUNKS {
        return transpose_keys(tile, hd, keys_t);
    }
    let whole = len / LANES;
    for c in 0..whole {
        for d0 in (0..hd).step_by(LANES) {
            let at = |i: usize| (c * LANES + i) * hd + d0;
            // Every load reads `tile[at(i)..at(i) + 8]`, inside `tile` as
            // `(c * 8 + 7) * hd + d0 + 8 <= len * hd`; every store writes a whole entry of
            // `keys_t`, whose length was checked above.
            let r: [__m256; LANES] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(tile.as_ptr().add(at(i))) });
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let columns = [
                _mm256_permute2f128_ps::<0x20>(s0, s4),
                _mm256_permute2f128_ps::<0x20>(s1, s5),
                _mm256_permute2f128_ps::<0x20>(s2, s6),
                _mm256_permute2f128_ps::<0x20>(s3, s7),
                _mm256_permute2f128_ps::<0x31>(s0, s4),
                _mm256_permute2f128_ps::<0x31>(s1, s5),
                _mm256_permute2f128_ps::<0x31>(s2, s6),
                _mm256_permute2f128_ps::<0x31>(s3, s7),
            ];
            for (j, column) in columns.into_iter().enumerate() {
                let entry = &mut keys_t[(d0 + j) * CHUNKS + c];
                unsafe { _mm256_storeu_ps(entry.as_mut_ptr(), column) };
            }
        }
    }
    // The tile's last keys, fewer than eight.
    transpose_keys(&tile[whole * LANES * hd..], hd, &mut keys_t[whole..]);
}

/// A row's scores against the first `C` eight-key vectors of a transposed tile. The
/// dimensions are the outer loop, so the `C` sums are independent chains the CPU runs
/// side by side; each sum still adds its products in the dimensions' order, as a
/// plain dot product would.
#[inline(always)]
fn tile_scores<const C: usize>(
    query: &[f32],
    keys_t: &[[f32; LANES]],
    scale: f32,
    out: &mut [f32],
) {
    let mut acc = [[0f32; LANES]; C];
    for (d, &qd) in query.iter().enumerate() {
        let Ok(keys) = <&[[f32; LANES]; C]>::try_from(&keys_t[d * CHUNKS..d * CHUNKS + C]) else {
            return;
        };
        for c in 0..C {
            for l in 0..LANES {
                acc[c][l] += qd * keys[c][l];
            }
        }
    }
    for (o, a) in out.chunks_mut(LANES).zip(&acc) {
        for (o, a) in o.iter_mut().zip(a) {
            *o = a * scale;
        }
    }
}

/// The scores of one row against the first `len` keys of a transposed tile.
#[inline(always)]
fn scores_of(query: &[f32], keys_t: &[[f32; LANES]], scale: f32, out: &mut [f32]) {
    match out.len().div_ceil(LANES) {
        1 => tile_scores::<1>(query, keys_t, scale, out),
        2 => tile_scores::<2>(query, keys_t, scale, out),
        3 => tile_scores::<3>(query, keys_t, scale, out),
        4 => tile_scores::<4>(query, keys_t, scale, out),
        5 => tile_scores::<5>(query, keys_t, scale, out),
        6 => tile_scores::<6>(query, keys_t, scale, out),
        7 => tile_scores::<7>(query, keys_t, scale, out),
        _ => tile_scores::<CHUNKS>(query, keys_t, scale, out),
    }
}

/// One task: a block of query rows of the query heads `heads`, which all read kv head
/// `g`, through every tile of keys they see: each tile is transposed once for all of
/// them. Returns the rows' outputs, `[heads, rows, head_dim]`.
#[allow(clippy::too_many_arguments)] // the pieces of one attention call, passed down once
#[inline(always)]
fn block(
    q: &[f32],
    n: usize,
    start: usize,
    hd: usize,
    (heads, g): (std::ops::Range<usize>, usize),
    rows: std::ops::Range<usize>,
    (keys, values): (KvBuffer<'_>, KvBuffer<'_>),
    scale: f32,
    transpose: impl Fn(&[f32], usize, &mut [[f32; LANES]]),
) -> Vec<f32> {
    let mut states: Vec<RowState> = (0..heads.len() * rows.len())
        .map(|_| RowState::new(hd))
        .collect();
    let mut scores = [0f32; KEY_TILE];
    let mut keys_t = vec![[0f32; LANES]; hd * CHUNKS];
    // The last row of the block sees the most positions.
    let seen = start + rows.end;
    let first_key = keys.offset + g * keys.head_stride;
    for tile in (0..seen).step_by(KEY_TILE) {
        let tile_end = (tile + KEY_TILE).min(seen);
        transpose(
            &keys.data[first_key + tile * hd..first_key + tile_end * hd],
            hd,
            &mut keys_t,
        );
        let mut states = states.iter_mut();
        for h in heads.clone() {
            for i in rows.clone() {
                let Some(state) = states.next() else {
                    break;
                };
                let visible = start + i + 1;
                if tile >= visible {
                    continue;
                }
                let len = (tile + KEY_TILE).min(visible) - tile;
                let query = &q[(h * n + i) * hd..(h * n + i + 1) * hd];
                let tile_scores = &mut scores[..len];
                scores_of(query, &keys_t, scale, tile_scores);
                state.absorb(
                    tile_scores,
                    (tile..tile + len).map(|j| values.row(g, j, hd)),
                );
            }
        }
    }
    let mut out = vec![0f32; states.len() * hd];
    for (state, o) in states.iter().zip(out.chunks_exact_mut(hd)) {
        state.finish(o);
    }
    out
}

/// [`block`] compiled for AVX2: the same operations in the same order (no fused
/// multiply-adds), eight lanes wide, so the same bits as the portable build.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx2(
    q: &[f32],
    n: usize,
    start: usize,
    hd: usize,
    heads: (std::ops::Range<usize>, usize),
    rows: std::ops::Range<usize>,
    kv: (KvBuffer<'_>, KvBuffer<'_>),
    scale: f32,
) -> Vec<f32> {
    block(
        q,
        n,
        start,
        hd,
        heads,
        rows,
        kv,
        scale,
        |tile, hd, keys_t| {
            // Safety: this function runs only where AVX2 is.
            unsafe { transpose_keys_avx2(tile, hd, keys_t) }
        },
    )
}

/// Attention of `n` new positions starting at `start`: `q` is `[heads, n, head_dim]`, the
/// buffers hold at least `start + n` positions. Returns `[n, heads * head_dim]`.
pub(crate) fn causal(
    q: &[f32],
    n: usize,
    start: usize,
    shape: Heads,
    keys: KvBuffer<'_>,
    values: KvBuffer<'_>,
    scale: f32,
) -> Vec<f32> {
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let groups = heads / kv_heads;
    let blocks = n.div_ceil(ROW_BLOCK);
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2");
    // Each task: the query heads of one kv head, one block of their rows, through every
    // tile they need.
    let parts: Vec<Vec<f32>> = crate::kernels::map_range(kv_heads * blocks, |task| {
        let (g, b) = (task / blocks, task % blocks);
        let rows = b * ROW_BLOCK..((b + 1) * ROW_BLOCK).min(n);
        let heads = (g * groups..(g + 1) * groups, g);
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // Safety: the CPU was just found to have AVX2.
            return unsafe { block_avx2(q, n, start, hd, heads, rows, (keys, values), scale) };
        }
        block(
            q,
            n,
            start,
            hd,
            heads,
            rows,
            (keys, values),
            scale,
            transpose_keys,
        )
    });
    let mut out = vec![0f32; n * heads * hd];
    for (task, part) in parts.iter().enumerate() {
        let (g, b) = (task / blocks, task % blocks);
        let block_rows = ((b + 1) * ROW_BLOCK).min(n) - b * ROW_BLOCK;
        for (r, row) in part.chunks_exact(hd).enumerate() {
            let (h, i) = (g * groups + r / block_rows, b * ROW_BLOCK + r % block_rows);
            out[(i * heads + h) * hd..(i * heads + h + 1) * hd].copy_from_slice(row);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    /// Softmax(q·kᵀ·scale)·v written the plain way, in f64.
    #[allow(clippy::too_many_arguments)] // the attention call's own pieces
    fn reference(
        q: &[f32],
        n: usize,
        start: usize,
        s: Heads,
        k: &[f32],
        v: &[f32],
        cap: usize,
        scale: f64,
    ) -> Vec<f32> {
        let hd = s.head_dim;
        let mut out = vec![0f32; n * s.heads * hd];
        for i in 0..n {
            for h in 0..s.heads {
                let g = h / (s.heads / s.kv_heads);
                let qr = &q[(h * n + i) * hd..][..hd];
                let scores: Vec<f64> = (0..=start + i)
                    .map(|j| {
                        let kr = &k[(g * cap + j) * hd..][..hd];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let acc: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(j, w)| w * f64::from(v[(g * cap + j) * hd + d]))
                        .sum();
                    out[(i * s.heads + h) * hd + d] = (acc / sum) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_plain_formula_and_is_the_same_alone_or_in_a_prefill() {
        let shape = Heads {
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
        };
        let cap = 16;
        let k = values(shape.kv_heads * cap * 64, 1);
        let v = values(shape.kv_heads * cap * 64, 2);
        let kb = KvBuffer {
            data: &k,
            offset: 0,
            head_stride: cap * 64,
        };
        let vb = KvBuffer {
            data: &v,
            offset: 0,
            head_stride: cap * 64,
        };
        let n = 9;
        let q = values(shape.heads * n * 64, 3);
        let all = causal(&q, n, 2, shape, kb, vb, 0.125);
        let want = reference(&q, n, 2, shape, &k, &v, cap, 0.125);
        for (a, b) in all.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // The last row alone (a decode step at the same position) is bit-identical.
        let last: Vec<f32> = (0..shape.heads)
            .flat_map(|h| q[(h * n + n - 1) * 64..(h * n + n) * 64].to_vec())
            .collect();
        let alone = causal(&last, 1, 2 + n - 1, shape, kb, vb, 0.125);
        assert_eq!(alone[..], all[(n - 1) * shape.heads * 64..]);
    }

    #[test]
    fn keys_transposed_with_avx2_are_the_portable_transpose() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            for hd in [8, 16, 24, 32, 64, 128, 20] {
                for len in [1, 7, 8, 9, 33, 63, 64] {
                    let tile = values(len * hd, hd as u32);
                    let mut portable = vec![[0f32; LANES]; hd * CHUNKS];
                    let mut avx2 = portable.clone();
                    transpose_keys(&tile, hd, &mut portable);
                    // Safety: the CPU has AVX2 (checked above).
                    unsafe { transpose_keys_avx2(&tile, hd, &mut avx2) };
                    assert_eq!(portable, avx2, "head_dim {hd}, {len} keys");
                    assert_eq!(
                        portable[(hd - 1) * CHUNKS + (len - 1) / LANES][(len - 1) % LANES],
                        tile[len * hd - 1],
                        "the last key's last dimension, where it belongs"
                    );
                }
            }
            return;
        }
        eprintln!("skipping: this CPU lacks AVX2");
    }

    #[test]
    fn the_softmax_exponential_is_close_to_libms() {
        // Within e^-10 of the largest score (the weights that matter) under 1e-6; further
        // down, the rounding of x * log2(e) costs up to about 5e-6 of weights below e^-40.
        let worst = |from: f32| {
            (0..=100_000)
                .map(|i| from - from * i as f32 / 100_000.0)
                .map(|x| (f64::from(exp(x)), f64::from(x).exp()))
                .filter(|(_, want)| *want > 1e-37)
                .map(|(ours, want)| (ours - want).abs() / want)
                .fold(0f64, f64::max)
        };
        assert!(worst(-10.0) < 1e-6, "relative error {}", worst(-10.0));
        assert!(worst(-87.0) < 1e-5, "relative error {}", worst(-87.0));
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-200.0) < 1e-37 && exp(f32::NEG_INFINITY) < 1e-37);
    }

    /// The rows `from..to` of `q` (`[heads, n, hd]`), as a query of their own.
    fn rows(q: &[f32], heads: usize, n: usize, hd: usize, from: usize, to: usize) -> Vec<f32> {
        (0..heads)
            .flat_map(|h| q[(h * n + from) * hd..(h * n + to) * hd].to_vec())
            .collect()
    }

    #[test]
    fn across_many_tiles_and_row_blocks_any_split_gives_the_same_bits() {
        // 16: a head width with its own accumulator in registers; 24: the general loop.
        for hd in [16, 24] {
            many_tiles(hd);
        }
    }

    fn many_tiles(hd: usize) {
        let shape = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: hd,
        };
        let cap = 400;
        let k = values(shape.kv_heads * cap * hd, 4);
        let v = values(shape.kv_heads * cap * hd, 5);
        fn buffer(data: &[f32], head_stride: usize) -> KvBuffer<'_> {
            KvBuffer {
                data,
                offset: 0,
                head_stride,
            }
        }
        let (kb, vb) = (buffer(&k, cap * hd), buffer(&v, cap * hd));
        // 70 new rows after 150 cached: five tiles of keys, five blocks of rows.
        let (start, n) = (150, 70);
        let q = values(shape.heads * n * hd, 6);
        let all = causal(&q, n, start, shape, kb, vb, 0.25);
        let want = reference(&q, n, start, shape, &k, &v, cap, 0.25);
        for (a, b) in all.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // The same rows in other pieces (a prefill chunked differently, a decode step)
        // give the same bits.
        for (from, to) in [(0, 17), (17, 64), (64, 69), (69, 70)] {
            let piece = causal(
                &rows(&q, shape.heads, n, hd, from, to),
                to - from,
                start + from,
                shape,
                kb,
                vb,
                0.25,
            );
            let width = shape.heads * hd;
            assert_eq!(
                piece[..],
                all[from * width..to * width],
                "rows {from}..{to}"
            );
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Not a check: prints the cost of a score at a long context (run with
    /// `cargo test --release -p strata-model --lib attention_speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn attention_speed() {
        let shape = Heads {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
        };
        let (hd, cap, n, start) = (16, 36_000, 256, 35_000);
        let k: Vec<f32> = (0..2 * cap * hd).map(|i| (i % 97) as f32 / 97.0).collect();
        let v = k.clone();
        let q: Vec<f32> = (0..4 * n * hd).map(|i| (i % 89) as f32 / 89.0).collect();
        let buffer = KvBuffer {
            data: &k,
            offset: 0,
            head_stride: cap * hd,
        };
        let values = KvBuffer { data: &v, ..buffer };
        let t = std::time::Instant::now();
        let reps = 5;
        for _ in 0..reps {
            std::hint::black_box(causal(&q, n, start, shape, buffer, values, 0.25));
        }
        let scores = reps as f64 * 4.0 * n as f64 * (start as f64 + n as f64 / 2.0);
        println!(
            "{:.1} ns per score ({:.2} s per call)",
            t.elapsed().as_secs_f64() * 1e9 / scores,
            t.elapsed().as_secs_f64() / reps as f64
        );
    }
}
