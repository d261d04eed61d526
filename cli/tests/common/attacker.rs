//! A hostile peer on the LAN, for the hostile-peer tests: it speaks the real protocols
//! (the join over TLS, QUIC frames with a cluster certificate) the way a worker does, and
//! then does what a worker must not: replays a join, joins in plaintext, sends frames to a
//! stage that is not its successor, sends tokens to the coordinator. Each attempt reports
//! what the other side answered, for the test to assert and print.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

use std::net::SocketAddr;
use std::time::Duration;

use strata_net::api_tls::ClusterConnector;
use strata_net::frame::Frame;
use strata_net::identity::{self, Identity, JoinToken, PendingKey};
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::{JoinChallengeRequest, JoinRequest, JoinResponse, WorkerInfo};
use strata_proto::PROTOCOL_VERSION;

/// A join request as a worker makes one (for the id `id`, holding `key`), with a
/// challenge the coordinator at `api` handed out over TLS. A one-byte memory budget keeps
/// it out of any plan.
pub async fn join_request(
    api: &str,
    token: &JoinToken,
    key: &PendingKey,
    id: &str,
) -> Result<(ClusterClient<tonic::transport::Channel>, JoinRequest), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{api}"))
        .unwrap()
        .connect_with_connector(ClusterConnector::pinned(token.cluster_id()).unwrap())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = ClusterClient::new(channel);
    let challenge = client
        .join_challenge(JoinChallengeRequest {})
        .await?
        .into_inner()
        .challenge;
    let csr = key.signing_request(&identity::worker_name(id)).unwrap();
    let request = JoinRequest {
        worker: Some(WorkerInfo {
            id: id.into(),
            hostname: "attacker".into(),
            device: "cpu".into(),
            memory_budget: 1,
            speed_bytes_per_second: 1.0,
            protocol_version: PROTOCOL_VERSION,
            control_port: 9,
            data_port: 9,
            ..Default::default()
        }),
        token_proof: token.join_proof(&challenge, &csr),
        csr_der: csr,
        held: None,
        challenge,
    };
    Ok((client, request))
}

/// Joins as `id` with `key`; the request it sent (to replay) and the identity it got.
pub async fn join(
    api: &str,
    token: &JoinToken,
    key: &PendingKey,
    id: &str,
) -> Result<(JoinRequest, Identity), tonic::Status> {
    let (mut client, request) = join_request(api, token, key, id).await?;
    let JoinResponse {
        assigned_id,
        certificate_der,
        ca_certificate_der,
        ..
    } = client.join(request.clone()).await?.into_inner();
    let identity = key
        .into_identity(
            &identity::worker_name(&assigned_id),
            certificate_der,
            ca_certificate_der,
        )
        .unwrap();
    Ok((request, identity))
}

/// Sends `request` again, over a fresh TLS connection.
pub async fn replay(
    api: &str,
    token: &JoinToken,
    request: JoinRequest,
) -> Result<JoinResponse, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{api}"))
        .unwrap()
        .connect_with_connector(ClusterConnector::pinned(token.cluster_id()).unwrap())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(ClusterClient::new(channel)
        .join(request)
        .await?
        .into_inner())
}

/// Sends `request` in plaintext.
pub async fn plaintext_join(
    api: &str,
    request: JoinRequest,
) -> Result<JoinResponse, tonic::Status> {
    let mut client = ClusterClient::connect(format!("http://{api}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(client.join(request).await?.into_inner())
}

/// What became of a frame sent to a peer.
#[derive(Debug)]
pub enum Delivery {
    /// The peer closed the connection: why.
    Refused(String),
    /// The connection was still open after the wait.
    Taken,
}

/// Sends `frame` from `bind` to `to` (whose certificate is for `server_name`) as
/// `identity`, then waits up to 5 s to see whether the peer closes the connection.
pub async fn send_frame(
    identity: &Identity,
    bind: std::net::IpAddr,
    to: SocketAddr,
    server_name: &str,
    frame: &Frame,
) -> Result<Delivery, strata_net::Error> {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(bind, 0))?;
    let endpoint = strata_net::transport::endpoint(socket, identity)?;
    let conn = strata_net::transport::connect(&endpoint, to, server_name).await?;
    strata_net::transport::send_frame(&conn, frame).await?;
    let delivery = match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
        Ok(why) => Delivery::Refused(why.to_string()),
        Err(_) => Delivery::Taken,
    };
    endpoint.close(0u32.into(), b"done");
    Ok(delivery)
}

/// Opens a slice load to the worker at `control` (whose certificate is for `server_name`)
/// from `bind`, as `identity`, and sends a header for a slice of `model_digest` and 8 MiB
/// of pieces; returns what the worker answered.
pub async fn slice_load(
    identity: &Identity,
    bind: std::net::IpAddr,
    control: SocketAddr,
    server_name: &str,
    model_digest: &str,
) -> strata_proto::v1::load_outcome::Outcome {
    use strata_net::slice_stream::{read_message, write_message, PieceHead};
    use strata_proto::v1::{LoadHeader, LoadOutcome};
    use tokio::io::AsyncWriteExt;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(bind, 0)).unwrap();
    let socket = socket.connect(control).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(identity.slice_client_config().unwrap())
        .connect(name, socket)
        .await
        .unwrap();
    let header = LoadHeader {
        protocol_version: PROTOCOL_VERSION,
        model_digest: model_digest.into(),
        prefetch: true,
        ..Default::default()
    };
    write_message(&mut tls, &header).await.unwrap();
    // 8 MiB of pieces, more than the sockets buffer: the worker refuses first, and must
    // take (and drop) the rest rather than reset the connection and its answer with it.
    let evil = vec![0xEEu8; 1 << 19];
    for i in 0..16u64 {
        let piece = PieceHead {
            file: 0,
            offset: i << 19,
            length: 1 << 19,
        };
        tls.write_all(&piece.encode()).await.unwrap();
        tls.write_all(&evil).await.unwrap();
    }
    let outcome: LoadOutcome =
        tokio::time::timeout(Duration::from_secs(10), read_message(&mut tls))
            .await
            .unwrap()
            .unwrap();
    outcome.outcome.unwrap()
}
