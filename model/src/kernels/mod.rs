//! Matrix multiplication kernels for x86-64 CPUs: packed GGUF blocks (Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) and F16 weights against F32 activations, and portable
//! dense F32. The quantized kernels come in two instruction sets, chosen once per process
//! ([`isa`]): AVX-512 with VNNI (`x86_512`: four rows per register, `vpdpbusd`) and AVX2
//! (`x86`); `blocks` unpacks each file format into the three tile layouts they read.
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
//! `maddubs` (or `vpdpbusd`) multiplies them; the `- 8 * sum(a)` offset is folded in per
//! block, as a block's minimum is.
//!
//! Every format's weights stay packed, one copy. The K-quants keep their scales as the
//! file has them: an f16 scale (and minimum) per super-block of 256, and a byte per block
//! of 32 under it. Q4_K takes 4.63 bits per weight (the file's 6-bit sub-scales as bytes,
//! against 4.5), Q6_K its 6.56 (6 bits with a signed scale per 16), and Q5_K 6.88 (in the
//! six-bit tiles, against 5.5).
//!
//! This module's `unsafe` is SIMD intrinsics behind a runtime CPU check (`attention` has
//! the only other: its portable code compiled for AVX2, behind the same kind of check).
#![allow(unsafe_code)]

use std::cell::Cell;

use rayon::prelude::*;

mod blocks;
use blocks::QK;

thread_local! {
    /// Whether this thread runs its forwards' parallel loops in turn ([`alone`]).
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the parallel loops of the forwards it makes (matmuls, attention, the
/// activation quantizer) in turn on this thread, instead of on the compute pool. For a
/// model too small to gain from splitting, a draft model: moving onto the pool's threads
/// and back costs more than its forward (on a VM, waking an idle core took about 100 us,
/// where a draft model's forward took 45).
pub(crate) fn alone<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALONE.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ALONE.with(|a| a.replace(true)));
    f()
}

/// Whether this thread runs inside [`alone`].
pub(crate) fn is_alone() -> bool {
    ALONE.with(Cell::get)
}

/// `f(i)` for every `i` in `0..n`, in order: on the compute pool's threads, or in turn
/// where this thread runs [`alone`].
pub(crate) fn map_range<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if is_alone() {
        (0..n).map(f).collect()
    } else {
        (0..n).into_par_iter().map(f).collect()
    }
}

/// `f(i)` for every `i` in `0..n`: on the compute pool's threads, or in turn where this
/// thread runs [`alone`].
pub(crate) fn for_range(n: usize, f: impl Fn(usize) + Sync + Send) {
    if is_alone() {
        (0..n).for_each(f);
    } else {
        (0..n).into_par_iter().for_each(f);
    }
}

/// Weight rows per tile.
const TILE: usize = 4;

/// Set to `candle` to use candle's kernels everywhere (to measure ours against them), or
/// to `avx2` to keep our kernels to AVX2 on a CPU that has AVX-512.
pub const KERNELS_ENV: &str = "STRATA_KERNELS";

/// The instruction sets our quantized kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 with FMA and F16C (Haswell, Zen 1 and later).
    Avx2,
    /// AVX-512 F, BW, VL and VNNI (Ice Lake, Zen 4 and later), with FMA and F16C.
    Avx512Vnni,
    /// NEON, on every aarch64 CPU (Apple Silicon, Graviton, Raspberry Pi 4 and 5).
    Neon,
}

impl Isa {
    /// The name `strata bench` prints.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Neon => "neon",
        }
    }

    /// Whether this CPU runs it.
    fn supported(self) -> bool {
        #[cfg(target_arch = "aarch64")]
        {
            self == Isa::Neon
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            match self {
                Isa::Avx2 => avx2,
                Isa::Avx512Vnni => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512vnni")
                }
                Isa::Neon => false,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            let _ = self;
            false
        }
    }
}

/// The best instruction set this CPU runs our quantized kernels with, as `STRATA_KERNELS`
/// allows; `None` means candle's kernels. Read once per process.
pub fn isa() -> Option<Isa> {
    static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let choice = std::env::var(KERNELS_ENV).unwrap_or_default();
        if choice == "candle" {
            return None;
        }
        [Isa::Avx512Vnni, Isa::Avx2, Isa::Neon]
            .into_iter()
            .filter(|isa| choice != "avx2" || *isa == Isa::Avx2)
            .find(|isa| isa.supported())
    })
}

/// Whether this CPU can run the kernels (and `STRATA_KERNELS=candle` does not opt out).
pub fn available() -> bool {
    isa().is_some()
}

/// The GGUF block formats our tiles hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileFormat {
    /// 4-bit: an f16 scale and 16 bytes of nibbles per 32 values (`d * (q - 8)`).
    Q4_0,
    /// 4-bit with a minimum: f16 scale and minimum, 16 bytes of nibbles (`d * q + m`).
    Q4_1,
    /// 5-bit: an f16 scale, 32 fifth bits and nibbles (`d * (q - 16)`).
    Q5_0,
    /// 5-bit with a minimum (`d * q + m`).
    Q5_1,
    /// 8-bit: an f16 scale and 32 signed bytes per 32 values.
    Q8_0,
    /// llama.cpp's Q4_K, its nibbles in Q4_0's order, with a byte scale and minimum per
    /// block of 32 under an f16 pair per 256 (`value = d * sc * q - dmin * m`): 4.63 bits
    /// per weight against the file's 4.5, and the Q4_0 kernel with one more term.
    Q4K,
    /// Q5_K, as Q4_K with a fifth bit, in the six-bit tiles.
    Q5K,
    /// Q6_K: super-blocks of 256 with a signed scale per 16 values, in the six-bit tiles
    /// (the file's 6.56 bits per weight). It is the output head of every Q4_K_M
    /// file and half of its `ffn_down` and `attn_v`.
    Q6K,
}

/// How a tile stores its blocks, which decides the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// 16 bytes of nibbles per row and block.
    Nibbles,
    /// 32 signed bytes per row and block.
    Bytes,
    /// Nibbles plus two high bits per value in a shared 32-byte plane per tile block,
    /// and two signed sub-scales per row and block.
    Six,
}

impl TileFormat {
    fn layout(self) -> Layout {
        match self {
            TileFormat::Q4_0 | TileFormat::Q4_1 | TileFormat::Q4K => Layout::Nibbles,
            TileFormat::Q8_0 => Layout::Bytes,
            TileFormat::Q5_0 | TileFormat::Q5_1 | TileFormat::Q5K | TileFormat::Q6K => Layout::Six,
        }
    }

