//! `strata demo --once`, the README's first command, as a newcomer runs it: a 3-worker
//! cluster on this machine serving the bundled demo model, the plan, the addresses, a curl
//! line, and an answer in English.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

mod common;

use common::strata;

/// Frequent words of the King James Bible: an answer in its English uses many of them.
const KJV_WORDS: &[&str] = &[
    "the", "and", "of", "to", "that", "in", "he", "shall", "unto", "for", "i", "his", "a", "lord",
    "they", "be", "is", "him", "not", "them", "it", "with", "all", "thou", "thy", "was", "god",
    "which", "my", "me", "said", "but", "ye", "their", "have", "will", "thee", "from", "as", "are",
    "when", "this", "out", "were", "upon", "man", "by", "you", "israel", "king", "son", "up",
    "there", "hath", "then", "people", "came", "had", "house", "into", "on", "her", "come", "one",
    "we", "children", "s", "before", "your", "also", "day", "land", "so", "men", "against",
    "shalt", "if", "at", "let", "go", "earth", "heaven",
];

#[test]
fn the_demo_answers_in_english_through_three_workers() {
    let out = strata()
        .args([
            "demo",
            "--once",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for stage in 0..3 {
        assert!(
            stdout.contains(&format!("stage {stage}: worker-")),
            "no stage {stage}:\n{stdout}"
        );
    }
    assert!(stdout.contains("curl http://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("dashboard  http://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("gRPC       127.0.0.1:"), "{stdout}");
    // The answer follows the echoed prompt.
    let answer = stdout
        .split_once("> In the beginning God created the heaven and the earth.\n")
        .map(|(_, rest)| rest.split("\n\n[").next().unwrap_or(""))
        .unwrap_or_else(|| panic!("no answer:\n{stdout}"));
    let words: Vec<String> = answer
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let known = words
        .iter()
        .filter(|w| KJV_WORDS.contains(&w.as_str()))
        .count();
    assert!(words.len() >= 10, "a short answer: {answer:?}");
    // Noise from random weights hits these words rarely; English hits them in about half.
    assert!(
        known * 3 >= words.len(),
        "{known} of {} words are common English: {answer:?}",
        words.len()
    );
    assert!(
        stdout.contains("tokens/s through 3 workers over QUIC"),
        "{stdout}"
    );
    // The bundled draft model drafted, and the answer says how many were kept.
    assert!(stdout.contains("Draft: strata-demo-draft"), "{stdout}");
    assert!(stdout.contains("% of drafts accepted"), "{stdout}");
}
