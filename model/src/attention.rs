//! Causal attention on the CPU, one (query row, head) at a time over the cached keys and
//! values, in portable code.
//!
//! Why our own: candle's batched matmuls choose their blocking by shape, so a position's
//! scores depend on how many positions were computed beside it. Here each output is its
//! own fixed-order reduction over the positions it may see, so a prefill of a whole
//! history gives bit for bit what decoding it one token at a time gave: the property a
//! resumed answer needs to equal its undisturbed twin. It also never materialises the
//! `[heads, n, n]` score matrix of a prefill: each task holds one row of scores.

use rayon::prelude::*;

use crate::kernels::dot;

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
    let mut out = vec![0f32; n * heads * hd];
    out.par_chunks_mut(hd).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (item, o)| {
            let (i, h) = (item / heads, item % heads);
            let g = h / groups;
            let query = &q[(h * n + i) * hd..(h * n + i + 1) * hd];
            let visible = start + i + 1;
            scores.clear();
            scores.extend((0..visible).map(|j| dot(query, keys.row(g, j, hd)) * scale));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(0.0);
            for (j, &w) in scores.iter().enumerate() {
                for (acc, v) in o.iter_mut().zip(values.row(g, j, hd)) {
                    *acc += w * v;
                }
            }
            let inv = 1.0 / sum;
            for acc in o.iter_mut() {
                *acc *= inv;
            }
        },
    );
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
    fn reference(
        q: &[f32],
        n: usize,
        start: usize,
        s: Heads,
        k: &[f32],
        v: &[f32],
        cap: usize,
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
                            * 0.125
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
        let want = reference(&q, n, 2, shape, &k, &v, cap);
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
}
