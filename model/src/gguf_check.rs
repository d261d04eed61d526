//! A bounds check of a GGUF file's header before anything is sized from it.
//!
//! candle's GGUF reader trusts the header: `general.alignment = 0` divides by zero, and a
//! count or length of 2^32 allocates it. So every count, length and value that sizes
//! something is walked here first, against what the file can hold and against the
//! format's own limits (as llama.cpp's `gguf.cpp` checks them), and a file that fails gets
//! an error naming the field. Only then does candle read it.
//!
//! The layout (GGUF v1 to v3): magic `GGUF`, version (u32), tensor count and metadata
//! count (u64; u32 in v1), the metadata key/value pairs, then each tensor's name, its
//! number of dimensions (u32), the dimensions (u64; u32 in v1), its type (u32) and its
//! offset (u64) into the data section.

use std::io::{Read, Seek, SeekFrom};

/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Longest metadata key or tensor name; real ones are tens of bytes.
const MAX_NAME_BYTES: u64 = 64 << 10;
/// Deepest nesting of arrays in metadata (an array of arrays of scalars).
const MAX_ARRAY_DEPTH: u32 = 2;
/// Fewest bytes a metadata pair takes: a key of one byte (length + byte), type, a u8.
const MIN_PAIR_BYTES: u64 = 8 + 1 + 4 + 1;
/// Fewest bytes a tensor's description takes: a one-byte name, one dimension, type, offset.
const MIN_TENSOR_BYTES: u64 = 8 + 1 + 4 + 8 + 4 + 8;

/// What the walk found that the loader needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GgufShape {
    /// Format version.
    pub version: u32,
    /// Tensors described.
    pub tensors: u64,
    /// Metadata pairs.
    pub metadata: u64,
    /// Data alignment (`general.alignment`, 32 when absent).
    pub alignment: u64,
}

/// Reads through the header of `reader` (`file_len` bytes), checking every count, length,
/// dimension and the alignment. Returns the reason for the first thing wrong.
pub(crate) fn check<R: Read + Seek>(reader: &mut R, file_len: u64) -> Result<GgufShape, String> {
    let mut w = Walker {
        reader,
        at: 0,
        len: file_len,
        version: 0,
    };
    let magic = w.u32("the magic number")?;
    if magic != u32::from_le_bytes(*b"GGUF") {
        return Err("not a GGUF file (no `GGUF` magic at its start)".into());
    }
    w.version = w.u32("the version")?;
    if !(1..=3).contains(&w.version) {
        return Err(format!(
            "GGUF version {} (versions 1 to 3 are known)",
            w.version
        ));
    }
    let tensors = w.count("the tensor count", MIN_TENSOR_BYTES)?;
    let metadata = w.count("the metadata count", MIN_PAIR_BYTES)?;
    let mut alignment = 32;
    for i in 0..metadata {
        let key = w.name(&format!("metadata key {i}"))?;
        let kind = w.u32(&format!("the type of `{key}`"))?;
        if key == "general.alignment" {
            if kind != 4 {
                return Err(format!(
                    "`general.alignment` has type {kind}, but it must be a u32"
                ));
            }
            let a = w.u32("`general.alignment`")?;
            if a == 0 || !a.is_power_of_two() {
                return Err(format!(
                    "`general.alignment` is {a}, but it must be a power of two"
                ));
            }
            alignment = u64::from(a);
        } else {
            w.value(&key, kind, 0)?;
        }
    }
    for i in 0..tensors {
        let name = w.name(&format!("tensor {i}'s name"))?;
        let dims = w.u32(&format!("tensor `{name}`'s dimension count"))?;
        if dims == 0 || dims > MAX_DIMS {
            return Err(format!(
                "tensor `{name}` has {dims} dimensions (1 to {MAX_DIMS} are possible)"
            ));
        }
        let mut elements: u64 = 1;
        for _ in 0..dims {
            let d = w.size(&format!("a dimension of `{name}`"))?;
            elements = elements
                .checked_mul(d)
                .ok_or_else(|| format!("tensor `{name}` has dimensions whose product overflows"))?;
        }
        // No type stores less than a bit per value: more values than the file has bits
        // cannot be in it (the loader checks the exact extent per type).
        if elements / 8 > file_len {
            return Err(format!(
                "tensor `{name}` has {elements} values, more than a file of {file_len} bytes holds"
            ));
        }
        w.u32(&format!("tensor `{name}`'s type"))?;
        let offset = w.u64(&format!("tensor `{name}`'s offset"))?;
        if offset > file_len {
            return Err(format!(
                "tensor `{name}` starts at offset {offset}, past the end of a file of {file_len} bytes"
            ));
        }
        if offset % alignment != 0 {
            return Err(format!(
                "tensor `{name}` starts at offset {offset}, which is not a multiple of the alignment {alignment}"
            ));
        }
    }
    Ok(GgufShape {
        version: w.version,
        tensors,
        metadata,
        alignment,
    })
}