    /// What the six-bit formats subtract from each unsigned value.
    fn bias(self) -> u8 {
        match self {
            TileFormat::Q6K => 32,
            TileFormat::Q5_0 => 16,
            _ => 0,
        }
    }

    /// The file's blocks of an `[n, k]` matrix, row-major.
    fn unpack(self, bytes: &[u8], n: usize, k: usize) -> Option<blocks::RowBlocks> {
        match self {
            TileFormat::Q4_0 => blocks::plain(bytes, n, k, 16),
            TileFormat::Q8_0 => blocks::plain(bytes, n, k, 32),
            TileFormat::Q4_1 => blocks::q4_1(bytes, n, k),
            TileFormat::Q5_0 => blocks::q5(bytes, n, k, false),
            TileFormat::Q5_1 => blocks::q5(bytes, n, k, true),
            TileFormat::Q4K => blocks::q4k(bytes, n, k),
            TileFormat::Q5K => blocks::q5k(bytes, n, k),
            TileFormat::Q6K => blocks::q6k(bytes, n, k),
        }
    }
}

impl Layout {
    /// Bytes per row and block in `quants`.
    fn quant_bytes(self) -> usize {
        match self {
            Layout::Nibbles | Layout::Six => 16,
            Layout::Bytes => 32,
        }
    }
}

/// A quantized matrix `[n, k]` repacked into tiles of four rows.
#[derive(Debug)]
pub struct QuantTiles {
    format: TileFormat,
    /// The kernels these tiles run with.
    isa: Isa,
    /// Rows per tile: 4, or [`WIDE`] for AVX-512's kernels.
    height: usize,
    n: usize,
    k: usize,
    /// Blocks per f16 in `scales` and `mins`, as a power of two: 3 (a super-block) in the
    /// K-quants, 0 elsewhere.
    shift: u32,
    /// `[n / height][(k / 32) >> shift][height]` f16 scales.
    scales: Vec<u16>,
    /// `[n / height][k / 32][height]` bytes that multiply the scales (Q4_K's 6-bit
    /// sub-scales; empty otherwise).
    scale_bytes: Vec<u8>,
    /// `[n / height][k / 32]` blocks of weights: nibbles in Q4_0's order, or bytes; four
    /// rows' `[row][quant_bytes]`, or sixteen rows' `[quant_bytes / 4][row][4]` (four
    /// bytes of each row side by side, as one 32-bit lane each).
    quants: Vec<u8>,
    /// `[n / height][(k / 32) >> shift][height]` f16 minimums (formats with one; empty
    /// otherwise).
    mins: Vec<u16>,
    /// `[n / height][k / 32][height]` bytes that multiply the minimums (Q4_K's and Q5_K's
    /// 6-bit minimums; empty otherwise).
    min_bytes: Vec<u8>,
    /// `[n / height][k / 32][8 * height]` high bit pairs (six-bit tiles; empty
    /// otherwise). Four-row tiles: byte `L` holds, for row `L / 16` and `i = L % 16`, the
    /// pairs of value `i`, value `16 + i`, then the same two of row `2 + L / 16`, so one
    /// 32-byte load serves the whole block. Sixteen-row tiles: see
    /// `x86_512::wide_six_tile_dot`.
    high: Vec<u8>,
    /// Signed scales per 16 values (six-bit tiles only): `[n / 4][k / 32][4][2]`, or
    /// `[n / 16][k / 32][2][16]` in sixteen-row tiles.
    subscales: Vec<i8>,
}

/// One tile's scales, or its minimums, by block: an f16 per `1 << shift` blocks, times a
/// byte per block where there are bytes.
#[derive(Debug, Clone, Copy)]
struct BlockScales<'a> {
    /// `[blocks >> shift][height]` (empty: the tiles have none, as minimums in Q4_0).
    halves: &'a [u16],
    /// `[blocks][height]`, or empty.
    bytes: &'a [u8],
    shift: u32,
}

impl BlockScales<'_> {
    fn is_empty(&self) -> bool {
        self.halves.is_empty()
    }

    /// Whether these hold `blocks` blocks of `height` rows, or nothing: what the kernels
    /// read without checking.
    fn covers(&self, blocks: usize, height: usize) -> bool {
        self.is_empty()
            || (self.halves.len() >= (blocks >> self.shift) * height
                && (self.bytes.is_empty() || self.bytes.len() >= blocks * height))
    }

    /// Row `r`'s value in block `b`, in tiles of `height` rows.
    fn value(&self, b: usize, r: usize, height: usize) -> f32 {
        let d = half::f16::from_bits(self.halves[(b >> self.shift) * height + r]).to_f32();
        match self.bytes.get(b * height + r) {
            Some(&byte) => d * f32::from(byte),
            None => d,
        }
    }
}

/// Activation rows quantized to 8 bits per block of 32.
struct Q8Rows {
    q: Vec<i8>,
    /// Scale per block.
    d: Vec<f32>,
    /// `d * sum(q)` per block: what a weight block's constant term multiplies.
    offset: Vec<f32>,
    /// `sum(q)` of each block's values 0..16 and 16..32 (the wide six-bit kernel takes
    /// its bias off per half, as each half has its own sub-scale).
    halves: Vec<i16>,
}

impl QuantTiles {
    /// Repacks a GGUF matrix `[n, k]` in `format`; `None` when this CPU or shape is not
    /// supported (the caller then uses candle's kernels).
    pub fn from_ggml(format: TileFormat, bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        Self::for_isa(isa()?, format, bytes, n, k)
    }

