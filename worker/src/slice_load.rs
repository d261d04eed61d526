//! A slice load on the control port (ALPN `strata-slices/1`, framed as
//! `strata_net::slice_stream` says): the coordinator's header, the ranges the cache lacks
//! as raw pieces written into the cache, then the slice loaded into memory (or, for a
//! prefetch, only kept on disk), and the outcome back on the same connection. A draft
//! model for speculative decoding travels the same way, whole (`LoadHeader.draft`), and is
//! held beside the slice, which keeps serving.
//!
//! The control service's other calls are gRPC; a slice is raw bytes on TLS because it is
//! nearly all of a worker's traffic, and a gRPC message costs a copy on each side and
//! HTTP/2's framing per 16 KiB.

use std::time::{Duration, Instant};

use candle_core::Device;
use strata_model::draft::DraftModel;
use strata_model::{ModelFile, Slice, Stage};
use strata_net::listen::Connection;
use strata_net::memory;
use strata_net::progress::Progress;
use strata_net::slice_stream::{read_message, read_piece_head, write_message};
use strata_proto::v1::load_outcome::Outcome;
use strata_proto::v1::{LoadHeader, LoadOutcome, LoadRefused, LoadResponse};
use strata_proto::PROTOCOL_VERSION;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Status;
use tracing::{debug, info, warn, Instrument};

use crate::cache::CacheError;
use crate::control::{status, ControlService};
use crate::stage::{Command, StageState};

/// A connection to the control port that negotiated a slice load.
pub type SliceConnection = tokio_rustls::server::TlsStream<Connection>;

/// How long the coordinator may take to send the header, or any piece once begun, or to
/// read the outcome: a coordinator gone silent must not hold a connection forever.
const STALL: Duration = Duration::from_secs(30);

/// Received pieces waiting for the writer thread (each up to half a MiB): enough to ride
/// out a slow write, few enough that a load's buffers stay a few MiB.
const WRITE_QUEUE: usize = 4;

/// A cache error as the coordinator hears it.
pub(crate) fn cache_status(e: CacheError) -> Status {
    match e {
        CacheError::Invalid(m) => Status::invalid_argument(m),
        io => Status::internal(io.to_string()),
    }
}

/// The stream broke or carried something malformed.
fn stream_status(e: std::io::Error) -> Status {
    Status::invalid_argument(format!("the slice stream: {e}"))
}

/// `io` within [`STALL`].
async fn within<T>(
    what: &str,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Status> {
    tokio::time::timeout(STALL, io)
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!("the coordinator sent no {what} for {STALL:?}"))
        })?
        .map_err(stream_status)
}

/// Bytes of the ranges a load's header names.
fn load_bytes(header: &LoadHeader) -> u64 {
    header
        .files
        .iter()
        .flat_map(|f| f.ranges.iter().map(|r| r.length))
        .sum()
}

/// A load's answer: `received` of its `total` bytes came over the network, the rest from
/// the cache.
fn load_response(weight_bytes: u64, received: u64, total: u64, started: Instant) -> LoadResponse {
    LoadResponse {
        weight_bytes,
        resident_bytes: memory::resident_bytes(),
        load_ms: started.elapsed().as_millis() as u64,
        bytes_received: received,
        bytes_cached: total.saturating_sub(received),
    }
}

impl ControlService {
    /// Serves one slice load to its end, and tells the coordinator how it went (a
    /// coordinator that can no longer hear it is only logged).
    pub async fn serve_slice_load(&self, mut connection: SliceConnection) {
        let outcome = match self.slice_load(&mut connection).await {
            Ok(loaded) => Outcome::Loaded(loaded),
            Err(refused) => {
                warn!(cause = %refused.message(), "a slice load failed");
                Outcome::Refused(LoadRefused {
                    code: refused.code() as i32,
                    message: refused.message().to_string(),
                })
            }
        };
        let reply = async {
            let outcome = LoadOutcome {
                outcome: Some(outcome),
            };
            write_message(&mut connection, &outcome).await?;
            connection.shutdown().await?;
            // Until the coordinator closes: closing with its pieces unread (a refusal comes
            // before them) would reset the connection, and the answer with it.
            // (It may close without a TLS close_notify: that ends the wait as well.)
            let _ = tokio::io::copy(&mut connection, &mut tokio::io::sink()).await;
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(STALL, reply).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(cause = %e, "could not tell the coordinator how a load went"),
            Err(_) => debug!("the coordinator did not take a load's outcome"),
        }
    }

