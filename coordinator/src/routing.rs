//! Where a request is answered: by the cluster, or by the upstream OpenAI-compatible API
//! that `serve --upstream` names. The decisions only; the HTTP handlers carry them out and
//! [`crate::upstream`] does the proxying.
//!
//! - A request for `upstream/<name>` goes to the upstream as `<name>`.
//! - With overflow on, a request the cluster would refuse goes upstream instead: one that
//!   arrives while the cluster does not serve (it would wait, then get 503), or one refused
//!   with 429/503 before its first token.
//! - A private request (`x-strata-private: 1`, or every request under `--private-only`)
//!   never leaves the LAN: it waits for the cluster or is refused, and asking for an
//!   upstream model is refused with 403.

/// What a model id starts with when it names one of the upstream's models.
pub const UPSTREAM_PREFIX: &str = "upstream/";

/// The request header that keeps a request on the LAN.
pub const PRIVATE_HEADER: &str = "x-strata-private";

/// The routing settings `serve` was started with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingPolicy {
    /// An upstream is configured.
    pub upstream: bool,
    /// Requests the cluster would refuse go to the upstream (`--overflow upstream`).
    pub overflow: bool,
    /// Every request is private (`--private-only`).
    pub private_only: bool,
}

/// Why a request went where it went; the `reason` label of the routing counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It named the model: the cluster's own, or `upstream/<name>`.
    Model,
    /// The cluster would have refused it; it overflowed.
    Overflow,
    /// It would have overflowed, but it is private: it stayed.
    Private,
}

impl Reason {
    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Model => "model",
            Reason::Overflow => "overflow",
            Reason::Private => "private",
        }
    }
}

/// Which of the upstream's models a request goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamModel {
    /// The one the request named (after `upstream/`).
    Named(String),
    /// The overflow model (see [`overflow_model`]).
    Overflow,
}

/// Where a request goes first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The cluster answers it; the reason is what to count if it stays.
    Local(Reason),
    /// The upstream answers it.
    Upstream(UpstreamModel, Reason),
}

/// A request that no route takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It named an upstream model, and no upstream is configured.
    NoUpstream(String),
    /// It named an upstream model, and it is private.
    Private(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoUpstream(model) => write!(
                f,
                "`{UPSTREAM_PREFIX}{model}` names a model of an upstream API, and this cluster has none: start `strata serve` with --upstream URL"
            ),
            Refusal::Private(model) => write!(
                f,
                "this request is private ({PRIVATE_HEADER}, or the server's --private-only), and `{UPSTREAM_PREFIX}{model}` is answered outside the LAN: ask for the cluster's own model"
            ),
        }
    }
}

/// What the request header says: private unless it says plainly that it is not.
pub fn is_private_header(value: Option<&str>) -> bool {
    match value.map(|v| v.trim().to_ascii_lowercase()) {
        None => false,
        Some(v) => !matches!(v.as_str(), "" | "0" | "false" | "no" | "off"),
    }
}

impl RoutingPolicy {
    /// Whether a request with this header value is private.
    pub fn is_private(&self, header: Option<&str>) -> bool {
        self.private_only || is_private_header(header)
    }

    /// Where a request for `model` goes, given whether the cluster serves now.
    pub fn route(
        &self,
        model: Option<&str>,
        private: bool,
        serving: bool,
    ) -> Result<Route, Refusal> {
        if let Some(name) = model.and_then(|m| m.strip_prefix(UPSTREAM_PREFIX)) {
            return match (self.upstream, private) {
                (false, _) => Err(Refusal::NoUpstream(name.to_string())),
                (true, true) => Err(Refusal::Private(name.to_string())),
                (true, false) => Ok(Route::Upstream(
                    UpstreamModel::Named(name.to_string()),
                    Reason::Model,
                )),
            };
        }
        if serving {
            return Ok(Route::Local(Reason::Model));
        }
        Ok(self.when_refused(private))
    }

    /// Where a request goes that the cluster refused (429 or 503) before its first token.
    pub fn when_refused(&self, private: bool) -> Route {
        match (self.upstream && self.overflow, private) {
            (true, false) => Route::Upstream(UpstreamModel::Overflow, Reason::Overflow),
            (true, true) => Route::Local(Reason::Private),
            (false, _) => Route::Local(Reason::Model),
        }
    }
}