    /// As `from_ggml`, laid out for `isa`'s kernels (which the caller knows this CPU runs).
    fn for_isa(isa: Isa, format: TileFormat, bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if !n.is_multiple_of(TILE) || !k.is_multiple_of(QK) {
            return None;
        }
        let rows = format.unpack(bytes, n, k)?;
        let layout = format.layout();
        let qb = layout.quant_bytes();
        let kb = k / QK;
        let wide = isa == Isa::Avx512Vnni && n.is_multiple_of(WIDE);
        let height = if wide { WIDE } else { TILE };
        let mut tiles = QuantTiles {
            format,
            isa,
            height,
            n,
            k,
            shift: rows.shift,
            scales: vec![0u16; rows.scales.len()],
            scale_bytes: vec![0u8; rows.scale_bytes.len()],
            quants: vec![0u8; n * kb * qb],
            mins: vec![0u16; rows.mins.len()],
            min_bytes: vec![0u8; rows.min_bytes.len()],
            high: Vec::new(),
            subscales: vec![0i8; rows.subscales.len()],
        };
        if layout == Layout::Six {
            tiles.high = vec![0u8; n * kb * 8];
        }
        for t in 0..n / height {
            for b in 0..kb {
                for r in 0..height {
                    let src = (t * height + r) * kb + b;
                    let dst = (t * kb + b) * height + r;
                    // `kb` is a multiple of the blocks per scale.
                    let (src_half, dst_half) =
                        (src >> rows.shift, ((t * kb + b) >> rows.shift) * height + r);
                    tiles.scales[dst_half] = rows.scales[src_half];
                    if !rows.mins.is_empty() {
                        tiles.mins[dst_half] = rows.mins[src_half];
                    }
                    if !rows.scale_bytes.is_empty() {
                        tiles.scale_bytes[dst] = rows.scale_bytes[src];
                    }
                    if !rows.min_bytes.is_empty() {
                        tiles.min_bytes[dst] = rows.min_bytes[src];
                    }
                    if layout == Layout::Six {
                        let values = &rows.quants[src * QK..(src + 1) * QK];
                        tiles.place_six(t * kb + b, r, values);
                        for half in 0..2 {
                            let at = tiles.subscale_at(t * kb + b, r, half);
                            tiles.subscales[at] = rows.subscales[src * 2 + half];
                        }
                    } else {
                        for (j, &byte) in rows.quants[src * qb..(src + 1) * qb].iter().enumerate() {
                            let at = tiles.byte_at(t * kb + b, r, j);
                            tiles.quants[at] = byte;
                        }
                    }
                }
            }
        }
        Some(tiles)
    }

    /// Writes row `r`'s 32 six-bit `values` into tile block `tb`: low nibbles in Q4_0's
    /// order, high pairs into the block's shared plane.
    fn place_six(&mut self, tb: usize, r: usize, values: &[u8]) {
        for i in 0..16 {
            let at = self.byte_at(tb, r, i);
            self.quants[at] = (values[i] & 0x0F) | ((values[i + 16] & 0x0F) << 4);
            let pairs = (values[i] >> 4) | ((values[i + 16] >> 4) << 2);
            let (at, shift) = self.high_at(tb, r, i);
            self.high[at] |= pairs << shift;
        }
    }

    /// Where the high bit pairs of row `r`'s values `i` and `16 + i` (in that order, two
    /// bits each) live in tile block `tb`'s plane: the byte and the shift.
    fn high_at(&self, tb: usize, r: usize, i: usize) -> (usize, u32) {
        if self.height == WIDE {
            let group = i / 4;
            let at = tb * WIDE * 8 + (group / 2) * 64 + r * 4 + i % 4;
            (at, 4 * (group % 2) as u32)
        } else {
            (tb * QK + (r % 2) * 16 + i, 4 * (r / 2) as u32)
        }
    }

    /// Where row `r`'s sub-scale of values `16 * half..` lives in tile block `tb`.
    fn subscale_at(&self, tb: usize, r: usize, half: usize) -> usize {
        if self.height == WIDE {
            (tb * 2 + half) * WIDE + r
        } else {
            (tb * TILE + r) * 2 + half
        }
    }

    /// Where byte `j` of row `r`'s weights in tile block `tb` lives in `quants`.
    fn byte_at(&self, tb: usize, r: usize, j: usize) -> usize {
        let qb = self.format.layout().quant_bytes();
        if self.height == WIDE {
            tb * WIDE * qb + (j / 4) * WIDE * 4 + r * 4 + j % 4
        } else {
            (tb * TILE + r) * qb + j
        }
    }

