//! The data-plane frame: a length-prefixed prost [`FrameHeader`] followed by raw
//! little-endian tensor bytes. Pure encode, decode and validation: no sockets, so every
//! limit is unit-tested. Every length is checked before anything is allocated from it.

use candle_core::{DType, Device, Tensor};
use prost::Message;
use strata_model::SamplingParams;
use strata_proto::v1::{FrameHeader, FrameKind, Sampling, WireDType};
use strata_proto::{MAX_FRAME_HEADER_BYTES, MAX_FRAME_PAYLOAD_BYTES, PROTOCOL_VERSION};

/// Most sequence chunks in one frame.
pub const MAX_CHUNKS: usize = 4096;
/// Most rows (token positions) in one frame.
pub const MAX_ROWS: u64 = 1 << 16;
/// Widest hidden size accepted.
pub const MAX_HIDDEN: u32 = 1 << 16;

/// A decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The header.
    pub header: FrameHeader,
    /// Raw tensor bytes (empty for token and control frames).
    pub payload: Vec<u8>,
}

/// Bytes per element of a wire type.
pub fn element_bytes(dtype: WireDType) -> u64 {
    match dtype {
        WireDType::None => 0,
        WireDType::F16 | WireDType::Bf16 => 2,
        WireDType::F32 => 4,
    }
}

/// Parses `f16`, `bf16` or `f32`.
pub fn parse_wire_dtype(name: &str) -> Option<WireDType> {
    match name.to_ascii_lowercase().as_str() {
        "f16" => Some(WireDType::F16),
        "bf16" => Some(WireDType::Bf16),
        "f32" => Some(WireDType::F32),
        _ => None,
    }
}

/// The 4-byte length prefix and the encoded header.
pub fn encode_header(header: &FrameHeader) -> Vec<u8> {
    let body = header.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads the length prefix, refusing headers over the limit.
pub fn header_len(prefix: [u8; 4]) -> Result<usize, String> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 || len > MAX_FRAME_HEADER_BYTES {
        return Err(format!(
            "header of {len} bytes (the limit is {MAX_FRAME_HEADER_BYTES})"
        ));
    }
    Ok(len)
}

/// Decodes and validates a header.
pub fn decode_header(bytes: &[u8]) -> Result<FrameHeader, String> {
    let header = FrameHeader::decode(bytes).map_err(|e| format!("undecodable header: {e}"))?;
    validate(&header)?;
    Ok(header)
}

/// Checks a header's internal consistency: version, kind, counts, and that the payload
/// length is exactly rows x hidden x element size.
pub fn validate(h: &FrameHeader) -> Result<(), String> {
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} (this node speaks {PROTOCOL_VERSION}); run the same strata version on every machine",
            h.protocol_version
        ));
    }
    if h.payload_bytes > MAX_FRAME_PAYLOAD_BYTES {
        return Err(format!(
            "payload of {} bytes (the limit is {MAX_FRAME_PAYLOAD_BYTES})",
            h.payload_bytes
        ));
    }
    let dtype = WireDType::try_from(h.dtype).map_err(|_| format!("unknown dtype {}", h.dtype))?;
    match FrameKind::try_from(h.kind) {
        Ok(FrameKind::Forward) => {
            if h.chunks.len() > MAX_CHUNKS {
                return Err(format!(
                    "{} chunks (the limit is {MAX_CHUNKS})",
                    h.chunks.len()
                ));
            }
            if h.chunks.is_empty() && h.errors.is_empty() {
                return Err("a forward frame with neither chunks nor errors".into());
            }
            let mut rows = 0u64;
            for c in &h.chunks {
                if c.length == 0 {
                    return Err(format!("sequence {} has an empty chunk", c.sequence));
                }
                if c.token_ids.len() != c.length as usize {
                    return Err(format!(
                        "sequence {}: {} token ids for {} positions",
                        c.sequence,
                        c.token_ids.len(),
                        c.length
                    ));
                }
                rows += u64::from(c.length);
            }
            if rows > MAX_ROWS {
                return Err(format!("{rows} rows (the limit is {MAX_ROWS})"));
            }
            if dtype == WireDType::None {
                if h.payload_bytes != 0 {
                    return Err("token frame with a payload".into());
                }
            } else {
                if h.hidden == 0 || h.hidden > MAX_HIDDEN {
                    return Err(format!("hidden size {}", h.hidden));
                }
                let expected = rows * u64::from(h.hidden) * element_bytes(dtype);
                if h.payload_bytes != expected {
                    return Err(format!(
                        "payload of {} bytes, but {rows} rows x {} x {} bytes is {expected}",
                        h.payload_bytes,
                        h.hidden,
                        element_bytes(dtype)
                    ));
                }
            }
        }
        Ok(FrameKind::Tokens) | Ok(FrameKind::Free) => {
            if h.payload_bytes != 0 {
                return Err("control frame with a payload".into());
            }
            if h.tokens.len() > MAX_CHUNKS || h.free.len() > MAX_CHUNKS {
                return Err("too many entries".into());
            }
        }
        _ => return Err(format!("unknown frame kind {}", h.kind)),
    }
    if h.errors.len() > MAX_CHUNKS {
        return Err("too many errors".into());
    }
    Ok(())
}

