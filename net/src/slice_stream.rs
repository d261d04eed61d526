//! A slice load's stream (ALPN [`SLICE_ALPN`](strata_proto::SLICE_ALPN)): messages with a
//! length before them, and raw pieces of files each after a 16-byte head, on a TLS
//! connection, as control.proto's `LoadOutcome` describes. Framing and bounded reads only:
//! what the bytes mean is the coordinator's and the worker's.

use std::io;

use strata_proto::{MAX_LOAD_MESSAGE_BYTES, MAX_SLICE_PIECE_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of a piece's head.
pub const PIECE_HEAD_BYTES: usize = 16;
/// The file index that ends the pieces.
const END: u32 = u32::MAX;

/// Where the bytes after a head go: `length` bytes at `offset` of file `file` (an index
/// into the load header's files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceHead {
    /// Index into `LoadHeader.files`.
    pub file: u32,
    /// Offset in that file.
    pub offset: u64,
    /// Bytes that follow.
    pub length: u32,
}

impl PieceHead {
    /// The head as sent.
    pub fn encode(&self) -> [u8; PIECE_HEAD_BYTES] {
        let mut out = [0u8; PIECE_HEAD_BYTES];
        out[..4].copy_from_slice(&self.file.to_be_bytes());
        out[4..12].copy_from_slice(&self.offset.to_be_bytes());
        out[12..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// The head that ends the pieces.
    pub fn end() -> [u8; PIECE_HEAD_BYTES] {
        PieceHead {
            file: END,
            offset: 0,
            length: 0,
        }
        .encode()
    }

    /// A received head: `None` for the end, an error for a piece past the limit.
    fn decode(bytes: &[u8; PIECE_HEAD_BYTES]) -> io::Result<Option<PieceHead>> {
        let word = |range: std::ops::Range<usize>| {
            bytes[range]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        };
        let head = PieceHead {
            file: word(0..4) as u32,
            offset: word(4..12),
            length: word(12..16) as u32,
        };
        if head.file == END {
            return Ok(None);
        }
        if head.length == 0 || head.length > MAX_SLICE_PIECE_BYTES {
            return Err(invalid(format!(
                "a slice piece of {} bytes (1 to {MAX_SLICE_PIECE_BYTES} allowed)",
                head.length
            )));
        }
        Ok(Some(head))
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Sends `message` after its length.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    message: &impl prost::Message,
) -> io::Result<()> {
    let body = message.encode_to_vec();
    let length = u32::try_from(body.len())
        .ok()
        .filter(|&n| n <= MAX_LOAD_MESSAGE_BYTES)
        .ok_or_else(|| invalid(format!("a load message of {} bytes", body.len())))?;
    w.write_all(&length.to_be_bytes()).await?;
    w.write_all(&body).await
}

/// Receives a message sent by [`write_message`]; a length past the limit or bytes that
/// do not decode are an error, as is the stream ending inside it.
pub async fn read_message<M: prost::Message + Default, R: AsyncRead + Unpin>(
    r: &mut R,
) -> io::Result<M> {
    let mut length = [0u8; 4];
    r.read_exact(&mut length).await?;
    let length = u32::from_be_bytes(length);
    if length > MAX_LOAD_MESSAGE_BYTES {
        return Err(invalid(format!(
            "a load message of {length} bytes (at most {MAX_LOAD_MESSAGE_BYTES})"
        )));
    }
    let mut body = vec![0u8; length as usize];
    r.read_exact(&mut body).await?;
    M::decode(body.as_slice()).map_err(|e| invalid(format!("a load message: {e}")))
}

/// Receives the next piece's head; `None` once the pieces end.
pub async fn read_piece_head<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<PieceHead>> {
    let mut head = [0u8; PIECE_HEAD_BYTES];
    r.read_exact(&mut head).await?;
    PieceHead::decode(&head)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use strata_proto::v1::{LoadRefused, SliceFile};

    #[tokio::test]
    async fn heads_and_messages_round_trip() {
        let head = PieceHead {
            file: 3,
            offset: (5 << 32) + 7,
            length: 1 << 19,
        };
        let mut wire = head.encode().to_vec();
        wire.extend_from_slice(&PieceHead::end());
        let mut r = wire.as_slice();
        assert_eq!(read_piece_head(&mut r).await.unwrap(), Some(head));
        assert_eq!(read_piece_head(&mut r).await.unwrap(), None);

        let message = SliceFile {
            path: "model.gguf".into(),
            length: 99,
            ranges: vec![],
        };
        let mut wire = Vec::new();
        write_message(&mut wire, &message).await.unwrap();
        let got: SliceFile = read_message(&mut wire.as_slice()).await.unwrap();
        assert_eq!(got, message);
    }

    #[tokio::test]
    async fn malformed_input_is_an_error_that_says_what() {
        for length in [0, MAX_SLICE_PIECE_BYTES + 1] {
            let head = PieceHead {
                file: 0,
                offset: 0,
                length,
            };
            let e = read_piece_head(&mut head.encode().as_slice())
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("slice piece"), "{e}");
        }
        // A head cut short.
        let e = read_piece_head(&mut [0u8; 9].as_slice()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // A length past the limit, a body cut short, a body that does not decode.
        let e = read_message::<LoadRefused, _>(&mut u32::MAX.to_be_bytes().as_slice())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        let mut short = 10u32.to_be_bytes().to_vec();
        short.extend_from_slice(&[1, 2, 3]);
        let e = read_message::<LoadRefused, _>(&mut short.as_slice())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xFF, 0xFF, 0xFF]);
        let e = read_message::<LoadRefused, _>(&mut garbage.as_slice())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