    /// Tile `t`'s scales and minimums.
    fn block_scales(&self, t: usize) -> (BlockScales<'_>, BlockScales<'_>) {
        let (h, kb) = (self.height, self.k / QK);
        let blocks = t * kb * h..(t + 1) * kb * h;
        let halves = (blocks.start >> self.shift)..(blocks.end >> self.shift);
        let scales = BlockScales {
            halves: &self.scales[halves.clone()],
            bytes: self.scale_bytes.get(blocks.clone()).unwrap_or(&[]),
            shift: self.shift,
        };
        let mins = BlockScales {
            halves: self.mins.get(halves).unwrap_or(&[]),
            bytes: self.min_bytes.get(blocks).unwrap_or(&[]),
            shift: self.shift,
        };
        (scales, mins)
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features (columns).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Value `j` (of 32) of row `r` in tile block `tb` as an integer
    /// before the scale, with the sub-scale that multiplies it.
    fn raw(&self, tb: usize, r: usize, j: usize) -> (f32, f32) {
        match self.format.layout() {
            Layout::Bytes => (f32::from(self.quants[self.byte_at(tb, r, j)] as i8), 1.0),
            Layout::Nibbles => {
                let byte = self.quants[self.byte_at(tb, r, j % 16)];
                let q = if j < 16 { byte & 0x0F } else { byte >> 4 };
                let bias = if self.format == TileFormat::Q4_0 {
                    8.0
                } else {
                    0.0
                };
                (f32::from(q) - bias, 1.0)
            }
            Layout::Six => {
                let byte = self.quants[self.byte_at(tb, r, j % 16)];
                let low = if j < 16 { byte & 0x0F } else { byte >> 4 };
                let (at, shift) = self.high_at(tb, r, j % 16);
                let pairs = self.high[at] >> shift;
                let high = if j < 16 { pairs & 3 } else { (pairs >> 2) & 3 };
                let q = low | (high << 4);
                let sub = self.subscales[self.subscale_at(tb, r, j / 16)];
                (f32::from(q) - f32::from(self.format.bias()), f32::from(sub))
            }
        }
    }

    /// Dequantizes row `row` into `out` (`k` values): an embedding lookup.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let kb = self.k / QK;
        let (t, r) = (row / self.height, row % self.height);
        let (scales, mins) = self.block_scales(t);
        for b in 0..kb {
            let tb = t * kb + b;
            let d = scales.value(b, r, self.height);
            let min = if mins.is_empty() {
                0.0
            } else {
                mins.value(b, r, self.height)
            };
            for (j, v) in out[b * QK..(b + 1) * QK].iter_mut().enumerate() {
                let (q, sub) = self.raw(tb, r, j);
                *v = d * sub * q - min;
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
        self.matmul_quantized(&QuantizedRows::new(x, m, self.k), out);
    }

    /// As [`QuantTiles::matmul`] with two-term activations ([`QuantizedRows::two_term`]).
    pub fn matmul_two_term(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "activations are not [m, k]");
        assert_eq!(out.len(), m * self.n, "output is not [m, n]");
        if m == 0 {
            return;
        }
        self.matmul_quantized(&QuantizedRows::two_term(x, m, self.k), out);
    }

    /// As [`QuantTiles::matmul`], with activations quantized once for several matrices
    /// that take the same input.
    pub fn matmul_quantized(&self, acts: &QuantizedRows, out: &mut [f32]) {
        let (m, kb) = (acts.m, self.k / QK);
        assert_eq!(acts.k, self.k, "activations are not [m, k]");
        assert_eq!(out.len(), m * self.n, "output is not [m, n]");
        if m == 0 {
            return;
        }
        for_each_tile(self.n, m, self.height, out, |t, tile_out| {
            if acts.terms == 2 {
                self.two_term_tile(t, kb, &acts.rows, m, tile_out)
            } else {
                self.tile(t, kb, &acts.rows, m, tile_out)
            }
        });
    }

    /// As [`QuantTiles::tile`] for two-term activations (stored rows `2a` and `2a + 1`
    /// are row `a` and its residual): each term through the same kernel, then added, in
    /// that order, so a row's result does not depend on its neighbours.
    fn two_term_tile(&self, t: usize, kb: usize, acts: &Q8Rows, m: usize, out: &mut [f32]) {
        let row = |a: usize| acts.row(a, kb);
        let h = self.height;
        let mut terms = [0f32; 4 * WIDE];
        let mut a = 0;
        while a < m {
            let n = (m - a).min(2);
            let terms = &mut terms[..2 * n * h];
            match n {
                2 => self.dot(
                    t,
                    kb,
                    [row(2 * a), row(2 * a + 1), row(2 * a + 2), row(2 * a + 3)],
                    terms,
                ),
                _ => self.dot(t, kb, [row(2 * a), row(2 * a + 1)], terms),
            }
            for (r, pair) in terms.chunks_exact(2 * h).enumerate() {
                let (main, residual) = pair.split_at(h);
                for ((dst, x), y) in out[(a + r) * h..(a + r + 1) * h]
                    .iter_mut()
                    .zip(main)
                    .zip(residual)
                {
                    *dst = x + y;
                }
            }
            a += n;
        }
    }

    /// One tile against every activation row, up to four rows at a time, into
    /// `out[m][height]`.
    fn tile(&self, t: usize, kb: usize, acts: &Q8Rows, m: usize, out: &mut [f32]) {
        let row = |a: usize| acts.row(a, kb);
        let h = self.height;
        let mut a = 0;
        while a < m {
            let n = (m - a).min(4);
            let out = &mut out[a * h..(a + n) * h];
            match n {
                4 => self.dot(t, kb, [row(a), row(a + 1), row(a + 2), row(a + 3)], out),
                3 => self.dot(t, kb, [row(a), row(a + 1), row(a + 2)], out),
                2 => self.dot(t, kb, [row(a), row(a + 1)], out),
                _ => self.dot(t, kb, [row(a)], out),
            }
            a += n;
        }
    }

    /// Tile `t`'s rows against `A` activation rows, into `out[A][height]`.
    fn dot<const A: usize>(&self, t: usize, kb: usize, acts: [ActRow; A], out: &mut [f32]) {
        let h = self.height;
        let blocks = t * kb * h..(t + 1) * kb * h;
        let qb = self.format.layout().quant_bytes();
        let (scales, mins) = self.block_scales(t);
        let quants = &self.quants[blocks.start * qb..blocks.end * qb];
        // Eight bytes of high bit pairs per row and block (six-bit tiles).
        let plane = h * 8;
        let high = self
            .high
            .get(t * kb * plane..(t + 1) * kb * plane)
            .unwrap_or(&[]);
        let subscales = self
            .subscales
            .get(blocks.start * 2..blocks.end * 2)
            .unwrap_or(&[]);
        let bias = self.format.bias();
        fn put<const R: usize>(out: &mut [f32], rows: &[[f32; R]]) {
            for (dst, row) in out.chunks_exact_mut(R).zip(rows) {
                dst.copy_from_slice(row);
            }
        }
        debug_assert!(scales.covers(kb, h) && !scales.is_empty() && mins.covers(kb, h));
        // SAFETY: `self.isa` was found supported when the tiles were built, and every
        // slice (and the scales and minimums) holds `kb` blocks of this tile, in the
        // layout of its height, by construction.
        unsafe {
            match (self.isa, self.format.layout(), h) {
                (Isa::Avx512Vnni, Layout::Nibbles, WIDE) => {
                    put(out, &x86_512::wide_tile_dot(kb, scales, mins, quants, acts))
                }
                (Isa::Avx512Vnni, Layout::Bytes, WIDE) => put(
                    out,
                    &x86_512::wide_q8_tile_dot(kb, scales.halves, quants, acts),
                ),
                (Isa::Avx512Vnni, Layout::Six, WIDE) => put(
                    out,
                    &x86_512::wide_six_tile_dot(
                        kb, scales, mins, quants, high, subscales, bias, acts,
                    ),
                ),
                (Isa::Avx512Vnni, Layout::Nibbles, _) => {
                    put(out, &x86_512::tile_dot(kb, scales, mins, quants, acts))
                }
                (Isa::Avx512Vnni, Layout::Bytes, _) => {
                    put(out, &x86_512::q8_tile_dot(kb, scales.halves, quants, acts))
                }
                (Isa::Avx512Vnni, Layout::Six, _) => put(
                    out,
                    &x86_512::six_tile_dot(kb, scales, mins, quants, high, subscales, bias, acts),
                ),
                (Isa::Avx2, Layout::Nibbles, _) => {
                    put(out, &x86::tile_dot(kb, scales, mins, quants, acts))
                }
                (Isa::Avx2, Layout::Bytes, _) => {
                    put(out, &x86::q8_tile_dot(kb, scales.halves, quants, acts))
                }
                (Isa::Avx2, Layout::Six, _) => put(
                    out,
                    &x86::six_tile_dot(kb, scales, mins, quants, high, subscales, bias, acts),
                ),
                (Isa::Neon, Layout::Nibbles, _) => {
                    put(out, &neon::tile_dot(kb, scales, mins, quants, acts))
                }
                (Isa::Neon, Layout::Bytes, _) => {
                    put(out, &neon::q8_tile_dot(kb, scales.halves, quants, acts))
                }
                (Isa::Neon, Layout::Six, _) => put(
                    out,
                    &neon::six_tile_dot(kb, scales, mins, quants, high, subscales, bias, acts),
                ),
            }
        }
    }
}

/// Runs `tile(t, out)` for every tile of `height` weight rows, in parallel, each writing
/// its `[m][height]` results, then lays them out as `out[m, n]`.
fn for_each_tile(
    n: usize,
    m: usize,
    height: usize,
    out: &mut [f32],
    tile: impl Fn(usize, &mut [f32]) + Sync,
) {
    let tiles = n / height;
    let alone = is_alone();
    let threads = if alone {
        1
    } else {
        rayon::current_num_threads().max(1)
    };
    let tiles_per_task = tiles.div_ceil(threads * 8).max(1);
    if m == 1 {
        // One row: tile-major is row-major.
        let task = |(task, chunk): (usize, &mut [f32])| {
            let first = task * tiles_per_task;
            for (i, tile_out) in chunk.chunks_mut(height).enumerate() {
                tile(first + i, tile_out);
            }
        };
        if alone {
            out.chunks_mut(tiles_per_task * height)
                .enumerate()
                .for_each(task);
        } else {
            out.par_chunks_mut(tiles_per_task * height)
                .enumerate()
                .for_each(task);
        }
        return;
    }
    // Each task fills its tiles' columns of every row through a small buffer of its own:
    // tasks write disjoint columns, and no [m, n] scratch is allocated (and faulted in).
    let columns = SharedOut(out.as_mut_ptr());
    for_range(tiles.div_ceil(tiles_per_task), |task| {
        let mut buffer = vec![0f32; m * height];
        let first = task * tiles_per_task;
        for t in first..(first + tiles_per_task).min(tiles) {
            tile(t, &mut buffer);
            for (a, row) in buffer.chunks_exact(height).enumerate() {
                // SAFETY: row `a`, columns `t * height..(t + 1) * height` are inside
                // `out` ([m, n]), and only the task that owns tile `t` writes them.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        row.as_ptr(),
                        columns.at(a * n + t * height),
                        height,
                    );
                }
            }
        }
    });
}

