//! Forwarding to the leader: on a cluster node that does not lead, an HTTP API request is sent on
//! to the leader's HTTP API unchanged (method, path, query, headers — `Host` included, which the
//! signature covers — and body) and its answer returned as it came. The official CMQ SDKs know
//! one endpoint; any node can be it.
//!
//! Elections: the official SDKs do not retry, so a follower rides out an election for its
//! caller. A request that arrives while no leader is known waits for one (at most
//! [`LEADER_WAIT`]; if this node is elected, it serves the request itself), and a leader that
//! refuses the connection (it is gone: nothing was sent) is replaced by the next one known
//! within the same bound. Only a request that may have reached the leader is never sent
//! twice: if the leader fails after the request went out, the answer is 6000 (not 6100,
//! which promises that nothing changed) saying the request may or may not have been carried
//! out.
//!
//! Bounds: the body as the API's own ([`REQUEST_BODY_BYTES_MAX`]), the answer likewise, the
//! whole exchange [`FORWARD_TIMEOUT`] (above the longest long poll), the wait for a leader
//! [`LEADER_WAIT`].

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderName, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::StatusCode;

use crate::broker::cluster::Redirect;
use crate::error::ErrorCode;

use super::{reply, REQUEST_BODY_BYTES_MAX};

/// How long a forwarded request may take in all (a long poll waits up to 30 s).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(40);

/// How long a request waits for a leader to be known (an election takes one or two election
/// timeouts, 1-2 s each by default) before the answer is 6100.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);

/// How often the wait looks at the node's view of the leader.
const LEADER_POLL: Duration = Duration::from_millis(20);

/// Waits (at most [`LEADER_WAIT`] from `since`) until `view` names a leader other than
/// `not` with an HTTP address, or says this node leads (`None`). At the deadline: the last
/// view seen.
pub async fn leader_known(
    view: impl Fn() -> Option<Redirect>,
    not: Option<&str>,
    since: tokio::time::Instant,
) -> Option<Redirect> {
    let deadline = since + LEADER_WAIT;
    loop {
        let redirect = view()?;
        let usable = redirect
            .leader_http
            .as_deref()
            .is_some_and(|leader| Some(leader) != not);
        if usable || tokio::time::Instant::now() >= deadline {
            return Some(redirect);
        }
        tokio::time::sleep(LEADER_POLL).await;
    }
}

/// How long connecting to the leader may take: a leader that does not accept within it is
/// treated as gone (the answer is 6100 and the SDK's retry finds the new one).
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest answer taken back from the leader.
const ANSWER_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Headers that describe one connection, not the request: not forwarded.
fn hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == CONTENT_LENGTH
        || name.as_str().eq_ignore_ascii_case("keep-alive")
        || name.as_str().eq_ignore_ascii_case("proxy-connection")
        || name.as_str().eq_ignore_ascii_case("upgrade")
}

/// A client for forwarding, built once per API.
pub fn client() -> Option<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // Peers are reached directly: a proxy named in the environment (HTTP_PROXY) is for the
        // node's own outbound traffic, never for the cluster's.
        .no_proxy()
        .connect_timeout(FORWARD_CONNECT_TIMEOUT)
        .timeout(FORWARD_TIMEOUT)
        .pool_max_idle_per_host(64)
        .build()
        .ok()
}

/// What became of a request on its way to the leader.
#[derive(Debug)]
pub enum Forwarded {
    /// The answer to return (the leader's, or this node's error).
    Answer(StatusCode, Bytes),
    /// This node was elected while the request waited for a leader: the caller serves it.
    Here(Box<hyper::http::request::Parts>, Bytes),
}

/// Sends `request` to the leader `redirect` names, or to the next one `view` names if that
/// one is gone before the request reached it (module docs); the answer (status, body).
pub async fn forward(
    client: &reqwest::Client,
    mut redirect: Redirect,
    view: impl Fn() -> Option<Redirect>,
    request: hyper::Request<Incoming>,
    request_id: &str,
) -> Forwarded {
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(
        super::BODY_READ_TIMEOUT,
        http_body_util::Limited::new(body, REQUEST_BODY_BYTES_MAX).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => {
            return error(
                ErrorCode::MALFORMED_REQUEST,
                request_id,
                "the request body could not be read",
            )
        }
    };
    let target = parts
        .uri
        .path_and_query()
        .map_or(super::PATH, |p| p.as_str());
    let method = match reqwest::Method::from_bytes(parts.method.as_str().as_bytes()) {
        Ok(method) => method,
        Err(_) => {
            return error(
                ErrorCode::MALFORMED_REQUEST,
                request_id,
                "the method cannot be forwarded",
            )
        }
    };
    let since = tokio::time::Instant::now();
    let (leader, response) = loop {
        let Some(leader) = redirect.leader_http.clone() else {
            return not_leader(
                &redirect,
                request_id,
                "no leader is known now; retry shortly",
            );
        };
        let mut builder = client
            .request(method.clone(), format!("http://{leader}{target}"))
            .body(body.clone());
        for (name, value) in &parts.headers {
            if !hop_by_hop(name) {
                builder = builder.header(name.as_str(), value.as_bytes());
            }
        }
        match builder.send().await {
            Ok(response) => break (leader, response),
            // Refused or unreachable: the request never reached it, so it can go to the next
            // leader without being carried out twice.
            Err(e) if e.is_connect() => {
                tracing::debug!(%leader, error = %e, "the leader refused the forwarded request; waiting for the next");
                match leader_known(&view, Some(&leader), since).await {
                    Some(next) if next.leader_http.as_deref() != Some(leader.as_str()) => {
                        redirect = next;
                    }
                    Some(next) => {
                        return not_leader(
                            &next,
                            request_id,
                            &format!("the leader ({leader}) did not answer; retry shortly"),
                        )
                    }
                    None => return Forwarded::Here(Box::new(parts), body),
                }
            }
            Err(e) => {
                tracing::debug!(%leader, error = %e, "forwarding to the leader failed");
                return error(
                    ErrorCode::INTERNAL,
                    request_id,
                    &format!("the leader ({leader}) did not answer; the request may or may not have been carried out"),
                );
            }
        }
    };
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::OK);
    if response
        .content_length()
        .is_some_and(|len| len > ANSWER_BYTES_MAX as u64)
    {
        return error(
            ErrorCode::INTERNAL,
            request_id,
            "the leader's answer is too large",
        );
    }
    match response.bytes().await {
        Ok(bytes) if bytes.len() <= ANSWER_BYTES_MAX => Forwarded::Answer(status, bytes),
        _ => error(
            ErrorCode::INTERNAL,
            request_id,
            &format!("the leader ({leader}) did not finish its answer; the request may or may not have been carried out"),
        ),
    }
}

fn not_leader(redirect: &Redirect, request_id: &str, why: &str) -> Forwarded {
    error(
        ErrorCode::NOT_LEADER,
        request_id,
        &format!(
            "this node does not lead the cluster (term {}): {why}",
            redirect.epoch
        ),
    )
}

fn error(code: ErrorCode, request_id: &str, message: &str) -> Forwarded {
    let body = reply::document(
        code.code,
        &reply::error_message(code, message),
        request_id,
        &serde_json::Map::new(),
    );
    Forwarded::Answer(StatusCode::OK, body)
}