/// The upstream model an overflowing request goes to: the one `--overflow-model` names;
/// else one of the cluster's own name; else the upstream's only model. Otherwise the
/// upstream's choice is not ours to guess: the error says what to set.
pub fn overflow_model(
    configured: Option<&str>,
    local: &str,
    listed: &[String],
) -> Result<String, String> {
    if let Some(m) = configured {
        return Ok(m.to_string());
    }
    let bare = |m: &str| m.trim_end_matches(":latest").to_string();
    if let Some(m) = listed.iter().find(|m| bare(m) == bare(local)) {
        return Ok(m.clone());
    }
    match listed {
        [only] => Ok(only.clone()),
        [] => Err("the upstream lists no models: name one with --overflow-model".into()),
        _ => Err(format!(
            "the upstream lists {} models and none is `{local}`: name the one to overflow to with --overflow-model",
            listed.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(upstream: bool, overflow: bool, private_only: bool) -> RoutingPolicy {
        RoutingPolicy {
            upstream,
            overflow,
            private_only,
        }
    }

    #[test]
    fn an_upstream_model_goes_upstream_unless_private_or_unconfigured() {
        let p = policy(true, false, false);
        assert_eq!(
            p.route(Some("upstream/gpt-x"), false, true),
            Ok(Route::Upstream(
                UpstreamModel::Named("gpt-x".into()),
                Reason::Model
            ))
        );
        assert_eq!(
            p.route(Some("upstream/gpt-x"), true, true),
            Err(Refusal::Private("gpt-x".into()))
        );
        assert_eq!(
            policy(false, false, false).route(Some("upstream/gpt-x"), false, true),
            Err(Refusal::NoUpstream("gpt-x".into()))
        );
        // --private-only makes every request private, whatever its header says.
        let strict = policy(true, true, true);
        assert!(strict.is_private(Some("0")));
        let private = strict.is_private(None);
        assert_eq!(
            strict.route(Some("upstream/gpt-x"), private, true),
            Err(Refusal::Private("gpt-x".into()))
        );
    }

    #[test]
    fn what_the_cluster_would_refuse_overflows_unless_private() {
        let p = policy(true, true, false);
        // Serving: the cluster takes it.
        assert_eq!(
            p.route(Some("demo"), false, true),
            Ok(Route::Local(Reason::Model))
        );
        assert_eq!(p.route(None, false, true), Ok(Route::Local(Reason::Model)));
        // Not serving: it would wait and then get 503, so it goes now.
        let overflow = Route::Upstream(UpstreamModel::Overflow, Reason::Overflow);
        assert_eq!(p.route(None, false, false), Ok(overflow.clone()));
        assert_eq!(p.when_refused(false), overflow);
        // Private: it stays, and is counted as kept.
        assert_eq!(
            p.route(None, true, false),
            Ok(Route::Local(Reason::Private))
        );
        assert_eq!(p.when_refused(true), Route::Local(Reason::Private));
        // Without --overflow upstream, or without an upstream, nothing overflows.
        for p in [policy(true, false, false), policy(false, true, false)] {
            assert_eq!(p.route(None, false, false), Ok(Route::Local(Reason::Model)));
            assert_eq!(p.when_refused(false), Route::Local(Reason::Model));
        }
    }

    #[test]
    fn the_header_is_private_unless_it_plainly_says_not() {
        for v in ["1", "true", "yes", "TRUE", " 1 ", "please"] {
            assert!(is_private_header(Some(v)), "{v}");
        }
        for v in ["0", "false", "no", "off", "", "False"] {
            assert!(!is_private_header(Some(v)), "{v}");
        }
        assert!(!is_private_header(None));
    }

    #[test]
    fn the_overflow_model_is_named_matched_or_the_only_one() {
        let listed = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            overflow_model(Some("big"), "demo", &listed(&["a", "b"])),
            Ok("big".into())
        );
        assert_eq!(
            overflow_model(None, "demo", &listed(&["a", "demo:latest"])),
            Ok("demo:latest".into())
        );
        assert_eq!(
            overflow_model(None, "demo", &listed(&["only"])),
            Ok("only".into())
        );
        let e = overflow_model(None, "demo", &listed(&["a", "b"])).unwrap_err();
        assert!(
            e.contains("--overflow-model") && e.contains("2 models"),
            "{e}"
        );
        assert!(overflow_model(None, "demo", &[]).is_err());
    }
}