/// The output matrix, shared by tasks that write disjoint columns of it.
struct SharedOut(*mut f32);

// SAFETY: tasks only write disjoint ranges through it (see `for_each_tile`), while the
// `&mut` it came from is held by the caller.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element at `i`.
    ///
    /// # Safety
    /// `i` must be inside the matrix it points to.
    unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
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
        if !matches!(isa(), Some(Isa::Avx2 | Isa::Avx512Vnni)) {
            // Elsewhere (NEON): each tile's rows widened, then the portable dot product,
            // row by row as everywhere (batch-invariant).
            for_each_tile(self.n, m, TILE, out, |t, tile_out| {
                let wide: Vec<f32> = self.data[t * TILE * k..(t + 1) * TILE * k]
                    .iter()
                    .map(|w| w.to_f32())
                    .collect();
                for (a, row) in x.chunks_exact(k).enumerate() {
                    for (r, w) in wide.chunks_exact(k).enumerate() {
                        tile_out[a * TILE + r] = dot(row, w);
                    }
                }
            });
            return;
        }
        for_each_tile(self.n, m, TILE, out, |t, tile_out| {
            let w = &self.data[t * TILE * k..(t + 1) * TILE * k];
            let mut a = 0;
            while a < m {
                let n = (m - a).min(2);
                let rows = &x[a * k..(a + n) * k];
                // SAFETY: an x86 ISA was found in `new`; `w` holds four rows of `k`
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
        for_each_tile(self.n, m, TILE, out, |t, tile_out| {
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
    /// Sums of each block's two halves (read by the wide six-bit kernel, x86-64 only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    halves: &'a [i16],
}

/// Activation rows `[m, k]` quantized for [`QuantTiles::matmul_quantized`].
pub struct QuantizedRows {
    rows: Q8Rows,
    m: usize,
    k: usize,
    /// 1, or 2 where each row is stored as its quantization and that of what it missed.
    terms: usize,
}

impl QuantizedRows {
    /// Quantizes `x [m, k]` (`k` a multiple of 32), rows in parallel when there are
    /// several: a prefill's are megabytes, and single-threaded they were a tenth of it.
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        Self::quantize(x, m, k, 1)
    }

    /// As [`QuantizedRows::new`], each row as two terms: its 8-bit quantization, and the
    /// quantization of the rounding error that left (at most half a step, so the second
    /// term's steps are 254 times finer). A matmul on them costs two rows' arithmetic
    /// but reads the weights once, and is as exact as the weights allow: for the LM head,
    /// whose error goes straight into the logits (a hundredth of a quantized model's
    /// divergence from F32 on SmolLM2), at the cost of a second row where only one is.
    pub fn two_term(x: &[f32], m: usize, k: usize) -> Self {
        Self::quantize(x, m, k, 2)
    }

    fn quantize(x: &[f32], m: usize, k: usize, terms: usize) -> Self {
        assert_eq!(x.len(), m * k, "activations are not [m, k]");
        let kb = k / QK;
        let stored = m * terms;
        let mut rows = Q8Rows {
            q: vec![0i8; stored * k],
            d: vec![0f32; stored * kb],
            offset: vec![0f32; stored * kb],
            halves: vec![0i16; stored * kb * 2],
        };
        if m == 1 {
            quantize_terms(x, rows.as_mut(0, k * terms));
        } else if kb > 0 && is_alone() {
            for (a, x) in x.chunks(k).enumerate() {
                quantize_terms(x, rows.as_mut(a, k * terms));
            }
        } else if kb > 0 {
            let rows_out = rows
                .q
                .par_chunks_mut(k * terms)
                .zip(rows.d.par_chunks_mut(kb * terms))
                .zip(rows.offset.par_chunks_mut(kb * terms))
                .zip(rows.halves.par_chunks_mut(2 * kb * terms));
            x.par_chunks(k)
                .zip(rows_out)
                .for_each(|(x, (((q, d), offset), halves))| {
                    quantize_terms(
                        x,
                        Q8Row {
                            q,
                            d,
                            offset,
                            halves,
                        },
                    )
                });
        }
        QuantizedRows { rows, m, k, terms }
    }
}

/// Quantizes row `x` into `row`, which holds one or two terms' room (see
/// [`QuantizedRows::two_term`]).
fn quantize_terms(x: &[f32], row: Q8Row) {
    if row.q.len() == x.len() {
        return quantize_row(x, row);
    }
    let k = x.len();
    let kb = k / QK;
    let (q, q_residual) = row.q.split_at_mut(k);
    let (d, d_residual) = row.d.split_at_mut(kb);
    let (offset, offset_residual) = row.offset.split_at_mut(kb);
    let (halves, halves_residual) = row.halves.split_at_mut(2 * kb);
    quantize_row(
        x,
        Q8Row {
            q,
            d,
            offset,
            halves,
        },
    );
    let residual: Vec<f32> = x
        .iter()
        .zip(q.iter())
        .enumerate()
        .map(|(i, (&v, &q))| v - f32::from(q) * d[i / QK])
        .collect();
    quantize_row(
        &residual,
        Q8Row {
            q: q_residual,
            d: d_residual,
            offset: offset_residual,
            halves: halves_residual,
        },
    );
}

/// One row of [`Q8Rows`], to be written.
struct Q8Row<'a> {
    q: &'a mut [i8],
    d: &'a mut [f32],
    offset: &'a mut [f32],
    halves: &'a mut [i16],
}

impl Q8Rows {
    /// Stored row `a`, of `kb` blocks, to read.
    fn row(&self, a: usize, kb: usize) -> ActRow<'_> {
        ActRow {
            q: &self.q[a * kb * QK..(a + 1) * kb * QK],
            d: &self.d[a * kb..(a + 1) * kb],
            offset: &self.offset[a * kb..(a + 1) * kb],
            halves: &self.halves[a * 2 * kb..(a + 1) * 2 * kb],
        }
    }

    /// Row `a` of rows `k` wide.
    fn as_mut(&mut self, a: usize, k: usize) -> Q8Row<'_> {
        let kb = k / QK;
        Q8Row {
            q: &mut self.q[a * k..(a + 1) * k],
            d: &mut self.d[a * kb..(a + 1) * kb],
            offset: &mut self.offset[a * kb..(a + 1) * kb],
            halves: &mut self.halves[a * 2 * kb..(a + 1) * 2 * kb],
        }
    }
}

