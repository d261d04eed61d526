//! `strata chat` as a person uses it, with the conversation typed on stdin: answers stream
//! out, `/stats` reports, `/reset` forgets, against a model run locally and a cluster.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

mod common;

use std::io::Write;
use std::process::Stdio;

use common::cluster::*;
use common::strata;

/// Runs `strata chat <args>` with `input` typed in; returns stdout.
fn chat(args: &[&str], input: &str) -> String {
    let mut child = strata()
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "strata chat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn check_session(out: &str, first_answer: &str) {
    // The first answer is exactly what `strata generate --chat` gives for that message.
    assert!(
        out.starts_with(&format!("{first_answer}\n")),
        "first answer {first_answer:?} not at the start of:\n{out}"
    );
    let stats: Vec<&str> = out.lines().filter(|l| l.starts_with("session:")).collect();
    assert_eq!(stats.len(), 2, "{out}");
    // Two turns, each a question and an answer, then forgotten.
    assert!(
        stats[0].contains("2 answers") && stats[0].contains("holds 4 messages"),
        "{out}"
    );
    assert!(stats[1].contains("holds 0 messages"), "{out}");
    assert!(out.contains("(conversation reset)"));
    assert!(out
        .lines()
        .any(|l| l.starts_with("last answer:") && l.contains("prompt tokens")));
    assert!(out.contains("unknown command /nope"));
}

const INPUT: &str = "Hello there\nAnd then?\n/stats\n/nope\n/reset\n/stats\n/quit\nnever read\n";

#[test]
fn chat_locally_and_through_a_cluster() {
    let (_dir, model) = small_gguf("q8_0");
    let expected = local_generate(
        &model,
        &["--prompt", "Hello there", "--chat", "--max-tokens", "6"],
    );
    let expected = expected["text"].as_str().unwrap();

    let out = chat(
        &["--model", model.to_str().unwrap(), "--max-tokens", "6"],
        INPUT,
    );
    check_session(&out, expected);

    let cluster = TestCluster::start(&model, &exact_wire());
    cluster.wait_serving(3);
    let out = chat(&["--coordinator", &cluster.api, "--max-tokens", "6"], INPUT);
    check_session(&out, expected);
}
