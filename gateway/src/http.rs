//! `kvtier gateway`'s HTTP face: an OpenAI-compatible reverse proxy. Completions and chat
//! completions go to the engine [`Gateway::decide`] ranks first (the next one when it refuses
//! the connection); responses, SSE streams included, are passed through frame by frame as they
//! arrive. Everything else (`/v1/models`, `/tokenize`, ...) goes to the least-loaded engine.
//! `/health` and `/metrics` are the gateway's own.

use super::decide::{Decision, Gateway, Refusal};
use super::engines::InFlight;
use super::openai::Api;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Largest request body the gateway reads (a prompt of a million tokens fits).
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// Response header naming the engine that served the request.
pub const ENDPOINT_HEADER: &str = "x-kvtier-endpoint";

type Upstream = Client<HttpConnector, Full<Bytes>>;

#[derive(Clone)]
struct App {
    gateway: Arc<Gateway>,
    client: Upstream,
}

/// The gateway's HTTP routes.
pub fn router(gateway: Arc<Gateway>) -> axum::Router {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(std::time::Duration::from_secs(2)));
    let client = Client::builder(TokioExecutor::new()).build(connector);
    let app = App { gateway, client };
    axum::Router::new()
        .route("/health", axum::routing::get(health))
        .route("/healthz", axum::routing::get(health))
        .route("/metrics", axum::routing::get(|State(app): State<App>| async move { app.gateway.render_metrics() }))
        .fallback(proxy)
        .with_state(app)
}

async fn health(State(app): State<App>) -> (StatusCode, &'static str) {
    match app.gateway.engines.addresses().is_empty() {
        true => (StatusCode::SERVICE_UNAVAILABLE, "no inference engine configured or discovered\n"),
        false => (StatusCode::OK, "ok\n"),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body =
        serde_json::json!({"error": {"message": message, "type": status.canonical_reason(), "code": status.as_u16()}});
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn proxy(State(app): State<App>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("reading the request body: {e}")),
    };
    let api = Api::of_path(parts.uri.path()).filter(|_| parts.method == axum::http::Method::POST);
    let decision = match api {
        Some(api) => app.gateway.decide(api, &body, None),
        None => app.gateway.decide_any(None),
    };
    let decision = match decision {
        Ok(d) => d,
        Err(Refusal::BadRequest(why)) => return error(StatusCode::BAD_REQUEST, &why),
        Err(Refusal::NoEndpoint(why)) => return error(StatusCode::SERVICE_UNAVAILABLE, &why),
        Err(Refusal::Overloaded(why)) => return error(StatusCode::TOO_MANY_REQUESTS, &why),
    };
    forward(&app, &parts, body, &decision).await
}

/// Hop-by-hop headers, never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn upstream_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !HOP_BY_HOP.contains(&k.as_str()) && k != header::HOST && k != header::CONTENT_LENGTH {
            to.append(k, v.clone());
        }
    }
}

async fn forward(app: &App, parts: &axum::http::request::Parts, body: Bytes, d: &Decision) -> Response<Body> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    for endpoint in &d.endpoints {
        let mut up = Request::builder().method(parts.method.clone()).uri(format!("http://{endpoint}{path}"));
        if let Some(h) = up.headers_mut() {
            upstream_headers(&parts.headers, h);
        }
        let Ok(up) = up.body(Full::new(body.clone())) else {
            return error(StatusCode::BAD_REQUEST, "request cannot be forwarded");
        };
        let guard = app.gateway.engines.start(endpoint);
        match app.client.request(up).await {
            Ok(resp) => {
                app.gateway.engines.answered(endpoint);
                let (mut parts, incoming) = resp.into_parts();
                HOP_BY_HOP.iter().for_each(|h| {
                    parts.headers.remove(*h);
                });
                if let Ok(v) = HeaderValue::from_str(endpoint) {
                    parts.headers.insert(ENDPOINT_HEADER, v);
                }
                let body = Body::new(Guarded { inner: incoming, _guard: guard });
                return Response::from_parts(parts, body);
            }
            Err(e) if e.is_connect() => {
                tracing::warn!(%endpoint, "engine refused the connection ({e}); trying the next one");
                app.gateway.engines.refused(endpoint);
                app.gateway.metrics.retries.fetch_add(1, Relaxed);
            }
            Err(e) => {
                app.gateway.metrics.upstream_errors.fetch_add(1, Relaxed);
                return error(StatusCode::BAD_GATEWAY, &format!("engine {endpoint}: {e}"));
            }
        }
    }
    error(StatusCode::SERVICE_UNAVAILABLE, "every inference engine refused the connection")
}

/// An engine's response body, passed through frame by frame (SSE events as they come), that
/// counts the request in flight until it ends.
struct Guarded {
    inner: hyper::body::Incoming,
    _guard: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