fn quantize_row(x: &[f32], row: Q8Row) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("sse4.1") {
        // SAFETY: the CPU was just found to support what the function is compiled for.
        unsafe { quantize_blocks_avx2(x, row) };
        return;
    }
    quantize_blocks(x, row);
}

/// [`quantize_blocks`] in AVX2 registers (`x86::quantize_blocks`): the same results.
///
/// # Safety
/// The CPU must support AVX2 and SSE4.1.
#[cfg(target_arch = "x86_64")]
unsafe fn quantize_blocks_avx2(x: &[f32], row: Q8Row) {
    x86::quantize_blocks(x, row.q, row.d, row.offset, row.halves)
}

/// Each block of 32 values as 8-bit integers (rounded to nearest, ties to even, as
/// llama.cpp's SIMD quantizers do) with its scale and `scale * sum(q)`.
fn quantize_blocks(x: &[f32], row: Q8Row) {
    let blocks = x
        .chunks_exact(QK)
        .zip(row.q.chunks_exact_mut(QK))
        .zip(row.d.iter_mut().zip(row.offset.iter_mut()))
        .zip(row.halves.chunks_exact_mut(2));
    for (((block, q), (d, offset)), halves) in blocks {
        let amax = block.iter().fold(0f32, |acc, v| acc.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sums = [0i16; 2];
        for (i, (dst, v)) in q.iter_mut().zip(block).enumerate() {
            let v = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
            *dst = v;
            sums[i / 16] += i16::from(v);
        }
        halves.copy_from_slice(&sums);
        *d = scale;
        *offset = scale * f32::from(sums[0] + sums[1]);
    }
}

/// The largest finite value of `x` (`-inf` when none is): a vocabulary's logits in one
/// vectorised pass (a fold of `f32::max` is a chain of one compare per entry).
pub(crate) fn finite_max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU was just found to have AVX2.
        return unsafe { finite_max_avx2(x) };
    }
    finite_max_portable(x)
}

/// [`finite_max`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn finite_max_avx2(x: &[f32]) -> f32 {
    finite_max_portable(x)
}

#[inline(always)]
fn finite_max_portable(x: &[f32]) -> f32 {
    let larger = |best: f32, v: f32| if v > best && v.is_finite() { v } else { best };
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = larger(*lane, v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, larger);
    lanes.into_iter().fold(tail, larger)
}

/// `out[i] = exp((x[i] - shift) * scale)` (0 where `x[i]` is not finite), and their sum:
/// the softmax weights of a vocabulary in one pass. With AVX2 and FMA eight at a time.
pub(crate) fn exp_weights(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU was just found to have AVX2 and FMA.
        return unsafe { exp_weights_avx2(x, shift, scale, out) };
    }
    exp_weights_portable(x, shift, scale, out)
}

/// [`exp_weights`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_weights_avx2(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f32 {
    exp_weights_portable(x, shift, scale, out)
}

