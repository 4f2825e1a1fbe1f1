//! The observability endpoint, on a port of its own: `/metrics` (Prometheus text format),
//! `/healthz` (the process is up) and `/readyz` (recovery is done, requests are served and the
//! storage accepts changes).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;

#[derive(Clone)]
struct Endpoint {
    shared: Arc<Broker>,
    handle: Option<PrometheusHandle>,
    queue_labels_max: usize,
}

/// Serves the endpoint on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Broker>,
    queue_labels_max: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let endpoint = Endpoint {
        shared,
        handle: crate::metrics::install(),
        queue_labels_max,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(endpoint);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    match &endpoint.handle {
        Some(handle) => {
            // Rendering locks every queue briefly; keep it off the async workers.
            let shared = endpoint.shared.clone();
            let handle = handle.clone();
            let limit = endpoint.queue_labels_max;
            match tokio::task::spawn_blocking(move || {
                crate::broker::metrics_sample::render(&handle, &shared, limit)
            })
            .await
            {
                Ok(text) => (
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                ),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    "metrics rendering failed\n".to_string(),
                ),
            }
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "another metrics recorder is installed in this process\n".to_string(),
        ),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready once recovery is done, and while the storage accepts changes: not ready (with the
/// reason) while the log cannot write (disk full: changes are refused with 6000) or after it
/// stopped.
async fn readyz(State(endpoint): State<Endpoint>) -> (StatusCode, String) {
    if !endpoint.shared.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_string());
    }
    match endpoint.shared.storage.refusal() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: storage: {}\n", error.0),
        ),
    }
}