struct Walker<'a, R> {
    reader: &'a mut R,
    at: u64,
    len: u64,
    version: u32,
}

impl<R: Read + Seek> Walker<'_, R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.at)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        if self.left() < N as u64 {
            return Err(format!("the file ends at byte {} inside {what}", self.len));
        }
        self.reader
            .read_exact(&mut b)
            .map_err(|e| format!("reading {what}: {e}"))?;
        self.at += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    /// A count or length: u64, or u32 in version 1.
    fn size(&mut self, what: &str) -> Result<u64, String> {
        if self.version == 1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    /// A count of things of at least `each` bytes, which the rest of the file must hold.
    fn count(&mut self, what: &str, each: u64) -> Result<u64, String> {
        let n = self.size(what)?;
        let most = self.left() / each;
        if n > most {
            return Err(format!(
                "{what} is {n}, but the {} bytes left in the file hold at most {most}",
                self.left()
            ));
        }
        Ok(n)
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        if n > self.left() {
            return Err(format!(
                "{what} is {n} bytes long, but only {} bytes are left in the file",
                self.left()
            ));
        }
        let to = i64::try_from(n).map_err(|_| format!("{what} is too long"))?;
        self.reader
            .seek(SeekFrom::Current(to))
            .map_err(|e| format!("reading {what}: {e}"))?;
        self.at += n;
        Ok(())
    }

    /// A key or tensor name: bounded, and valid UTF-8; trailing NULs are dropped, as the
    /// reader that runs after this check drops them (a key `general.alignment\0` is the
    /// alignment to it).
    fn name(&mut self, what: &str) -> Result<String, String> {
        let n = self.size(what)?;
        if n > MAX_NAME_BYTES.min(self.left()) {
            return Err(format!("{what} is {n} bytes long"));
        }
        let mut b = vec![0u8; n as usize];
        self.reader
            .read_exact(&mut b)
            .map_err(|e| format!("reading {what}: {e}"))?;
        self.at += n;
        while b.last() == Some(&0) {
            b.pop();
        }
        String::from_utf8(b).map_err(|_| format!("{what} is not UTF-8"))
    }

    /// Skips one metadata value of type `kind`, checking its lengths.
    fn value(&mut self, key: &str, kind: u32, depth: u32) -> Result<(), String> {
        match kind {
            0 | 1 | 7 => self.skip(1, key),
            2 | 3 => self.skip(2, key),
            4..=6 => self.skip(4, key),
            10..=12 => self.skip(8, key),
            8 => {
                let n = self.size(&format!("the length of `{key}`"))?;
                self.skip(n, &format!("the string `{key}`"))
            }
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("`{key}` nests arrays too deeply"));
                }
                let element = self.u32(&format!("the element type of `{key}`"))?;
                // Every element takes at least a byte.
                let n = self.count(&format!("the length of the array `{key}`"), 1)?;
                match element {
                    0 | 1 | 7 => self.skip(n, key),
                    2 | 3 => self.skip(n.saturating_mul(2), key),
                    4..=6 => self.skip(n.saturating_mul(4), key),
                    10..=12 => self.skip(n.saturating_mul(8), key),
                    _ => (0..n).try_for_each(|_| self.value(key, element, depth + 1)),
                }
            }
            other => Err(format!("`{key}` has unknown value type {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A minimal v3 file: the given metadata pairs (raw bytes after the count) and tensors.
    fn file(pairs: u64, metadata: &[u8], tensors: u64, infos: &[u8], pad: usize) -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(tensors.to_le_bytes());
        f.extend(pairs.to_le_bytes());
        f.extend(metadata);
        f.extend(infos);
        f.extend(vec![0u8; pad]);
        f
    }

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    }

    fn alignment(a: u32) -> Vec<u8> {
        let mut b = string("general.alignment");
        b.extend(4u32.to_le_bytes());
        b.extend(a.to_le_bytes());
        b
    }

    fn tensor(name: &str, dims: &[u64], offset: u64) -> Vec<u8> {
        let mut b = string(name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(0u32.to_le_bytes());
        b.extend(offset.to_le_bytes());
        b
    }

    fn checked(bytes: &[u8]) -> Result<GgufShape, String> {
        check(&mut Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn a_sound_header_passes_with_its_alignment() {
        let f = file(1, &alignment(64), 1, &tensor("a", &[4, 4], 0), 128);
        let shape = checked(&f).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((shape.tensors, shape.metadata, shape.alignment), (1, 1, 64));
    }

    #[test]
    fn each_lie_in_a_header_is_named() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (file(1, &alignment(0), 0, &[], 0), "must be a power of two"),
            (file(1, &alignment(24), 0, &[], 0), "must be a power of two"),
            (
                file(0, &[], 1 << 31, &[], 64),
                "the tensor count is 2147483648",
            ),
            (file(u64::MAX, &[], 0, &[], 64), "the metadata count"),
            (
                file(0, &[], 1, &tensor("a", &[1 << 40, 1 << 40], 0), 64),
                "product overflows",
            ),
            (
                file(0, &[], 1, &tensor("a", &[1 << 30, 1 << 10], 0), 64),
                "more than a file",
            ),
            (
                file(0, &[], 1, &tensor("a", &[1, 1, 1, 1, 1], 0), 64),
                "5 dimensions",
            ),
            (
                file(0, &[], 1, &tensor("a", &[4], 1 << 40), 64),
                "past the end",
            ),
            (file(0, &[], 1, &tensor("a", &[4], 3), 64), "not a multiple"),
        ];
        for (bytes, needle) in cases {
            let e = checked(&bytes).expect_err(needle);
            assert!(e.contains(needle), "{e} (wanted {needle})");
        }
        // The alignment under a key with a NUL at its end (found by fuzzing: the reader
        // after this check strips it).
        let mut padded = string("general.alignment\0");
        padded.extend(4u32.to_le_bytes());
        padded.extend(0u32.to_le_bytes());
        let e = checked(&file(1, &padded, 0, &[], 16)).unwrap_err();
        assert!(e.contains("must be a power of two"), "{e}");
        // A string value longer than the file, and an array of 2^40 elements.
        let mut long = string("k");
        long.extend(8u32.to_le_bytes());
        long.extend((1u64 << 40).to_le_bytes());
        let e = checked(&file(1, &long, 0, &[], 16)).unwrap_err();
        assert!(e.contains("bytes are left"), "{e}");
        let mut array = string("k");
        array.extend(9u32.to_le_bytes());
        array.extend(4u32.to_le_bytes());
        array.extend((1u64 << 40).to_le_bytes());
        let e = checked(&file(1, &array, 0, &[], 16)).unwrap_err();
        assert!(e.contains("the length of the array `k`"), "{e}");
        // Cut anywhere, a header is an error, never a panic.
        let whole = file(1, &alignment(32), 1, &tensor("a", &[4], 0), 0);
        for cut in 0..whole.len() {
            assert!(checked(&whole[..cut]).is_err(), "cut at {cut}");
        }
    }
}
