//! Forwarding to the leader: on a cluster node that does not lead, an HTTP API request is sent on
//! to the leader's HTTP API unchanged (method, path, query, headers — `Host` included, which the
//! signature covers — and body) and its answer returned as it came. The official CMQ SDKs know
//! one endpoint; any node can be it.
//!
//! Bounds: the body as the API's own ([`REQUEST_BODY_BYTES_MAX`]), the answer likewise, the
//! whole exchange [`FORWARD_TIMEOUT`] (above the longest long poll). When no leader is known
//! (an election is running) the answer is CMQ code 6100 at once: the SDK's retry finds the new
//! leader.

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

/// Sends `request` to the leader `redirect` names; the answer (status, content type, body).
pub async fn forward(
    client: &reqwest::Client,
    redirect: &Redirect,
    request: hyper::Request<Incoming>,
    request_id: &str,
) -> (StatusCode, Bytes) {
    let Some(leader) = &redirect.leader_http else {
        return not_leader(
            redirect,
            request_id,
            "no leader is known now; retry shortly",
        );
    };
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
    let url = format!("http://{leader}{target}");
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
    let mut builder = client.request(method, &url).body(body);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            builder = builder.header(name.as_str(), value.as_bytes());
        }
    }
    let response = match builder.send().await {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!(%leader, error = %e, "forwarding to the leader failed");
            return not_leader(
                redirect,
                request_id,
                &format!("the leader ({leader}) did not answer; retry shortly"),
            );
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
        Ok(bytes) if bytes.len() <= ANSWER_BYTES_MAX => (status, bytes),
        _ => not_leader(
            redirect,
            request_id,
            &format!("the leader ({leader}) did not finish its answer; the request may or may not have been carried out"),
        ),
    }
}

fn not_leader(redirect: &Redirect, request_id: &str, why: &str) -> (StatusCode, Bytes) {
    error(
        ErrorCode::NOT_LEADER,
        request_id,
        &format!(
            "this node does not lead the cluster (term {}): {why}",
            redirect.epoch
        ),
    )
}

fn error(code: ErrorCode, request_id: &str, message: &str) -> (StatusCode, Bytes) {
    let body = reply::document(
        code.code,
        &reply::error_message(code, message),
        request_id,
        &serde_json::Map::new(),
    );
    (StatusCode::OK, body)
}
