//! `strata-proto`: the wire messages of every Strata plane, generated from the `.proto`
//! files under `proto/strata/v1/` with protox, so no system `protoc` is needed:
//!
//! - `Inference` and `Cluster`: the public gRPC API (`strata.v1`), served by the coordinator;
//! - `WorkerControl`: the coordinator -> worker control service (mutual TLS);
//! - `FrameHeader`: the header of a data-plane frame (QUIC, ALPN [`DATA_ALPN`]).
//!
//! It holds message definitions, versions and size limits only: no logic, no I/O.

#![allow(missing_docs)] // generated code; every message and field is documented in the .proto

/// The generated `strata.v1` package.
pub mod v1 {
    tonic::include_proto!("strata.v1");
}

/// Encoded `FileDescriptorSet` of every Strata proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("strata_descriptor");

/// Version of the control and data-plane messages. A peer with another version is refused
/// with a message naming both. 2: samplers resume at a random-stream position (replay).
/// 3: prompts travel in pieces (`FrameChunk.partial`) and runs reserve KV positions.
/// 4: joins are challenged, over TLS. 5: slices travel on a TLS stream of their own
/// ([`SLICE_ALPN`]), not in gRPC messages. 6: steps carry drafts to verify
/// (`FrameChunk.draft`, speculative decoding). 7: drafts drawn at random carry what they
/// were drawn from (`FrameChunk.drawn_from`), for the rejection rule. 8: a last stage
/// that holds a draft model drafts for the next step (`FrameChunk.draft_next`,
/// `FrameHeader.drafts`), which it receives as a load (`LoadHeader.draft`): a worker of 7
/// would load it as its slice.
pub const PROTOCOL_VERSION: u32 = 8;

/// ALPN of the data plane: names the frame format version.
pub const DATA_ALPN: &[u8] = b"strata/1";

/// ALPN of a slice load on a worker's control port (see `LoadOutcome` in control.proto).
pub const SLICE_ALPN: &[u8] = b"strata-slices/1";

/// Largest load header or load outcome accepted, in bytes.
pub const MAX_LOAD_MESSAGE_BYTES: u32 = 16 << 20;

/// Largest piece of a slice load accepted, in bytes.
pub const MAX_SLICE_PIECE_BYTES: u32 = 4 << 20;

/// Largest frame header accepted, in bytes.
pub const MAX_FRAME_HEADER_BYTES: usize = 1 << 20;

/// Largest frame payload accepted, in bytes (a prefill of 8192 tokens of hidden 8192 in F32).
pub const MAX_FRAME_PAYLOAD_BYTES: u64 = 256 << 20;
