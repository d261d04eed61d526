//! Off aarch64 the NEON kernels are never called: `Isa::Neon` is not supported there.

use super::{ActRow, BlockScales, TILE};

/// Never called off aarch64.
pub(super) unsafe fn tile_dot<const A: usize>(
    _: usize,
    _: BlockScales,
    _: BlockScales,
    _: &[u8],
    _: [ActRow; A],
) -> [[f32; TILE]; A] {
    unreachable!("the NEON kernels only run on aarch64")
}

/// Never called off aarch64.
pub(super) unsafe fn q8_tile_dot<const A: usize>(
    _: usize,
    _: &[u16],
    _: &[u8],
    _: [ActRow; A],
) -> [[f32; TILE]; A] {
    unreachable!("the NEON kernels only run on aarch64")
}

/// Never called off aarch64.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn six_tile_dot<const A: usize>(
    _: usize,
    _: BlockScales,
    _: BlockScales,
    _: &[u8],
    _: &[u8],
    _: &[i8],
    _: u8,
    _: [ActRow; A],
) -> [[f32; TILE]; A] {
    unreachable!("the NEON kernels only run on aarch64")
}
