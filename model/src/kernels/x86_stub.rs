//! Off x86-64 the AVX2 kernels are never called: `available()` is false there.

use super::{ActRow, BlockScales, TILE, WIDE};

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
    _: BlockScales,
    _: BlockScales,
    _: &[u8],
    _: [ActRow; A],
) -> [[f32; TILE]; A] {
    unreachable!("the Q4_0 kernels only run on x86-64")
}

/// Never called: `available()` is false off x86-64.
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
    unreachable!("the six-bit kernels only run on x86-64")
}

/// Never called: `available()` is false off x86-64.
pub(super) unsafe fn wide_tile_dot<const A: usize>(
    _: usize,
    _: BlockScales,
    _: BlockScales,
    _: &[u8],
    _: [ActRow; A],
) -> [[f32; WIDE]; A] {
    unreachable!("the wide kernels only run on x86-64")
}

/// Never called: `available()` is false off x86-64.
pub(super) unsafe fn wide_q8_tile_dot<const A: usize>(
    _: usize,
    _: &[u16],
    _: &[u8],
    _: [ActRow; A],
) -> [[f32; WIDE]; A] {
    unreachable!("the wide kernels only run on x86-64")
}

/// Never called: `available()` is false off x86-64.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn wide_six_tile_dot<const A: usize>(
    _: usize,
    _: BlockScales,
    _: BlockScales,
    _: &[u8],
    _: &[u8],
    _: &[i8],
    _: u8,
    _: [ActRow; A],
) -> [[f32; WIDE]; A] {
    unreachable!("the wide kernels only run on x86-64")
}
