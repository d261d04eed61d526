//! The least a slice push over the control plane's TLS must cost on this machine, as the
//! same-run baseline for `tests/campaigns/push.py`: one file read in 512 KiB pieces on a
//! blocking thread, sent over mutual TLS 1.3 with the cluster's own certificates (ring's
//! AES-GCM, as every Strata connection), received and written into a file at its offsets,
//! with the two ends on their own threads as the coordinator and worker are. No gRPC, no
//! cache bookkeeping: what is left once both are gone.
//!
//! A measurement, not a check:
//!
//! ```text
//! STRATA_TLS_CEILING_FILE=model.gguf cargo test --release -p strata-net \
//!     --test tls_ceiling -- --ignored --nocapture
//! ```
//!
//! Without the variable it sends a 512 MB file of its own.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use strata_net::identity::{worker_name, ClusterCa, CERT_LIFETIME, COORDINATOR_NAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PIECE: usize = 1 << 19;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Receives everything on one connection into `out` at its offsets: what a worker does.
fn receive(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    out: std::fs::File,
) -> u64 {
    runtime().block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let mut stream = tokio_rustls::TlsAcceptor::from(tls)
            .accept(socket)
            .await
            .unwrap();
        let mut piece = vec![0u8; PIECE];
        let mut at = 0u64;
        loop {
            let n = stream.read(&mut piece).await.unwrap();
            if n == 0 {
                stream.shutdown().await.unwrap();
                return at;
            }
            out.write_all_at(&piece[..n], at).unwrap();
            at += n as u64;
        }
    })
}

#[test]
#[ignore]
fn tls_push_ceiling() {
    let source = match std::env::var("STRATA_TLS_CEILING_FILE") {
        Ok(path) => std::path::PathBuf::from(path),
        Err(_) => {
            let path = std::env::temp_dir().join("strata-tls-ceiling.bin");
            let mut f = std::fs::File::create(&path).unwrap();
            let block: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
            for _ in 0..512 {
                f.write_all(&block).unwrap();
            }
            path
        }
    };
    let length = std::fs::metadata(&source).unwrap().len();
    // Read once, so the page cache holds it as it holds a coordinator's model.
    std::io::copy(
        &mut std::fs::File::open(&source).unwrap(),
        &mut std::io::sink(),
    )
    .unwrap();

    let ca = ClusterCa::create().unwrap();
    let coordinator = ca.issue_identity(COORDINATOR_NAME, CERT_LIFETIME).unwrap();
    let worker = ca.issue_identity(&worker_name("w"), CERT_LIFETIME).unwrap();
    let server_tls = worker.control_server_config().unwrap();
    let client_tls = coordinator.slice_client_config().unwrap();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = std::fs::File::create(dir.path().join("received")).unwrap();
    out.set_len(length).unwrap();
    let receiver = std::thread::spawn(move || receive(listener, server_tls, out));

    let elapsed = runtime().block_on(async move {
        let socket = tokio::net::TcpStream::connect(address).await.unwrap();
        socket.set_nodelay(true).unwrap();
        let name = rustls_pki_types::ServerName::try_from(worker_name("w")).unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(client_tls)
            .connect(name, socket)
            .await
            .unwrap();
        let started = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let reader = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::File::open(&source).unwrap();
            loop {
                let mut piece = Vec::with_capacity(PIECE);
                (&mut file)
                    .take(PIECE as u64)
                    .read_to_end(&mut piece)
                    .unwrap();
                if piece.is_empty() || tx.blocking_send(piece).is_err() {
                    return;
                }
            }
        });
        while let Some(piece) = rx.recv().await {
            stream.write_all(&piece).await.unwrap();
        }
        stream.shutdown().await.unwrap();
        // Until the receiver has written the last byte and closed (closing first, with
        // its session tickets unread, would reset the connection under it).
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        reader.await.unwrap();
        started
    });
    let received = receiver.join().unwrap();
    let seconds = elapsed.elapsed().as_secs_f64().max(1e-3);
    assert_eq!(received, length, "the whole file arrived");
    println!(
        "tls ceiling: {} MB in {:.0} ms: {:.0} MB/s",
        received / 1_000_000,
        seconds * 1e3,
        received as f64 / seconds / 1e6
    );
}
