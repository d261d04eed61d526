//! The public gRPC API as generic clients see it: the standard health service and server
//! reflection (what `grpcurl` uses instead of .proto files), and the optional bearer key.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

mod common;

use std::time::Duration;

use common::cluster::*;
use common::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

fn tiny_model(dir: &std::path::Path) -> std::path::PathBuf {
    let model = dir.join("m.gguf");
    synth(
        &[
            "--arch",
            "qwen2",
            "--layers",
            "2",
            "--hidden",
            "64",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--intermediate",
            "128",
            "--vocab",
            "512",
            "--format",
            "gguf",
            "--quant",
            "q8_0",
        ],
        &model,
    );
    model
}

#[test]
fn health_and_reflection_answer_generic_clients() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let cluster = TestCluster::start(
        &model,
        &ClusterOptions {
            workers: 1,
            ..Default::default()
        },
    );
    cluster.wait_serving(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("http://{}", cluster.api);
        let channel = tonic::transport::Channel::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        for service in ["strata.v1.Inference", "strata.v1.Cluster"] {
            let r = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
        }
        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
            panic!("not a service list: {first:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "strata.v1.Inference",
            "strata.v1.Cluster",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    });
}

#[test]
fn an_api_key_guards_the_public_api_but_not_joining() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let options = ClusterOptions {
        workers: 1,
        serve_args: vec!["--api-key".into(), "s3cret".into()],
        ..Default::default()
    };
    let cluster = TestCluster::start(&model, &options);
    // The worker joined without the key (the join token guards joining).
    let serving = |key: Option<&str>| {
        let mut c = strata();
        c.args(["cluster", "status", "--json", "--coordinator", &cluster.api]);
        if let Some(k) = key {
            c.args(["--api-key", k]);
        }
        c.env_remove("STRATA_API_KEY").output().unwrap()
    };
    let denied = serving(None);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("API key"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = serving(Some("s3cret"));
        assert!(out.status.success());
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if s["serving"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never served: {s:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = strata()
        .args([
            "generate",
            "--coordinator",
            &cluster.api,
            "--api-key",
            "s3cret",
            "--prompt",
            "hi",
            "--max-tokens",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong = strata()
        .args([
            "generate",
            "--coordinator",
            &cluster.api,
            "--api-key",
            "guess",
            "--prompt",
            "hi",
            "--max-tokens",
            "3",
        ])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
}

#[test]
fn chat_tokenize_and_list_models_over_grpc() {
    use strata_proto::v1::inference_client::InferenceClient;
    use strata_proto::v1::{ChatMessage, ChatRequest, ListModelsRequest, TokenizeRequest};
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let cluster = TestCluster::start(
        &model,
        &ClusterOptions {
            workers: 2,
            serve_args: vec!["--wire-dtype".into(), "f32".into()],
            ..Default::default()
        },
    );
    cluster.wait_serving(2);
    let local = local_generate(
        &model,
        &[
            "--prompt",
            "What is a stage?",
            "--chat",
            "--max-tokens",
            "10",
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = InferenceClient::connect(format!("http://{}", cluster.api))
            .await
            .unwrap();
        let models = client
            .list_models(ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models;
        assert_eq!(models.len(), 1);
        assert_eq!(models[0].id, "m.gguf");
        assert_eq!(models[0].layers, 2);
        assert!(models[0].ready);
        let t = client
            .tokenize(TokenizeRequest {
                text: "hello world".into(),
                add_bos: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!t.token_ids.is_empty());
        assert_eq!(t.token_ids.len(), t.tokens.len());
        let mut stream = client
            .chat(ChatRequest {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "What is a stage?".into(),
                }],
                max_tokens: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut ids = Vec::new();
        let mut finished = false;
        while let Some(m) = stream.message().await.unwrap() {
            ids.extend(m.token_ids.iter().map(|&t| u64::from(t)));
            finished |= m.finish_reason != 0 && m.usage.is_some();
        }
        assert!(
            finished,
            "the last message carries the finish reason and usage"
        );
        // F32 on the wire: the split changes nothing.
        assert_eq!(ids, tokens(&local));
        // A prompt longer than the context is refused with a reason, not a hang.
        let long = client
            .chat(ChatRequest {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "word ".repeat(5000),
                }],
                max_tokens: 4,
                ..Default::default()
            })
            .await;
        let err = match long {
            Err(e) => e,
            Ok(r) => r.into_inner().message().await.unwrap_err(),
        };
        assert!(err.message().contains("context"), "{err:?}");
    });
}

/// A chat's reply ends at the model's end-of-turn token, unless the request says
/// `ignore_eos` (benchmarks and speed campaigns need replies of a fixed length): then it
/// goes on, the same tokens first, up to `max_tokens`.
#[test]
fn a_chat_with_ignore_eos_runs_past_the_end_of_the_reply() {
    use strata_proto::v1::inference_client::InferenceClient;
    use strata_proto::v1::{ChatMessage, ChatRequest, FinishReason};
    // The demo model answers this verse in about 40 tokens and ends its turn.
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/demo/strata-demo-q8_0.gguf");
    let cluster = TestCluster::start(
        &model,
        &ClusterOptions {
            workers: 1,
            ..Default::default()
        },
    );
    cluster.wait_serving(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ended, forced) = rt.block_on(async {
        let client = InferenceClient::connect(format!("http://{}", cluster.api))
            .await
            .unwrap();
        let reply = |ignore_eos: bool| {
            let request = ChatRequest {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "The LORD is my shepherd; I shall not want.".into(),
                }],
                max_tokens: 120,
                ignore_eos,
                ..Default::default()
            };
            let mut client = client.clone();
            async move {
                let mut stream = client.chat(request).await.unwrap().into_inner();
                let (mut ids, mut finish) = (Vec::new(), 0);
                while let Some(m) = stream.message().await.unwrap() {
                    ids.extend(m.token_ids);
                    finish = finish.max(m.finish_reason);
                }
                (ids, finish)
            }
        };
        (reply(false).await, reply(true).await)
    });
    assert_eq!(
        ended.1,
        FinishReason::Stop as i32,
        "the reply ends its turn"
    );
    assert!(ended.0.len() < 120, "{} tokens", ended.0.len());
    assert_eq!(forced.1, FinishReason::Length as i32);
    assert_eq!(forced.0.len(), 120);
    assert_eq!(
        &forced.0[..ended.0.len()],
        &ended.0[..],
        "the same reply first"
    );
}
