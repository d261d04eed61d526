//! The key/value cache: per sequence, per layer of this stage's slice, grown in place.
//!
//! The cache is explicit state owned by the caller and passed into every forward, so a
//! stage can hold many sequences, and a sequence can be created, extended, truncated (to
//! rewind or replay) and freed independently of the model weights.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A sequence's id, unique within a cluster.
pub type SeqId = u64;

/// Smallest capacity (in positions) a layer's buffer is allocated with.
const MIN_CAPACITY: usize = 64;

/// One layer's keys and values for one sequence: `[kv_heads, capacity, head_dim]` buffers
/// of which the first `len` positions are valid.
#[derive(Debug, Default)]
struct LayerKv {
    buffers: Option<(Tensor, Tensor)>,
    capacity: usize,
}

/// The cache of one sequence on one stage.
#[derive(Debug)]
struct SeqKv {
    len: usize,
    /// Positions it is known to reach: its buffers are allocated at that size at once
    /// (0: unknown, they grow by doubling).
    reserve: usize,
    layers: Vec<LayerKv>,
}

/// KV caches of every sequence this stage serves.
#[derive(Debug)]
pub struct KvCache {
    first_layer: usize,
    num_layers: usize,
    seqs: HashMap<SeqId, SeqKv>,
}

impl KvCache {
    /// An empty cache for the layers `first_layer .. first_layer + num_layers`.
    pub fn new(first_layer: usize, num_layers: usize) -> Self {
        KvCache {
            first_layer,
            num_layers,
            seqs: HashMap::new(),
        }
    }

    /// Starts an empty sequence; an existing one is reset to empty.
    pub fn create(&mut self, seq: SeqId) {
        self.create_with_capacity(seq, 0);
    }

    /// Starts an empty sequence that will reach `reserve` positions: each layer's buffers
    /// are allocated once at that size, so its memory is what was reserved, never a
    /// doubling past it (0: unknown, grow as needed).
    pub fn create_with_capacity(&mut self, seq: SeqId, reserve: usize) {
        let layers = (0..self.num_layers).map(|_| LayerKv::default()).collect();
        self.seqs.insert(
            seq,
            SeqKv {
                len: 0,
                reserve,
                layers,
            },
        );
    }

    /// Whether the sequence exists here.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Positions cached for the sequence.
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        self.seqs
            .get(&seq)
            .map(|s| s.len)
            .ok_or(Error::UnknownSequence { seq })
    }

    /// Number of live sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Forgets every position from `len` on (to rewind a sequence); capacity is kept.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence { seq })?;
        s.len = s.len.min(len);
        Ok(())
    }

    /// Frees the sequence's memory. Freeing an unknown sequence is not an error (a client
    /// that left may be freed twice).
    pub fn free(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    /// Bytes held by all buffers.
    pub fn bytes(&self) -> usize {
        self.seqs
            .values()
            .flat_map(|s| &s.layers)
            .filter_map(|l| l.buffers.as_ref())
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) at positions `start..start + n` of a layer
    /// and returns views of all `start + n` cached positions. The sequence's length is
    /// advanced separately by [`KvCache::advance`], once every layer has appended.
    pub(crate) fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence { seq })?;
        let layers = self.first_layer..self.first_layer + self.num_layers;
        let reserve = s.reserve;
        let entry = layer
            .checked_sub(self.first_layer)
            .and_then(|local| s.layers.get_mut(local))
            .ok_or(Error::LayerOutOfRange { layer, layers })?;
        let (kv_heads, n, head_dim) = k.dims3()?;
        let needed = start + n;
        if needed > entry.capacity {
            let capacity = if reserve >= needed {
                reserve
            } else {
                needed.max(2 * entry.capacity).max(MIN_CAPACITY)
            };
            let grow = |old: Option<&Tensor>, device: &Device, dtype: DType| -> Result<Tensor> {
                let fresh = Tensor::zeros((kv_heads, capacity, head_dim), dtype, device)?;
                if let Some(old) = old {
                    if start > 0 {
                        fresh.slice_set(&old.narrow(1, 0, start)?.contiguous()?, 1, 0)?;
                    }
                }
                Ok(fresh)
            };
            let (old_k, old_v) = match &entry.buffers {
                Some((k, v)) => (Some(k), Some(v)),
                None => (None, None),
            };
            let new_k = grow(old_k, k.device(), k.dtype())?;
            let new_v = grow(old_v, v.device(), v.dtype())?;
            entry.buffers = Some((new_k, new_v));
            entry.capacity = capacity;
        }
        let Some((kbuf, vbuf)) = &entry.buffers else {
            return Err(Error::InvalidBatch(
                "kv buffer missing after allocation".into(),
            ));
        };
        kbuf.slice_set(&k.contiguous()?, 1, start)?;
        vbuf.slice_set(&v.contiguous()?, 1, start)?;
        Ok((kbuf.narrow(1, 0, needed)?, vbuf.narrow(1, 0, needed)?))
    }

    /// Records that `n` more positions of the sequence are cached.
    pub(crate) fn advance(&mut self, seq: SeqId, n: usize) -> Result<()> {
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence { seq })?;
        s.len += n;
        Ok(())
    }
}
