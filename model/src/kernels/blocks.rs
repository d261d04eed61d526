//! GGUF's block formats unpacked, row by row, into the three shapes the tiles hold.
//!
//! Every format becomes blocks of 32 values with a scale `d` and, where the format has one,
//! a minimum (`value = d * q - min`). Each is an f16, per block in the formats of 32 and
//! per super-block of 256 in the K-quants, where a byte per block multiplies it (Q4_K's
//! and Q5_K's 6-bit sub-scales and minimums, kept as the file has them):
//! - Q4_0, Q4_1 and Q4_K keep 4-bit nibbles in Q4_0's order (byte `j` holds values `j`
//!   and `j + 16`);
//! - Q8_0 keeps its signed bytes;
//! - Q5_0, Q5_1, Q5_K and Q6_K become unsigned values below 64, one per byte here (the
//!   tiles pack them back to 6 bits), with a signed sub-scale per 16 values:
//!   `value = d * sub * (q - bias) - min`.
//!
//! The layouts follow ggml's `dequantize_row_*` (ggml-quants.c); the tests compare each
//! format against candle's dequantization of the same bytes.

/// Values per block.
pub(super) const QK: usize = 32;
/// Values per K-quant super-block.
const QK_K: usize = 256;

/// One matrix's blocks, row-major (`[n][k / 32]`).
#[derive(Default)]
pub(super) struct RowBlocks {
    /// Blocks per f16 scale and minimum, as a power of two: 0, or 3 in the K-quants.
    pub shift: u32,
    /// f16 scale per `1 << shift` blocks.
    pub scales: Vec<u16>,
    /// A byte per block that multiplies its scale (empty: none).
    pub scale_bytes: Vec<u8>,
    /// f16 minimum per `1 << shift` blocks, subtracted from every value (empty: none).
    pub mins: Vec<u16>,
    /// A byte per block that multiplies its minimum (empty: none).
    pub min_bytes: Vec<u8>,
    /// Per block: 16 bytes of nibbles, 32 signed bytes, or 32 values below 64.
    pub quants: Vec<u8>,
    /// Two signed sub-scales per block (the six-bit shape only).
    pub subscales: Vec<i8>,
}

/// Splits `bytes` into `n * k / values_per_block` blocks of `block_bytes`, or `None` when
/// the length or the shape does not fit the format.
fn blocks(
    bytes: &[u8],
    n: usize,
    k: usize,
    values_per_block: usize,
    block_bytes: usize,
) -> Option<std::slice::ChunksExact<'_, u8>> {
    if !k.is_multiple_of(values_per_block)
        || bytes.len() != n * (k / values_per_block) * block_bytes
    {
        return None;
    }
    Some(bytes.chunks_exact(block_bytes))
}

/// Q4_0 (d; 16 bytes) or Q8_0 (d; 32 signed bytes): the bytes as they are.
pub(super) fn plain(bytes: &[u8], n: usize, k: usize, quant_bytes: usize) -> Option<RowBlocks> {
    let mut out = RowBlocks::default();
    for block in blocks(bytes, n, k, QK, 2 + quant_bytes)? {
        out.scales.push(u16::from_le_bytes([block[0], block[1]]));
        out.quants.extend_from_slice(&block[2..]);
    }
    Some(out)
}

/// Q4_1: d, m, 16 bytes of nibbles; `value = d * q + m`.
pub(super) fn q4_1(bytes: &[u8], n: usize, k: usize) -> Option<RowBlocks> {
    let mut out = RowBlocks::default();
    for block in blocks(bytes, n, k, QK, 20)? {
        out.scales.push(u16::from_le_bytes([block[0], block[1]]));
        // Negating an f16 only flips its sign bit: exact.
        out.mins
            .push(u16::from_le_bytes([block[2], block[3]]) ^ 0x8000);
        out.quants.extend_from_slice(&block[4..20]);
    }
    Some(out)
}