/// Rows of a forward frame.
pub fn rows(h: &FrameHeader) -> usize {
    h.chunks.iter().map(|c| c.length as usize).sum()
}

/// Activations `[rows, hidden]` as wire bytes of `dtype`.
pub fn tensor_to_wire(t: &Tensor, dtype: WireDType) -> candle_core::Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match dtype {
        WireDType::F16 => {
            let v = flat.to_dtype(DType::F16)?.to_vec1::<half::f16>()?;
            bytemuck::cast_slice(&v).to_vec()
        }
        WireDType::Bf16 => {
            let v = flat.to_dtype(DType::BF16)?.to_vec1::<half::bf16>()?;
            bytemuck::cast_slice(&v).to_vec()
        }
        WireDType::F32 | WireDType::None => {
            let v = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            bytemuck::cast_slice(&v).to_vec()
        }
    })
}

/// Wire bytes back to an F32 tensor `[rows, hidden]`.
pub fn wire_to_tensor(
    bytes: &[u8],
    dtype: WireDType,
    rows: usize,
    hidden: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let dt = match dtype {
        WireDType::F16 => DType::F16,
        WireDType::Bf16 => DType::BF16,
        _ => DType::F32,
    };
    Tensor::from_raw_buffer(bytes, dt, &[rows, hidden], device)?.to_dtype(DType::F32)
}

/// Sampling parameters from their wire form; zero fields mean the defaults.
pub fn sampling_params(s: Option<&Sampling>) -> SamplingParams {
    let d = SamplingParams::default();
    let Some(s) = s else { return d };
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: if s.top_p > 0.0 { s.top_p } else { 1.0 },
        min_p: s.min_p,
        repeat_penalty: if s.repeat_penalty > 0.0 {
            s.repeat_penalty
        } else {
            1.0
        },
        repeat_window: if s.repeat_window > 0 {
            s.repeat_window as usize
        } else {
            d.repeat_window
        },
        seed: s.seed,
        top_logprobs: s.top_logprobs as usize,
        ..d
    }
}

/// Sampling parameters in their wire form.
pub fn wire_sampling(p: &SamplingParams) -> Sampling {
    Sampling {
        temperature: p.temperature,
        top_k: p.top_k as u32,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        repeat_window: p.repeat_window as u32,
        seed: p.seed,
        logprobs: false,
        top_logprobs: p.top_logprobs as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_proto::v1::FrameChunk;

    fn forward(rows: u32, hidden: u32, dtype: WireDType) -> FrameHeader {
        FrameHeader {
            protocol_version: PROTOCOL_VERSION,
            kind: FrameKind::Forward as i32,
            chunks: vec![FrameChunk {
                sequence: 7,
                start: 0,
                length: rows,
                token_ids: vec![1; rows as usize],
                sampling: None,
            }],
            dtype: dtype as i32,
            hidden,
            payload_bytes: u64::from(rows) * u64::from(hidden) * element_bytes(dtype),
            ..Default::default()
        }
    }

    #[test]
    fn valid_headers_round_trip() {
        let h = forward(3, 64, WireDType::F16);
        let bytes = encode_header(&h);
        let len = header_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(decode_header(&bytes[4..4 + len]).unwrap(), h);
    }

    #[test]
    fn lies_about_sizes_are_refused_before_allocation() {
        let mut h = forward(3, 64, WireDType::F16);
        h.payload_bytes += 1;
        assert!(validate(&h).unwrap_err().contains("payload"));
        let mut h = forward(3, 64, WireDType::F32);
        h.payload_bytes = MAX_FRAME_PAYLOAD_BYTES + 1;
        assert!(validate(&h).unwrap_err().contains("limit"));
        let mut h = forward(3, 64, WireDType::F16);
        h.chunks[0].token_ids.pop();
        assert!(validate(&h).is_err());
        let mut h = forward(3, 64, WireDType::F16);
        h.protocol_version = 9;
        assert!(validate(&h).unwrap_err().contains("protocol version 9"));
        assert!(header_len(u32::MAX.to_le_bytes()).is_err());
        assert!(header_len(0u32.to_le_bytes()).is_err());
        assert!(decode_header(&[0xff, 0xff, 0xff]).is_err());
        let mut h = forward(3, 64, WireDType::F16);
        h.kind = 42;
        assert!(validate(&h).is_err());
    }

    #[test]
    fn activations_round_trip_through_each_wire_type() {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        for dtype in [WireDType::F16, WireDType::Bf16, WireDType::F32] {
            let bytes = tensor_to_wire(&t, dtype).unwrap();
            assert_eq!(bytes.len() as u64, 12 * element_bytes(dtype));
            let back = wire_to_tensor(&bytes, dtype, 3, 4, &Device::Cpu).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        }
    }
}
