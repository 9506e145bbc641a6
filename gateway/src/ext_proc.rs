//! The endpoint picker for the Gateway API Inference Extension: an Envoy `ExternalProcessor`
//! speaking the Endpoint Picker Protocol. One stream per HTTP request; request and response
//! bodies in FULL_DUPLEX_STREAMED mode:
//!
//! - request headers are held (no answer) until the request body has ended, unless the request
//!   has no body (then it is picked by load and answered at once);
//! - at the body's end: [`Gateway::decide`], then the headers answer (clear the route cache,
//!   set `x-gateway-destination-endpoint` and the same value in dynamic metadata `envoy.lb`:
//!   the pick then its fallbacks, comma-separated), then the body echoed back unchanged in
//!   chunks of at most 62,000 bytes;
//! - the subset hint (`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`) limits
//!   the candidates; present but empty, or nothing to pick: ImmediateResponse 503; a malformed
//!   body: 400; every engine at its in-flight limit: 429;
//! - response headers, body chunks and trailers are echoed as they come (streams stay streams);
//!   the request counts as in flight on its engine (or the one Envoy reports in
//!   `x-gateway-destination-endpoint-served`) until its response ends.

use super::decide::{Decision, Gateway, Refusal};
use super::engines::InFlight;
use super::http::MAX_BODY_BYTES;
use super::openai::Api;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, Metadata};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use ep::external_processor_server::{ExternalProcessor, ExternalProcessorServer};
use ep::processing_request::Request as In;
use ep::processing_response::Response as Out;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Header (and `envoy.lb` metadata key) carrying the picked endpoints.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// Metadata namespace of the data plane's subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Key of the subset hint.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Key (in `envoy.lb`) of the endpoint that served the request, on the response path.
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
/// Largest body chunk sent back to Envoy.
pub const BODY_CHUNK: usize = 62_000;
/// Endpoints named per pick: the choice and its fallbacks.
pub const MAX_ENDPOINTS: usize = 3;

/// The picker service.
#[derive(Clone)]
pub struct Picker(pub Arc<Gateway>);

/// The tonic service of a picker.
pub fn service(gateway: Arc<Gateway>) -> ExternalProcessorServer<Picker> {
    ExternalProcessorServer::new(Picker(gateway))
}

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream = ReceiverStream<Result<ep::ProcessingResponse, Status>>;

    async fn process(
        &self,
        req: Request<Streaming<ep::ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let gateway = Arc::clone(&self.0);
        let inbound = req.into_inner();
        tokio::spawn(async move {
            let mut stream =
                RequestStream { gateway, tx, path: String::new(), body: Vec::new(), subset: None, guard: None };
            if let Err(status) = stream.run(inbound).await {
                let _ = stream.tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn response(r: Out) -> ep::ProcessingResponse {
    ep::ProcessingResponse { response: Some(r), ..Default::default() }
}

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_string())) }
}

/// The subset hint in a message's metadata: `None` when absent, else its endpoints.
pub fn subset_hint(metadata: Option<&Metadata>) -> Option<Vec<String>> {
    let hint = metadata?.filter_metadata.get(SUBSET_NAMESPACE)?.fields.get(SUBSET_KEY)?;
    Some(match &hint.kind {
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        Some(Kind::StringValue(s)) => {
            s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
        }
        _ => Vec::new(),
    })
}