/// Q5_0 (d; 32 fifth bits; nibbles; `value = d * (q - 16)`) and Q5_1 (d, m; fifth bits;
/// nibbles; `value = d * q + m`).
pub(super) fn q5(bytes: &[u8], n: usize, k: usize, with_min: bool) -> Option<RowBlocks> {
    let head = if with_min { 4 } else { 2 };
    let mut out = RowBlocks::default();
    for block in blocks(bytes, n, k, QK, head + 20)? {
        out.scales.push(u16::from_le_bytes([block[0], block[1]]));
        if with_min {
            out.mins
                .push(u16::from_le_bytes([block[2], block[3]]) ^ 0x8000);
        }
        let high = u32::from_le_bytes([
            block[head],
            block[head + 1],
            block[head + 2],
            block[head + 3],
        ]);
        let nibbles = &block[head + 4..head + 20];
        let fifth = |i: usize| (((high >> i) & 1) as u8) << 4;
        for (i, byte) in nibbles.iter().enumerate() {
            out.quants.push((byte & 0x0F) | fifth(i));
        }
        for (i, byte) in nibbles.iter().enumerate() {
            out.quants.push((byte >> 4) | fifth(i + 16));
        }
        out.subscales.extend([1, 1]);
    }
    Some(out)
}

/// Q4_K's and Q5_K's 6-bit scale and minimum of sub-block `j` (of 8), from the 12 packed
/// bytes.
fn k_scale_min(packed: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// Q4_K (super-blocks of 256: d, dmin, 12 bytes of 6-bit scales and minimums, 128 bytes
/// of nibbles): `d` and `dmin` per super-block, each sub-block's 6-bit scale and minimum
/// as a byte, and its nibbles in Q4_0's order.
pub(super) fn q4k(bytes: &[u8], n: usize, k: usize) -> Option<RowBlocks> {
    let mut out = RowBlocks {
        shift: 3,
        ..RowBlocks::default()
    };
    for block in blocks(bytes, n, k, QK_K, 144)? {
        out.scales.push(u16::from_le_bytes([block[0], block[1]]));
        out.mins.push(u16::from_le_bytes([block[2], block[3]]));
        let packed = &block[4..16];
        let qs = &block[16..144];
        for j in 0..8 {
            let (sc, m) = k_scale_min(packed, j);
            out.scale_bytes.push(sc);
            out.min_bytes.push(m);
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
                out.quants.push(value(l) | (value(l + 16) << 4));
            }
        }
    }
    Some(out)
}

/// Q5_K: Q4_K's layout plus 32 bytes of fifth bits (bit `j` of byte `l` belongs to value
/// `l` of sub-block `j`). A sub-block's 6-bit scale is both its sub-scales.
pub(super) fn q5k(bytes: &[u8], n: usize, k: usize) -> Option<RowBlocks> {
    let mut out = RowBlocks {
        shift: 3,
        ..RowBlocks::default()
    };
    for block in blocks(bytes, n, k, QK_K, 176)? {
        out.scales.push(u16::from_le_bytes([block[0], block[1]]));
        out.mins.push(u16::from_le_bytes([block[2], block[3]]));
        let packed = &block[4..16];
        let high = &block[16..48];
        let qs = &block[48..176];
        for j in 0..8 {
            let (sc, m) = k_scale_min(packed, j);
            out.min_bytes.push(m);
            let group = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
            for l in 0..32 {
                let low = if j % 2 == 0 {
                    group[l] & 0x0F
                } else {
                    group[l] >> 4
                };
                out.quants.push(low | (((high[l] >> j) & 1) << 4));
            }
            // Below 64: a positive i8.
            out.subscales.extend([sc as i8, sc as i8]);
        }
    }
    Some(out)
}

/// Q6_K (super-blocks of 256: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed
/// scales, d): `value = d * scale[i / 16] * (q - 32)`.
pub(super) fn q6k(bytes: &[u8], n: usize, k: usize) -> Option<RowBlocks> {
    let mut out = RowBlocks {
        shift: 3,
        ..RowBlocks::default()
    };
    for block in blocks(bytes, n, k, QK_K, 210)? {
        out.scales
            .push(u16::from_le_bytes([block[208], block[209]]));
        let mut values = [0u8; QK_K];
        for half_block in 0..2 {
            let ql = &block[half_block * 64..half_block * 64 + 64];
            let qh = &block[128 + half_block * 32..128 + half_block * 32 + 32];
            let y = &mut values[half_block * 128..half_block * 128 + 128];
            for l in 0..32 {
                y[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                y[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        let scales = &block[192..208];
        for j in 0..8 {
            out.quants.extend_from_slice(&values[j * 32..j * 32 + 32]);
            out.subscales
                .extend([scales[2 * j] as i8, scales[2 * j + 1] as i8]);
        }
    }
    Some(out)
}
