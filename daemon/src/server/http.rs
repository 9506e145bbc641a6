//! HTTP endpoint: Prometheus text on `/metrics`, liveness on `/healthz`, readiness on `/readyz`.

use crate::node::Node;
use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use std::sync::Arc;

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.render_metrics())
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when everything configured works; else 503 with what is off and why (the daemon keeps
/// serving what still works: liveness stays ok, a restart would only empty the host tier).
async fn readyz(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let problems = node.problems();
    match problems.is_empty() {
        true => (axum::http::StatusCode::OK, "ready\n".to_string()),
        false => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join("; "))),
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(node: Arc<Node>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(node);
    axum::serve(listener, app).await
}
