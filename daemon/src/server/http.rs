//! HTTP endpoint: Prometheus text on `/metrics`, liveness on `/healthz`.

use crate::node::Node;
use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use std::sync::Arc;

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.render_metrics())
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(node: Arc<Node>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).with_state(node);
    axum::serve(listener, app).await
}
