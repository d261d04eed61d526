//! The form activations take between stages: their element type on the wire, and the
//! conversion of a `[rows, hidden]` tensor to and from its little-endian bytes. Pure
//! conversion, no I/O: the cluster's frames carry these bytes, and [`crate::LocalPipeline`]
//! passes its stages' activations through the same rounding, so a split run in one process
//! shows what a cluster with that wire type computes.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Element type of activations between stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireType {
    /// IEEE single: exact, so the split never changes the answer (the default).
    #[default]
    F32,
    /// IEEE half: half the bytes; rounding may change a token where two are nearly tied.
    F16,
    /// bfloat16: half the bytes, F32's range, coarser rounding than F16.
    Bf16,
}

impl WireType {
    /// Parses `f32`, `f16` or `bf16`.
    pub fn parse(name: &str) -> Option<WireType> {
        match name.to_ascii_lowercase().as_str() {
            "f32" => Some(WireType::F32),
            "f16" => Some(WireType::F16),
            "bf16" => Some(WireType::Bf16),
            _ => None,
        }
    }

    /// Its name, as `parse` reads it.
    pub fn name(self) -> &'static str {
        match self {
            WireType::F32 => "f32",
            WireType::F16 => "f16",
            WireType::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn element_bytes(self) -> usize {
        match self {
            WireType::F32 => 4,
            WireType::F16 | WireType::Bf16 => 2,
        }
    }

    fn dtype(self) -> DType {
        match self {
            WireType::F32 => DType::F32,
            WireType::F16 => DType::F16,
            WireType::Bf16 => DType::BF16,
        }
    }

    /// Activations `[rows, hidden]` as little-endian bytes of this type.
    pub fn encode(self, t: &Tensor) -> Result<Vec<u8>> {
        let flat = t.flatten_all()?.to_dtype(self.dtype())?;
        Ok(match self {
            WireType::F32 => bytemuck::cast_slice(&flat.to_vec1::<f32>()?).to_vec(),
            WireType::F16 => bytemuck::cast_slice(&flat.to_vec1::<half::f16>()?).to_vec(),
            WireType::Bf16 => bytemuck::cast_slice(&flat.to_vec1::<half::bf16>()?).to_vec(),
        })
    }

    /// Bytes of this type back to an F32 tensor `[rows, hidden]`.
    pub fn decode(
        self,
        bytes: &[u8],
        rows: usize,
        hidden: usize,
        device: &Device,
    ) -> Result<Tensor> {
        Ok(
            Tensor::from_raw_buffer(bytes, self.dtype(), &[rows, hidden], device)?
                .to_dtype(DType::F32)?,
        )
    }

    /// What a tensor becomes after crossing the wire: rounded to this type, back in F32.
    pub fn round_trip(self, t: &Tensor) -> Result<Tensor> {
        Ok(match self {
            WireType::F32 => t.to_dtype(DType::F32)?,
            other => t.to_dtype(other.dtype())?.to_dtype(DType::F32)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_type_round_trips_its_bytes_and_f32_is_exact() {
        let values = [0.1f32, -3.25, 1e-3, 65504.0, 1.0 / 3.0, 7.0];
        let t = Tensor::from_slice(&values, (3, 2), &Device::Cpu).unwrap();
        for wire in [WireType::F32, WireType::F16, WireType::Bf16] {
            let bytes = wire.encode(&t).unwrap();
            assert_eq!(bytes.len(), values.len() * wire.element_bytes());
            let back = wire.decode(&bytes, 3, 2, &Device::Cpu).unwrap();
            let rounded = wire.round_trip(&t).unwrap();
            assert_eq!(
                back.to_vec2::<f32>().unwrap(),
                rounded.to_vec2::<f32>().unwrap()
            );
            assert_eq!(WireType::parse(wire.name()), Some(wire));
        }
        let exact = WireType::F32.round_trip(&t).unwrap();
        assert_eq!(
            exact.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            values
        );
        let half = WireType::F16.round_trip(&t).unwrap();
        assert_ne!(
            half.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            values
        );
        assert_eq!(WireType::parse("fp8"), None);
    }
}
