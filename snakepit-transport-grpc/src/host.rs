//! The host's `snakepit.v1.Host` service for one gRPC worker: its calls to the host.

use super::*;

/// Serves `snakepit.v1.Host` for one worker: its calls to the host, checked against its token
/// and answered by the pool's `HostHandler`.
pub(crate) struct HostService {
    pub(crate) worker: WorkerId,
    pub(crate) token: String,
    pub(crate) handler: Option<Arc<dyn snakepit_core::HostHandler>>,
    /// `Host.Call`s being answered; more than [`MAX_HOST_CALLS`] at once is a protocol
    /// violation.
    pub(crate) in_flight: Arc<AtomicUsize>,
    /// Breaks the worker's control channel on a violation (set once the handshake is done).
    pub(crate) breaker: Arc<OnceLock<Breaker>>,
    /// Whether the worker announced binary segments (set once the handshake is done).
    pub(crate) segments: Arc<AtomicBool>,
}

/// One `Host.Call` being answered.
struct HostCallGuard(Arc<AtomicUsize>);

impl Drop for HostCallGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[tonic::async_trait]
impl Host for HostService {
    async fn call(
        &self,
        request: tonic::Request<proto::HostCallRequest>,
    ) -> Result<tonic::Response<proto::HostCallReply>, tonic::Status> {
        let r = request.into_inner();
        if !token_matches(&r.token, &self.token) {
            return Err(tonic::Status::unauthenticated("missing or wrong snakepit token"));
        }
        let _guard = HostCallGuard(self.in_flight.clone());
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_HOST_CALLS {
            let detail = format!("the worker has more than {MAX_HOST_CALLS} `Host.Call`s in flight");
            if let Some(b) = self.breaker.get() {
                b.protocol_error(detail.clone());
            }
            return Err(tonic::Status::resource_exhausted(detail));
        }
        let args =
            if r.args.is_empty() { Payload::null() } else { Payload::from_encoded(Codec::Json, r.args) }
                .with_segments(r.segments.into_iter().map(Bytes::from).collect());
        let call = snakepit_core::HostCall::new(self.worker, Some(RequestId(r.call)), r.name, args);
        let outcome = match &self.handler {
            Some(h) => h.host_call(call).await,
            None => Err(WorkerError {
                kind: "UnknownHostTool".into(),
                message: "this pool has no host tools".into(),
                traceback: None,
            }),
        };
        let refused = WorkerError {
            kind: "BadRequest".into(),
            message: "the host tool returned bytes, and this worker does not accept binary segments".into(),
            traceback: None,
        };
        let outcome = match outcome {
            Ok(p) if p.has_segments() && !self.segments.load(Ordering::Acquire) => Err(refused),
            other => other,
        };
        let (outcome, segments) = match outcome {
            Ok(p) => (
                proto::host_call_reply::Outcome::Ok(p.bytes().to_vec()),
                p.segments().iter().map(|b| b.to_vec()).collect(),
            ),
            Err(e) => (
                proto::host_call_reply::Outcome::Error(proto::WorkerError {
                    r#type: e.kind,
                    message: e.message,
                    traceback: e.traceback.unwrap_or_default(),
                }),
                Vec::new(),
            ),
        };
        Ok(tonic::Response::new(proto::HostCallReply { outcome: Some(outcome), segments }))
    }
}

/// Whether the token a worker presented is its own, compared in constant time.
pub(crate) fn token_matches(presented: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}