fn served(metadata: Option<&Metadata>) -> Option<String> {
    match &metadata?.filter_metadata.get("envoy.lb")?.fields.get(SERVED_KEY)?.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn immediate(code: u16, message: &str) -> ep::ProcessingResponse {
    response(Out::ImmediateResponse(ep::ImmediateResponse {
        status: Some(HttpStatus { code: code as i32 }),
        body: message.as_bytes().to_vec(),
        details: message.to_string(),
        ..Default::default()
    }))
}

/// The headers answer that routes the request: header and `envoy.lb` metadata alike.
pub fn pick_response(d: &Decision, body_len: Option<usize>) -> ep::ProcessingResponse {
    let endpoints = d.endpoints.iter().take(MAX_ENDPOINTS).cloned().collect::<Vec<_>>().join(",");
    let header = |k: &str, v: &str| HeaderValueOption {
        header: Some(HeaderValue { key: k.into(), raw_value: v.as_bytes().to_vec(), ..Default::default() }),
        ..Default::default()
    };
    let mut set_headers = vec![header(DESTINATION, &endpoints)];
    if let Some(n) = body_len.filter(|&n| n > 0) {
        set_headers.push(header("content-length", &n.to_string()));
    }
    let common = ep::CommonResponse {
        clear_route_cache: true,
        header_mutation: Some(ep::HeaderMutation { set_headers, ..Default::default() }),
        ..Default::default()
    };
    let lb = Struct { fields: HashMap::from([(DESTINATION.to_string(), string(&endpoints))]) };
    let metadata =
        Struct { fields: HashMap::from([("envoy.lb".to_string(), Value { kind: Some(Kind::StructValue(lb)) })]) };
    ep::ProcessingResponse {
        response: Some(Out::RequestHeaders(ep::HeadersResponse { response: Some(common) })),
        dynamic_metadata: Some(metadata),
        ..Default::default()
    }
}

/// One body chunk handed back to Envoy unchanged (request or response side).
fn chunk(data: &[u8], end_of_stream: bool, request: bool) -> ep::ProcessingResponse {
    let mutation = ep::BodyMutation {
        mutation: Some(ep::body_mutation::Mutation::StreamedResponse(ep::StreamedBodyResponse {
            body: data.to_vec(),
            end_of_stream,
            ..Default::default()
        })),
    };
    let b =
        ep::BodyResponse { response: Some(ep::CommonResponse { body_mutation: Some(mutation), ..Default::default() }) };
    response(if request { Out::RequestBody(b) } else { Out::ResponseBody(b) })
}

/// A buffered request body handed back in chunks of at most [`BODY_CHUNK`] bytes.
fn request_body_chunks(body: &[u8]) -> Vec<ep::ProcessingResponse> {
    if body.is_empty() {
        return vec![chunk(&[], true, true)];
    }
    let n = body.len().div_ceil(BODY_CHUNK);
    body.chunks(BODY_CHUNK).enumerate().map(|(i, c)| chunk(c, i + 1 == n, true)).collect()
}

/// One HTTP request's ext_proc stream.
struct RequestStream {
    gateway: Arc<Gateway>,
    tx: mpsc::Sender<Result<ep::ProcessingResponse, Status>>,
    path: String,
    body: Vec<u8>,
    subset: Option<Vec<String>>,
    guard: Option<InFlight>,
}

impl RequestStream {
    async fn send(&self, r: ep::ProcessingResponse) -> Result<(), Status> {
        self.tx.send(Ok(r)).await.map_err(|_| Status::cancelled("Envoy closed the stream"))
    }

    async fn run(&mut self, mut inbound: Streaming<ep::ProcessingRequest>) -> Result<(), Status> {
        while let Some(msg) = inbound.message().await? {
            let metadata = msg.metadata_context.as_ref();
            match msg.request {
                Some(In::RequestHeaders(h)) => {
                    self.subset = subset_hint(metadata);
                    // The data plane's endpoints are trusted: they become candidates.
                    self.subset.iter().flatten().for_each(|a| self.gateway.engines.add(a));
                    self.path = h
                        .headers
                        .iter()
                        .flat_map(|m| &m.headers)
                        .find(|v| v.key == ":path")
                        .map(|v| {
                            if v.raw_value.is_empty() {
                                v.value.clone()
                            } else {
                                String::from_utf8_lossy(&v.raw_value).into_owned()
                            }
                        })
                        .unwrap_or_default();
                    if h.end_of_stream {
                        let decision = self.gateway.decide_any(self.subset_slice());
                        if !self.answer(decision, None).await? {
                            return Ok(());
                        }
                    }
                }
                Some(In::RequestBody(b)) => {
                    if self.body.len() + b.body.len() > MAX_BODY_BYTES {
                        return self.send(immediate(400, "request body too large")).await;
                    }
                    self.body.extend_from_slice(&b.body);
                    if b.end_of_stream {
                        let decision = match Api::of_path(&self.path) {
                            Some(api) => self.gateway.decide(api, &self.body, self.subset_slice()),
                            None => self.gateway.decide_any(self.subset_slice()),
                        };
                        let len = self.body.len();
                        if !self.answer(decision, Some(len)).await? {
                            return Ok(());
                        }
                        for c in request_body_chunks(&std::mem::take(&mut self.body)) {
                            self.send(c).await?;
                        }
                    }
                }
                Some(In::RequestTrailers(_)) => {
                    self.send(response(Out::RequestTrailers(ep::TrailersResponse::default()))).await?;
                }
                Some(In::ResponseHeaders(_)) => {
                    if let Some(endpoint) = served(metadata) {
                        // Count the request where Envoy actually sent it.
                        self.guard = Some(self.gateway.engines.start(&endpoint));
                    }
                    self.send(response(Out::ResponseHeaders(ep::HeadersResponse::default()))).await?;
                }
                Some(In::ResponseBody(b)) => {
                    self.send(chunk(&b.body, b.end_of_stream, false)).await?;
                    if b.end_of_stream {
                        self.guard = None;
                    }
                }
                Some(In::ResponseTrailers(_)) => {
                    self.guard = None;
                    self.send(response(Out::ResponseTrailers(ep::TrailersResponse::default()))).await?;
                }
                None => return Err(Status::invalid_argument("ProcessingRequest without a request")),
            }
        }
        Ok(())
    }

    fn subset_slice(&self) -> Option<&[String]> {
        self.subset.as_deref()
    }

    /// Sends the pick (true) or the refusal that ends the request (false).
    async fn answer(&mut self, decision: Result<Decision, Refusal>, body_len: Option<usize>) -> Result<bool, Status> {
        match decision {
            Ok(d) => {
                self.guard = d.endpoints.first().map(|e| self.gateway.engines.start(e));
                self.send(pick_response(&d, body_len)).await?;
                Ok(true)
            }
            Err(Refusal::BadRequest(why)) => self.send(immediate(400, &why)).await.map(|_| false),
            Err(Refusal::NoEndpoint(why)) => self.send(immediate(503, &why)).await.map(|_| false),
            Err(Refusal::Overloaded(why)) => self.send(immediate(429, &why)).await.map(|_| false),
        }
    }
}

/// A list value of strings (for building subset hints).
pub fn string_list(items: &[&str]) -> Value {
    Value { kind: Some(Kind::ListValue(ListValue { values: items.iter().map(|s| string(s)).collect() })) }
}