#[inline(always)]
fn exp_weights_portable(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f32 {
    for (o, &v) in out.iter_mut().zip(x) {
        let e = fast_exp((v - shift) * scale);
        *o = if v.is_finite() { e } else { 0.0 };
    }
    // Sixteen running sums, so the additions vectorise too.
    let mut lanes = [0f32; 16];
    let mut chunks = out.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `e^v` within about 2e-7 relative (Cephes' expf: `v = n ln2 + r`, a degree-5 polynomial
/// in `r`, `2^n` put into the exponent bits), 0 below -87: branch-free, so a loop of it
/// vectorises where libm's `expf` is one call per value. (`mul_add` is one instruction
/// wherever it runs vectorised: the AVX2+FMA build and aarch64; elsewhere it is libm's
/// exact `fmaf`, slower but the same result.)
#[inline(always)]
fn fast_exp(v: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = v.clamp(-87.0, 88.0);
    let shifted = clamped.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-0.693_359_4, clamped);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut poly = 1.987_569_1e-4f32;
    poly = poly.mul_add(r, 1.398_2e-3);
    poly = poly.mul_add(r, 8.333_452e-3);
    poly = poly.mul_add(r, 4.166_579_6e-2);
    poly = poly.mul_add(r, 1.666_666_5e-1);
    poly = poly.mul_add(r, 0.5);
    let e = poly.mul_add(r * r, r) + 1.0;
    let exponent = (shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23;
    let result = e * f32::from_bits(exponent as u32);
    if v < -87.0 {
        0.0
    } else {
        result
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(not(target_arch = "x86_64"))]
#[path = "x86_stub.rs"]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_512;
#[cfg(target_arch = "x86_64")]
use x86_512::WIDE;
/// Rows per wide tile (AVX-512 only).
#[cfg(not(target_arch = "x86_64"))]
const WIDE: usize = 16;
#[cfg(not(target_arch = "x86_64"))]
use x86 as x86_512;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(not(target_arch = "aarch64"))]
#[path = "neon_stub.rs"]
mod neon;

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
            (GgmlDType::Q4_1, TileFormat::Q4_1),
            (GgmlDType::Q5_0, TileFormat::Q5_0),
            (GgmlDType::Q5_1, TileFormat::Q5_1),
            (GgmlDType::Q8_0, TileFormat::Q8_0),
            (GgmlDType::Q4K, TileFormat::Q4K),
            (GgmlDType::Q5K, TileFormat::Q5K),
            (GgmlDType::Q6K, TileFormat::Q6K),
        ] {
            // 12 rows: tiles of four; 48: AVX-512's tiles of sixteen where it runs.
            check_format(ggml, format, 12);
            check_format(ggml, format, 48);
        }
    }

    fn check_format(ggml: GgmlDType, format: TileFormat, n: usize) {
        // Two K-quant super-blocks per row.
        let k = 512;
        let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, ggml).unwrap();
        let bytes = q.data().unwrap().into_owned();
        let tiles = QuantTiles::from_ggml(format, &bytes, n, k).unwrap();
        let dequantized = q.dequantize(&Device::Cpu).unwrap();
        let mut row = vec![0f32; k];
        let last = n - 3;
        tiles.dequantize_row(last, &mut row);
        let want = dequantized.get(last).unwrap().to_vec1::<f32>().unwrap();
        // Every format keeps the file's scales: the same values, up to the order of the
        // float multiplications.
        for (a, b) in row.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-6 * (b.abs() + 1.0),
                "{format:?}: {a} vs {b}"
            );
        }
        let candle = QMatMul::from_qtensor(q).unwrap();
        for m in [1, 2, 3, 4, 7, 9] {
            let x = random(m * k, 7 + m as u32);
            // Every instruction set this CPU has gives the same sums, up to the order of
            // float additions.
            let mut ours = vec![0f32; m * n];
            let mut checked = Vec::new();
            for isa in [Isa::Avx2, Isa::Avx512Vnni, Isa::Neon] {
                if !isa.supported() {
                    eprintln!("{format:?}: this CPU lacks {}, not checked", isa.name());
                    continue;
                }
                let tiles = QuantTiles::for_isa(isa, format, &bytes, n, k).unwrap();
                let mut out = vec![0f32; m * n];
                tiles.matmul(&x, m, &mut out);
                if !checked.is_empty() {
                    for (a, b) in out.iter().zip(&ours) {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{format:?} m={m}: {} gives {a}, {:?} gave {b}",
                            isa.name(),
                            checked
                        );
                    }
                }
                ours = out;
                checked.push(isa.name());
            }
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
            // Both quantize the activations to 8 bits (candle per format: Q8_0, Q8_1 or
            // Q8_K), so neither is exact; ours must be as close to exact as candle's.
            let rms = |v: &[f32]| {
                (v.iter()
                    .zip(&exact)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    / v.len() as f32)
                    .sqrt()
            };
            let (our_error, their_error) = (rms(&ours), rms(&theirs));
            assert!(
                our_error <= 1.5 * their_error + 1e-3,
                "{format:?} m={m}: rms error {our_error} against candle's {their_error}"
            );
            for i in 0..m * n {
                assert!(
                    (ours[i] - exact[i]).abs() < 0.1 + 0.02 * exact[i].abs(),
                    "{format:?} m={m} [{i}]: {} vs candle {} (exact {})",
                    ours[i],
                    theirs[i],
                    exact[i]
                );
            }
        }
    }

    #[test]
    fn two_term_activations_are_exact_to_the_weights_and_batch_invariant() {
        if !available() {
            eprintln!("skipping: this CPU lacks AVX2/FMA/F16C");
            return;
        }
        let (n, k) = (48, 256);
        for (ggml, format) in [
            (GgmlDType::Q4_0, TileFormat::Q4_0),
            (GgmlDType::Q4_1, TileFormat::Q4_1),
            (GgmlDType::Q5_0, TileFormat::Q5_0),
            (GgmlDType::Q8_0, TileFormat::Q8_0),
            (GgmlDType::Q4K, TileFormat::Q4K),
            (GgmlDType::Q6K, TileFormat::Q6K),
        ] {
            let w = Tensor::from_vec(random(n * k, 3), (n, k), &Device::Cpu).unwrap();
            let bytes = QTensor::quantize(&w, ggml)
                .unwrap()
                .data()
                .unwrap()
                .into_owned();
            for isa in [Isa::Avx2, Isa::Avx512Vnni, Isa::Neon] {
                if !isa.supported() {
                    continue;
                }
                let tiles = QuantTiles::for_isa(isa, format, &bytes, n, k).unwrap();
                let m = 5;
                let mut x = random(m * k, 11);
                // An outlier, as real activations have: its block's steps are coarse.
                x[40] = 30.0;
                let mut exact = vec![0f64; m * n];
                let mut weights = vec![0f32; k];
                for j in 0..n {
                    tiles.dequantize_row(j, &mut weights);
                    for a in 0..m {
                        exact[a * n + j] = x[a * k..(a + 1) * k]
                            .iter()
                            .zip(&weights)
                            .map(|(&x, &w)| f64::from(x) * f64::from(w))
                            .sum();
                    }
                }
                let rms = |v: &[f32]| {
                    (v.iter()
                        .zip(&exact)
                        .map(|(&a, b)| (f64::from(a) - b).powi(2))
                        .sum::<f64>()
                        / v.len() as f64)
                        .sqrt()
                };
                let (mut one, mut two) = (vec![0f32; m * n], vec![0f32; m * n]);
                tiles.matmul(&x, m, &mut one);
                tiles.matmul_two_term(&x, m, &mut two);
                let (one_error, two_error) = (rms(&one), rms(&two));
                assert!(
                    two_error * 50.0 < one_error,
                    "{format:?} {}: two terms' rms error {two_error}, one term's {one_error}",
                    isa.name()
                );
                for a in 0..m {
                    let mut alone = vec![0f32; n];
                    tiles.matmul_two_term(&x[a * k..(a + 1) * k], 1, &mut alone);
                    assert_eq!(alone, two[a * n..(a + 1) * n], "{format:?} row {a} alone");
                }
            }
        }
    }

    /// Kernel speed per format and instruction set, single-threaded: decode (one row,
    /// GB/s of weights) and prefill (64 rows, G multiply-adds/s). A measurement, not a
    /// check (`cargo test --release -p strata-model --lib kernel_speed -- --ignored
    /// --nocapture`).
    #[test]
    #[ignore]
    fn kernel_speed() {
        let (n, k) = (2048, 2048);
        let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for (ggml, format) in [
            (GgmlDType::Q4_0, TileFormat::Q4_0),
            (GgmlDType::Q8_0, TileFormat::Q8_0),
            (GgmlDType::Q4K, TileFormat::Q4K),
            (GgmlDType::Q6K, TileFormat::Q6K),
            (GgmlDType::Q5_0, TileFormat::Q5_0),
        ] {
            let q = QTensor::quantize(&w, ggml).unwrap();
            let bytes = q.data().unwrap().len();
            for isa in [Isa::Avx2, Isa::Avx512Vnni, Isa::Neon] {
                if !isa.supported() {
                    continue;
                }
                let tiles = QuantTiles::for_isa(isa, format, &q.data().unwrap(), n, k).unwrap();
                let mut line = format!("{format:?} {}:", isa.name());
                for m in [1usize, 64] {
                    let x = random(m * k, 3);
                    let mut out = vec![0f32; m * n];
                    let reps = if m == 1 { 200 } else { 10 };
                    let t = std::time::Instant::now();
                    pool.install(|| {
                        for _ in 0..reps {
                            tiles.matmul(&x, m, &mut out);
                        }
                    });
                    let per = t.elapsed().as_secs_f64() / reps as f64;
                    if m == 1 {
                        line += &format!(" decode {:.1} GB/s", bytes as f64 / per / 1e9);
                    } else {
                        line += &format!(", prefill {:.1} GMAC/s", (m * n * k) as f64 / per / 1e9);
                    }
                }
                println!("{line}");
            }
        }
    }

    #[test]
    fn f16_matrix_matches_an_f32_matmul_of_the_same_weights() {
        if !available() {
            eprintln!("skipping: no kernels of ours for this CPU");
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

    #[test]
    fn the_fast_exp_is_within_a_few_ulps_and_zero_for_what_is_not_finite() {
        let mut worst = 0f64;
        let mut v = -87.0f32;
        while v < 88.0 {
            let exact = f64::from(v).exp();
            let got = f64::from(fast_exp(v));
            worst = worst.max((got - exact).abs() / exact);
            v += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(fast_exp(-1000.0), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
        let x = [0.0, f32::NEG_INFINITY, -1.0, f32::NAN, f32::INFINITY, 2.0];
        let mut out = [9f32; 6];
        let sum = exp_weights(&x, 2.0, 0.5, &mut out);
        let expected = [(-1.0f32).exp(), 0.0, (-1.5f32).exp(), 0.0, 0.0, 1.0];
        for (g, e) in out.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-6, "{out:?}");
        }
        assert!((sum - expected.iter().sum::<f32>()).abs() < 1e-6);
        // Long enough for the vector lanes and a remainder.
        let long: Vec<f32> = (0..1000).map(|i| (i % 37) as f32 * -0.25).collect();
        let mut out = vec![0f32; long.len()];
        let sum = exp_weights(&long, 0.0, 1.0, &mut out);
        let exact: f64 = long.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((f64::from(sum) - exact).abs() / exact < 1e-5);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_activation_quantizer_is_the_portable_one_bit_for_bit() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("sse4.1")) {
            eprintln!("skipping: this CPU lacks AVX2");
            return;
        }
        let k = 8 * QK;
        let mut x = random(k, 3);
        // Ties at the rounding point (a block whose largest value is 127: a scale of
        // exactly 1), a block of zeros, NaN and infinities.
        x[..QK].copy_from_slice(&[0.0; QK]);
        x[..6].copy_from_slice(&[127.0, 2.5, -3.5, 0.5, -0.5, 126.5]);
        x[40..72].fill(0.0);
        x[80] = f32::NAN;
        x[130] = f32::INFINITY;
        x[170] = f32::NEG_INFINITY;
        x[171] = f32::NAN;
        let quantize = |avx2: bool| {
            let mut rows = QuantizedRows::new(&vec![0.0; k], 1, k).rows;
            let row = rows.as_mut(0, k);
            if avx2 {
                // SAFETY: AVX2 and SSE4.1 were just checked.
                unsafe { quantize_blocks_avx2(&x, row) }
            } else {
                quantize_blocks(&x, row)
            }
            rows
        };
        let (ours, portable) = (quantize(true), quantize(false));
        assert_eq!(ours.q, portable.q);
        assert_eq!(ours.halves, portable.halves);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours.d), bits(&portable.d));
        assert_eq!(bits(&ours.offset), bits(&portable.offset));
        assert!(ours.q.iter().any(|&q| q == 127 || q == -127));
    }

    #[test]
    fn the_finite_max_skips_what_is_not_finite() {
        let mut values: Vec<f32> = (0..100).map(|i| (i * 37 % 101) as f32 - 50.0).collect();
        assert_eq!(finite_max(&values), 50.0);
        values[7] = f32::INFINITY;
        values[8] = f32::NAN;
        values[99] = 60.0;
        assert_eq!(finite_max(&values), 60.0);
        assert_eq!(
            finite_max(&[f32::NAN, f32::NEG_INFINITY]),
            f32::NEG_INFINITY
        );
    }
}
