//! The public gRPC API (`strata.v1.Inference`, `strata.v1.Cluster`), the standard health
//! service and server reflection (so `grpcurl` works without the .proto files). Errors
//! become `tonic::Status` here, once, with a message a user can act on. An optional
//! bearer key guards everything but `Cluster/Join`, which the join token guards; cluster
//! changes (drain, remove) need the operator's signature besides, key or not.

use std::sync::Arc;

use strata_model::Message;
use strata_net::api_tls::{self, ApiConnectInfo};
use strata_proto::v1::cluster_server::{Cluster, ClusterServer};
use strata_proto::v1::inference_server::{Inference, InferenceServer};
use strata_proto::v1::{
    ChatRequest, DrainRequest, DrainResponse, GenerateRequest, GenerateResponse,
    JoinChallengeRequest, JoinChallengeResponse, JoinRequest, JoinResponse, LinkStatus,
    ListModelsRequest, ListModelsResponse, ListWorkersRequest, ListWorkersResponse, ModelInfo,
    PlanRequest, PlanResponse, PlanStage, RemoveRequest, RemoveResponse, Sampling, StatusRequest,
    StatusResponse, TokenizeRequest, TokenizeResponse, WorkerInfo, WorkerState as ProtoWorkerState,
    WorkerStatus,
};
use strata_proto::v1::{FinishReason as ProtoFinish, SampledLogprob, TokenLogprob, Usage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::error::{Error, Result};
use crate::planner::{self, Candidate, Plan, Shortfall};
use crate::registry::{Registry, Worker, WorkerState};
use crate::sequence::{Delta, FinishReason, SequenceRequest};
use crate::session;
use crate::{links, membership, profile, reconcile, DraftSource, Shared};

/// The public API's handlers.
#[derive(Clone)]
pub struct Api {
    shared: Arc<Shared>,
}

impl Api {
    fn check_key<T>(&self, req: &Request<T>) -> std::result::Result<(), Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if !self.shared.authorized(header) {
            return Err(Status::unauthenticated(
                "this cluster needs an API key: send `authorization: Bearer <key>`",
            ));
        }
        Ok(())
    }

    /// Lets a cluster change through only with the operator's signature of it; a refusal
    /// is logged here, with who asked, and told to the caller.
    fn check_change<T>(
        &self,
        req: &Request<T>,
        action: &str,
        target: &str,
    ) -> std::result::Result<(), Status> {
        let header = req
            .metadata()
            .get(strata_net::operator::HEADER)
            .and_then(|v| v.to_str().ok());
        let call = strata_net::operator::Call { action, target };
        self.shared.check_change(&call, header).map_err(|refusal| {
            let from = req
                .extensions()
                .get::<ApiConnectInfo>()
                .and_then(|c| c.remote)
                .map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
            warn!(%from, action, target, "refused a cluster change: {refusal}");
            match refusal {
                crate::operator::Refusal::Unsigned => Status::unauthenticated(refusal.to_string()),
                _ => Status::permission_denied(refusal.to_string()),
            }
        })
    }

    fn model_info(&self) -> ModelInfo {
        model_info(&self.shared)
    }

    fn start(
        &self,
        prompt: Vec<u32>,
        max_tokens: u32,
        sampling: Option<Sampling>,
        stop: Vec<String>,
        ignore_eos: bool,
    ) -> std::result::Result<TokenStream, Status> {
        let logprobs = sampling.as_ref().is_some_and(|s| s.logprobs);
        let seed = sampling.as_ref().and_then(|s| s.seed);
        let mut sampling = strata_net::frame::sampling_params(sampling.as_ref());
        sampling.seed = seed.unwrap_or_else(session::fresh_seed);
        // The gRPC API answers from the cluster only.
        self.shared
            .metrics()
            .route("local", crate::routing::Reason::Model);
        let answer = session::start(
            &self.shared,
            SequenceRequest {
                prompt,
                max_tokens: max_tokens as usize,
                sampling,
                stop,
                ignore_eos,
                logprobs,
            },
        )?;
        // Deltas become GenerateResponses here, at the edge; a client that leaves drops
        // the stream, which ends the relay and so cancels the sequence.
        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
        let (id, seed) = (answer.id, answer.seed);
        let mut deltas = answer.deltas;
        let shared = self.shared.clone();
        tokio::spawn(async move {
            while let Some(d) = deltas.recv().await {
                let msg = d
                    .map(|d| {
                        let mut r = response(&id, seed, d);
                        if let Some(u) = r.usage.as_mut().filter(|u| u.energy_joules.is_none()) {
                            u.energy_note = energy_note(&shared);
                        }
                        r
                    })
                    .map_err(Status::from);
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    fn check_model(&self, model: &str) -> std::result::Result<(), Status> {
        if !model.is_empty() && model != self.shared.model().name {
            return Err(Status::not_found(format!(
                "this cluster serves `{}`, not `{model}`",
                self.shared.model().name
            )));
        }
        Ok(())
    }
}

/// Why an answer's energy is not known: the workers of the plan in force that have no
/// energy counter, and what each said.
pub(crate) fn energy_note(shared: &Shared) -> String {
    let registry = shared.registry();
    let planned: Vec<String> = shared
        .serving()
        .pipeline()
        .map(|p| p.plan.stages.iter().map(|s| s.worker.clone()).collect())
        .unwrap_or_default();
    let missing: Vec<String> = planned
        .iter()
        .filter_map(|id| {
            let meter = &registry.workers.get(id)?.profile.energy_meter;
            let why = meter.strip_prefix(NO_ENERGY_METER)?;
            Some(format!("{id}{why}"))
        })
        .collect();
    if missing.is_empty() {
        "not available: a stage did not report its energy".into()
    } else {
        format!("not available on {}", missing.join("; "))
    }
}

/// What a worker's meter description starts with when it has no counter
/// (`WorkerInfo.energy_meter`, written by the worker's `energy` module).
const NO_ENERGY_METER: &str = "not available";

/// Streamed responses waiting for a slow client.
const RELAY_QUEUE: usize = 16;

/// One delta as the gRPC API sends it.
fn response(id: &str, seed: u64, d: Delta) -> GenerateResponse {
    let (finish_reason, usage) = match d.finish {
        Some((reason, u)) => (
            match reason {
                FinishReason::Stop => ProtoFinish::Stop,
                FinishReason::Length => ProtoFinish::Length,
                FinishReason::ContextFull => ProtoFinish::Context,
            } as i32,
            Some(Usage {
                prompt_tokens: u.prompt_tokens as u32,
                completion_tokens: u.completion_tokens as u32,
                time_to_first_token_ms: u.time_to_first_token_ms,
                decode_tokens_per_second: u.decode_tokens_per_second,
                seed,
                draft_tokens: u.draft_tokens as u32,
                accepted_draft_tokens: u.accepted_draft_tokens as u32,
                passes: u.passes as u32,
                energy_joules: u.energy_joules,
                energy_note: String::new(),
            }),
        ),
        None => (0, None),
    };
    let logprob = |&(token_id, logprob): &(u32, f32)| TokenLogprob { token_id, logprob };
    GenerateResponse {
        text: d.text,
        token_ids: vec![d.token],
        request_id: id.to_string(),
        logprobs: d
            .logprob
            .iter()
            .map(|l| SampledLogprob {
                token: Some(logprob(&l.token)),
                top: l.top.iter().map(logprob).collect(),
            })
            .collect(),
        finish_reason,
        usage,
    }
}

/// The served model, as the APIs describe it.
pub fn model_info(shared: &Shared) -> ModelInfo {
    let m = shared.model();
    let c = m.file.config();
    ModelInfo {
        id: m.name.clone(),
        architecture: c.arch.name().to_string(),
        layers: c.num_layers as u32,
        context_length: c.max_position_embeddings as u32,
        weight_bytes: m.profile.weight_bytes(),
        ready: shared.serving().is_serving(),
        drafts: m
            .draft
            .as_ref()
            .map(DraftSource::describe)
            .unwrap_or_default(),
    }
}

/// The workers as the API lists them: admitted ones, then nodes seen over mDNS that
/// never joined, then recent refusals.
pub(crate) fn worker_rows(r: &Registry) -> Vec<WorkerStatus> {
    let mut out: Vec<WorkerStatus> = r.workers.values().map(worker_row).collect();
    for s in r.strangers() {
        let parse = |k: &str| s.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.push(WorkerStatus {
            info: Some(WorkerInfo {
                id: s.get("id").unwrap_or(&s.instance).to_string(),
                device: s.get("device").unwrap_or("").to_string(),
                memory_budget: parse("mem"),
                speed_bytes_per_second: parse("speed") as f64,
                data_port: parse("data") as u32,
                control_port: parse("control") as u32,
                version: s.get("v").unwrap_or("").to_string(),
                key_fingerprint: s.get("fpr").unwrap_or("").to_string(),
                addresses: s.addresses.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            }),
            state: ProtoWorkerState::Discovered as i32,
            address: s
                .addresses
                .first()
                .map(|a| format!("{a}:{}", parse("control")))
                .unwrap_or_default(),
            stage: -1,
            detail: "seen over mDNS, not joined (does it have this cluster's token?)".into(),
            ..Default::default()
        });
    }
    for refusal in &r.refusals {
        if r.workers.contains_key(&refusal.id) {
            continue;
        }
        out.push(WorkerStatus {
            info: Some(WorkerInfo {
                id: refusal.id.clone(),
                ..Default::default()
            }),
            state: ProtoWorkerState::Refused as i32,
            address: refusal.from.clone(),
            stage: -1,
            detail: refusal.reason.clone(),
            ..Default::default()
        });
    }
    out
}

fn worker_row(w: &Worker) -> WorkerStatus {
    let p = &w.profile;
    let h = &w.health;
    WorkerStatus {
        info: Some(WorkerInfo {
            id: p.id.clone(),
            hostname: p.hostname.clone(),
            device: p.device.clone(),
            memory_budget: p.memory_budget,
            speed_bytes_per_second: p.speed,
            data_port: u32::from(w.data_addr.port()),
            control_port: u32::from(w.control_addr.port()),
            version: p.version.clone(),
            protocol_version: strata_proto::PROTOCOL_VERSION,
            energy_meter: p.energy_meter.clone(),
            key_fingerprint: p.key_fingerprint.clone(),
            addresses: p.addresses.clone(),
        }),
        state: w.state.to_proto() as i32,
        address: w.control_addr.to_string(),
        stage: w.stage.map_or(-1, |s| s as i32),
        layer_start: w.held.as_ref().map_or(0, |h| h.layers.start as u32),
        layer_end: w.held.as_ref().map_or(0, |h| h.layers.end as u32),
        load_bytes_done: w.load_done.load(std::sync::atomic::Ordering::Relaxed),
        load_bytes_total: w.load_total,
        resident_bytes: h.resident,
        peak_resident_bytes: h.peak,
        last_seen_ms: w.last_seen.elapsed().as_millis() as u64,
        detail: if w.state == WorkerState::Drained && w.detail.is_empty() {
            "drained: released from the plan (`strata cluster remove` forgets it)".into()
        } else {
            w.detail.clone()
        },
        sequences: h.sequences,
        compute_seconds: h.compute_seconds,
        network_seconds: h.network_seconds,
        forwards: h.forwards,
        bytes_received: h.bytes_received,
        // What a dead worker last said it held is gone with it.
        holds_draft_model: h.holds_draft && !w.state.is_dead(),
    }
}

/// The cluster's status: model, workers, the plan in force.
pub fn status(shared: &Shared) -> StatusResponse {
    let serving = shared.serving();
    let mut plan = serving
        .pipeline()
        .map(|p| plan_response(&shared.model().name, Ok(p.plan.clone()), p.epoch));
    if let (Some(response), Some(pipeline)) = (&mut plan, serving.pipeline()) {
        with_measurements(shared, response, &pipeline.plan);
    }
    let links = link_rows(shared);
    let workers = worker_rows(&shared.registry());
    StatusResponse {
        model: Some(model_info(shared)),
        workers,
        plan,
        serving: serving.is_serving(),
        active_sequences: shared.sessions().active() as u32,
        cluster_id: shared.ca().token().cluster_id().to_string(),
        detail: serving.detail(),
        links,
    }
}

/// Beside each stage's estimate, what its worker's decode steps measured (when it holds
/// the stage's slice); once every stage was measured, the plan's time per token for one
/// stream as the measured stages make it.
fn with_measurements(shared: &Shared, response: &mut PlanResponse, plan: &Plan) {
    {
        let registry = shared.registry();
        for (stage, planned) in response.stages.iter_mut().zip(&plan.stages) {
            let measured = registry.workers.get(&planned.worker).and_then(|w| {
                let holds = w.held.as_ref().is_some_and(|h| {
                    h.layers == planned.layers && h.embed == planned.embed && h.head == planned.head
                });
                w.measured_ms.filter(|_| holds)
            });
            if let Some(ms) = measured {
                stage.measured_ms_per_token = ms;
            }
        }
    }
    if response
        .stages
        .iter()
        .all(|s| s.measured_ms_per_token > 0.0)
    {
        let measured: Vec<f64> = response
            .stages
            .iter()
            .map(|s| s.measured_ms_per_token)
            .collect();
        response.calibrated_ms_per_token = planner::one_stream_ms(
            &shared.model().profile,
            plan,
            &measured,
            &links::plan_options(shared),
        );
    }
}

/// The measured links, for the status.
fn link_rows(shared: &Shared) -> Vec<LinkStatus> {
    let now = std::time::Instant::now();
    shared
        .registry()
        .links
        .iter()
        .map(|(a, b, m)| LinkStatus {
            a: a.to_string(),
            b: b.to_string(),
            latency_ms: m.link.latency_ms,
            bandwidth_bytes_per_second: m.link.bandwidth,
            age_seconds: now.saturating_duration_since(m.at).as_secs_f64(),
        })
        .collect()
}

type TokenStream = ReceiverStream<std::result::Result<GenerateResponse, Status>>;

#[tonic::async_trait]
impl Inference for Api {
    type GenerateStream = TokenStream;
    type ChatStream = TokenStream;

    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> std::result::Result<Response<TokenStream>, Status> {
        self.check_key(&req)?;
        let r = req.into_inner();
        self.check_model(&r.model)?;
        let prompt = if !r.prompt_ids.is_empty() {
            let vocab = self.shared.model().file.config().vocab_size as u32;
            if let Some(bad) = r.prompt_ids.iter().find(|&&t| t >= vocab) {
                return Err(Status::invalid_argument(format!(
                    "prompt id {bad} is outside the vocabulary of {vocab} tokens"
                )));
            }
            r.prompt_ids
        } else {
            self.shared
                .model()
                .tokenizer
                .encode(&r.prompt, !r.no_special_tokens)
                .map_err(|e| Status::invalid_argument(e.to_string()))?
        };
        Ok(Response::new(self.start(
            prompt,
            r.max_tokens,
            r.sampling,
            r.stop,
            r.ignore_eos,
        )?))
    }

    async fn chat(
        &self,
        req: Request<ChatRequest>,
    ) -> std::result::Result<Response<TokenStream>, Status> {
        self.check_key(&req)?;
        let r = req.into_inner();
        self.check_model(&r.model)?;
        let messages: Vec<Message> = r
            .messages
            .iter()
            .map(|m| Message::new(m.role.clone(), m.content.clone()))
            .collect();
        let prompt = session::chat_prompt(&self.shared, &messages)?;
        Ok(Response::new(self.start(
            prompt,
            r.max_tokens,
            r.sampling,
            r.stop,
            r.ignore_eos,
        )?))
    }

    async fn tokenize(
        &self,
        req: Request<TokenizeRequest>,
    ) -> std::result::Result<Response<TokenizeResponse>, Status> {
        self.check_key(&req)?;
        let r = req.into_inner();
        let t = &self.shared.model().tokenizer;
        let ids = t
            .encode(&r.text, r.add_bos)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let tokens = ids
            .iter()
            .map(|&i| t.id_to_token(i).unwrap_or_default())
            .collect();
        Ok(Response::new(TokenizeResponse {
            token_ids: ids,
            tokens,
        }))
    }

    async fn list_models(
        &self,
        req: Request<ListModelsRequest>,
    ) -> std::result::Result<Response<ListModelsResponse>, Status> {
        self.check_key(&req)?;
        Ok(Response::new(ListModelsResponse {
            models: vec![self.model_info()],
        }))
    }
}

/// A plan as the API returns it.
pub fn plan_response(
    model: &str,
    r: std::result::Result<Plan, Shortfall>,
    epoch: u64,
) -> PlanResponse {
    match r {
        Ok(p) => PlanResponse {
            stages: p
                .stages
                .iter()
                .map(|s| PlanStage {
                    worker_id: s.worker.clone(),
                    layer_start: s.layers.start as u32,
                    layer_end: s.layers.end as u32,
                    embed: s.embed,
                    head: s.head,
                    memory_bytes: s.memory,
                    budget_bytes: s.budget,
                    est_ms_per_token: s.est_ms,
                    measured_ms_per_token: 0.0,
                })
                .collect(),
            est_ms_per_token: p.est_ms_per_token,
            est_ms_per_token_pipelined: p.est_ms_pipelined,
            shortfall: p.notes.join("; "),
            missing_bytes: 0,
            model: model.to_string(),
            epoch,
            calibrated_ms_per_token: 0.0,
        },
        Err(s) => PlanResponse {
            shortfall: s.detail,
            missing_bytes: s.missing,
            model: model.to_string(),
            epoch,
            ..Default::default()
        },
    }
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> std::result::Result<Response<StatusResponse>, Status> {
        self.check_key(&req)?;
        Ok(Response::new(status(&self.shared)))
    }

    async fn plan(
        &self,
        req: Request<PlanRequest>,
    ) -> std::result::Result<Response<PlanResponse>, Status> {
        self.check_key(&req)?;
        let r = req.into_inner();
        let profile = if r.model_spec.is_empty() {
            self.shared.model().profile.clone()
        } else {
            profile::of_spec(&r.model_spec)?
        };
        let result = if r.workers.is_empty() {
            if r.model_spec.is_empty() {
                // The plan it would make now, with what the workers measured beside it.
                let now = reconcile::plan_now(&self.shared);
                let mut response = plan_response(&profile.name, now.clone(), 0);
                if let Ok(plan) = &now {
                    with_measurements(&self.shared, &mut response, plan);
                }
                return Ok(Response::new(response));
            } else {
                let live = reconcile::candidates(&self.shared);
                planner::plan(&profile, &live, &links::plan_options(&self.shared))
            }
        } else {
            let paper: Vec<Candidate> = r
                .workers
                .iter()
                .map(|w| Candidate {
                    id: w.id.clone(),
                    budget: w.memory_bytes,
                    speed: w.speed_bytes_per_second,
                    held: None,
                })
                .collect();
            planner::plan(&profile, &paper, &self.shared.config().plan)
        };
        Ok(Response::new(plan_response(&profile.name, result, 0)))
    }

    async fn list_workers(
        &self,
        req: Request<ListWorkersRequest>,
    ) -> std::result::Result<Response<ListWorkersResponse>, Status> {
        self.check_key(&req)?;
        Ok(Response::new(ListWorkersResponse {
            workers: worker_rows(&self.shared.registry()),
        }))
    }

    async fn join(
        &self,
        req: Request<JoinRequest>,
    ) -> std::result::Result<Response<JoinResponse>, Status> {
        let conn = req.extensions().get::<ApiConnectInfo>().copied();
        membership::admit(&self.shared, req.into_inner(), conn).map(Response::new)
    }

    async fn join_challenge(
        &self,
        req: Request<JoinChallengeRequest>,
    ) -> std::result::Result<Response<JoinChallengeResponse>, Status> {
        if !req
            .extensions()
            .get::<ApiConnectInfo>()
            .is_some_and(|c| c.tls)
        {
            return Err(Status::failed_precondition(
                "a join must come over TLS: run the same strata version on the worker",
            ));
        }
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce)
            .map_err(|e| Status::unavailable(format!("no randomness: {e}")))?;
        Ok(Response::new(JoinChallengeResponse {
            challenge: self.shared.issue_challenge(nonce),
        }))
    }

    async fn drain(
        &self,
        req: Request<DrainRequest>,
    ) -> std::result::Result<Response<DrainResponse>, Status> {
        self.check_key(&req)?;
        self.check_change(&req, "drain", &req.get_ref().worker_id)?;
        let detail = membership::drain(&self.shared, &req.into_inner().worker_id)?;
        Ok(Response::new(DrainResponse { detail }))
    }

    async fn remove(
        &self,
        req: Request<RemoveRequest>,
    ) -> std::result::Result<Response<RemoveResponse>, Status> {
        self.check_key(&req)?;
        self.check_change(&req, "remove", &req.get_ref().worker_id)?;
        let detail = membership::remove(&self.shared, &req.into_inner().worker_id).await?;
        Ok(Response::new(RemoveResponse { detail }))
    }
}

/// Calls one gRPC connection may have open at once (HTTP/2 streams).
const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// Serves the public API on `listener` until `shutdown`.
pub async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let tls = shared.identity().api_server_config()?;
    let api = Api { shared };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<InferenceServer<Api>>().await;
    health_reporter.set_serving::<ClusterServer<Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(strata_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Unavailable(format!("reflection: {e}")))?;
    tonic::transport::Server::builder()
        // Each of a client's calls is a stream of its connection: bounded, as the
        // connections are (see `listen`).
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(health)
        .add_service(reflection)
        .add_service(InferenceServer::new(api.clone()))
        .add_service(ClusterServer::new(api))
        .serve_with_incoming_shutdown(
            api_tls::sorted(crate::http::client_connections(listener), tls),
            async move { shutdown.cancelled().await },
        )
        .await?;
    Ok(())
}