    async fn slice_load(&self, connection: &mut SliceConnection) -> Result<LoadResponse, Status> {
        self.authorize_certificate(
            connection
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first()),
        )?;
        let started = Instant::now();
        let header: LoadHeader = within("load header", read_message(connection)).await?;
        self.admit_load(&header)?;
        if header.draft {
            let span = tracing::info_span!("draft load", model = %header.model_name);
            return self
                .draft_load(&header, connection, started)
                .instrument(span)
                .await;
        }
        let span = tracing::info_span!("load", layers = ?(header.layer_start..header.layer_end), prefetch = header.prefetch);
        async {
            let total = load_bytes(&header);
            if !header.prefetch {
                // Free the old slice first: the budget must hold one slice, never two.
                self.stage.call(Command::Unload).await;
                self.stage.stats.set_state(StageState::Loading);
            }
            let receiving = Instant::now();
            let received = self.receive(&header, connection).await.inspect_err(|_| {
                if !header.prefetch {
                    self.stage.stats.set_state(StageState::Idle);
                }
            })?;
            let receive_ms = receiving.elapsed().as_millis() as u64;
            let weight_bytes = if header.prefetch {
                0
            } else {
                self.install(&header).await?
            };
            info!(
                weight_bytes,
                received_bytes = received,
                cached_bytes = total.saturating_sub(received),
                receive_ms,
                ms = started.elapsed().as_millis() as u64,
                "{}",
                if header.prefetch {
                    "slice prefetched"
                } else {
                    "slice loaded"
                }
            );
            Ok(load_response(weight_bytes, received, total, started))
        }
        .instrument(span)
        .await
    }

    /// Receives a draft model into the cache and, unless only prefetched or already held,
    /// loads it beside the slice.
    async fn draft_load(
        &self,
        header: &LoadHeader,
        connection: &mut SliceConnection,
        started: Instant,
    ) -> Result<LoadResponse, Status> {
        if header.draft_vocabulary == 0 {
            return Err(Status::invalid_argument(
                "a draft model's load must say how many token ids it shares with the served \
                 model (draft_vocabulary): run the same strata version on both",
            ));
        }
        let total = load_bytes(header);
        let received = self.receive(header, connection).await?;
        let held = self.stage.stats.draft().as_ref() == Some(&header.model_digest);
        let weight_bytes = if header.prefetch || held {
            0
        } else {
            self.install_draft(header).await?
        };
        info!(
            weight_bytes,
            received_bytes = received,
            ms = started.elapsed().as_millis() as u64,
            "{}",
            if header.prefetch {
                "draft model prefetched"
            } else if held {
                "draft model already held"
            } else {
                "draft model loaded"
            }
        );
        Ok(load_response(weight_bytes, received, total, started))
    }

    /// Loads the draft model the header names from the cache, whole, on the CPU (where
    /// the coordinator runs one too: a draft model is small), and gives it to the stage.
    async fn install_draft(&self, header: &LoadHeader) -> Result<u64, Status> {
        let root = self.cache.model_root(header).map_err(cache_status)?;
        let shared_vocabulary = header.draft_vocabulary as usize;
        let model = tokio::task::spawn_blocking(move || -> strata_model::Result<DraftModel> {
            let file = ModelFile::open(&root)?;
            let whole = Slice::full(file.config().num_layers);
            let stage = Stage::load(&file, whole, &Device::Cpu)?;
            Ok(DraftModel::new(stage, shared_vocabulary))
        })
        .await
        .map_err(status)?
        .map_err(|e| Status::invalid_argument(format!("loading the draft model: {e}")))?;
        let weight_bytes = model.weight_bytes();
        let digest = header.model_digest.clone();
        self.stage
            .call(|r| Command::InstallDraft(model, digest, r))
            .await;
        Ok(weight_bytes)
    }

    /// Checks a load's header against this worker: version, budget.
    fn admit_load(&self, header: &LoadHeader) -> Result<(), Status> {
        if header.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "coordinator speaks protocol {}, this worker {PROTOCOL_VERSION}: run the same strata version on both",
                header.protocol_version
            )));
        }
        if header.reserved_bytes > self.memory_budget {
            return Err(Status::resource_exhausted(format!(
                "{} needs {} bytes but worker {} accepts {} (--memory)",
                if header.draft {
                    "the draft model"
                } else {
                    "this slice"
                },
                header.reserved_bytes,
                self.info.id,
                self.memory_budget
            )));
        }
        Ok(())
    }

    /// Receives what the cache lacks of the slice, piece by piece into the cache's files;
    /// returns the bytes received.
    ///
    /// A writer thread takes each piece into the cache while the next one arrives and is
    /// decrypted: writing into the page cache costs as much as the stream itself (on a VM
    /// whose freed memory goes back to the host, several times more), so doing the two
    /// in turn would add their times. Its buffers come back for the next pieces.
    async fn receive(
        &self,
        header: &LoadHeader,
        connection: &mut SliceConnection,
    ) -> Result<u64, Status> {
        let receiving = self.cache.receive(header).map_err(cache_status)?;
        let what = if header.draft {
            "the draft model".to_string()
        } else {
            format!("layers {}..{}", header.layer_start, header.layer_end)
        };
        let mut progress = Progress::bytes(format!("receiving {what}"), receiving.expected());
        let (full, mut to_write) = tokio::sync::mpsc::channel::<(u32, u64, Vec<u8>)>(WRITE_QUEUE);
        let (empty, mut written) = tokio::sync::mpsc::channel::<Vec<u8>>(WRITE_QUEUE + 2);
        let writer = tokio::task::spawn_blocking(move || {
            let mut receiving = receiving;
            while let Some((file, offset, piece)) = to_write.blocking_recv() {
                receiving.write(file, offset, &piece)?;
                // The receiver may have stopped (an error): then the buffer is dropped.
                let _ = empty.try_send(piece);
            }
            Ok::<_, CacheError>(receiving)
        });
        let mut received = 0u64;
        let streamed: Result<(), Status> = async {
            while let Some(head) = within("piece", read_piece_head(connection)).await? {
                let mut piece = written.try_recv().unwrap_or_default();
                piece.resize(head.length as usize, 0);
                within("piece", connection.read_exact(&mut piece)).await?;
                if full.send((head.file, head.offset, piece)).await.is_err() {
                    // The writer stopped on an error, which joining it gives.
                    break;
                }
                let n = u64::from(head.length);
                received += n;
                self.stage
                    .stats
                    .bytes_received
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                progress.advance(n);
            }
            Ok(())
        }
        .await;
        drop(full);
        let receiving = writer.await.map_err(status)?.map_err(cache_status)?;
        streamed?;
        let durable = receiving.finish().map_err(|e| match e {
            CacheError::Invalid(m) => Status::data_loss(m),
            io => Status::internal(io.to_string()),
        })?;
        // Syncing hundreds of megabytes to disk is for the next start, not this load.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = durable.persist() {
                warn!(cause = %e, "could not record a received slice in the cache; a later load sends it again");
            }
        });
        progress.finish("received");
        Ok(received)
    }

    /// Loads the slice the header names from the cache and installs it.
    async fn install(&self, header: &LoadHeader) -> Result<u64, Status> {
        let layers = format!("layers {}..{}", header.layer_start, header.layer_end);
        let loading = Progress::spinner(format!("loading {layers} into memory"));
        let root = self.cache.model_root(header).map_err(cache_status)?;
        let slice = Slice {
            layers: header.layer_start as usize..header.layer_end as usize,
            embed: header.embed,
            head: header.head,
        };
        let device = self.device.clone();
        let stage = tokio::task::spawn_blocking(move || -> strata_model::Result<Stage> {
            let file = ModelFile::open(&root)?;
            Stage::load(&file, slice, &device)
        })
        .await
        .map_err(status)?
        .map_err(|e| {
            self.stage.stats.set_state(StageState::Idle);
            Status::invalid_argument(format!("loading the slice: {e}"))
        })?;
        loading.finish("loaded");
        let weight_bytes = stage.weight_bytes();
        let digest = header.model_digest.clone();
        self.stage
            .call(|r| Command::Install(Box::new(stage), digest, r))
            .await;
        Ok(weight_bytes)
    }
}
