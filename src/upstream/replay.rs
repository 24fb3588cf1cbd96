//! A client's request body on its way to backends, kept (up to a limit) so
//! that a call that never reached its backend can be sent to another.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// How much of a request is kept so a call that never reached its backend
/// can be sent again. Unary calls usually fit; a longer stream past this
/// point is no longer retried.
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A call's request body as it reaches the data path: a client
/// connection's stream (the gateway), or any body an in-process caller
/// hands over (a client-side channel's tonic client), boxed. The gateway's
/// own path stays unboxed.
pub enum RequestBody {
    Incoming(Incoming),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl RequestBody {
    /// `body`, boxed (one allocation per call).
    pub fn boxed<B>(body: B) -> RequestBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        RequestBody::Boxed(body.map_err(Into::into).boxed_unsync())
    }
}

impl From<Incoming> for RequestBody {
    fn from(body: Incoming) -> Self {
        RequestBody::Incoming(body)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Incoming(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            RequestBody::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Incoming(b) => b.is_end_stream(),
            RequestBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Incoming(b) => b.size_hint(),
            RequestBody::Boxed(b) => b.size_hint(),
        }
    }
}

struct ReplayState {
    /// The client's body; `None` for a body given whole ([`ReplayBody::fixed`]).
    inner: Option<RequestBody>,
    /// Data frames taken so far, while they fit in [`REPLAY_LIMIT`].
    kept: Vec<Bytes>,
    kept_bytes: usize,
    overflowed: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// Only the newest attempt may read on from the client.
    attempt: u32,
    /// Frames of `kept` the newest attempt has sent.
    replayed: usize,
    /// When a frame last came from the client (for the stream idle timeout).
    last_read: tokio::time::Instant,
    /// Data bytes taken from the client so far.
    read_bytes: u64,
}

/// A client's request body, shared by the attempts of one call. Each attempt
/// first replays what earlier attempts took, then reads on from the client.
pub struct ReplayBody {
    state: Arc<Mutex<ReplayState>>,
    attempt: u32,
    sent_trailers: bool,
}

impl ReplayBody {
    pub fn new(inner: RequestBody) -> Self {
        ReplayBody::from_state(ReplayState {
            inner: Some(inner),
            kept: Vec::new(),
            kept_bytes: 0,
            overflowed: false,
            trailers: None,
            ended: false,
            attempt: 0,
            replayed: 0,
            last_read: tokio::time::Instant::now(),
            read_bytes: 0,
        })
    }

    /// A body known whole in advance (the gateway's own calls: health checks).
    pub fn fixed(data: Bytes) -> Self {
        ReplayBody::from_state(ReplayState {
            inner: None,
            kept_bytes: data.len(),
            kept: vec![data],
            overflowed: false,
            trailers: None,
            ended: true,
            attempt: 0,
            replayed: 0,
            last_read: tokio::time::Instant::now(),
            read_bytes: 0,
        })
    }

    fn from_state(state: ReplayState) -> Self {
        ReplayBody {
            state: Arc::new(Mutex::new(state)),
            attempt: 0,
            sent_trailers: false,
        }
    }

    /// Another handle on the same request, for watching it (not for sending).
    pub fn clone_handle(&self) -> ReplayBody {
        ReplayBody {
            state: self.state.clone(),
            attempt: u32::MAX,
            sent_trailers: true,
        }
    }

    /// When a frame last came from the client.
    pub fn last_read(&self) -> tokio::time::Instant {
        self.state.lock().expect("replay state poisoned").last_read
    }

    /// Data bytes taken from the client so far (the access log's request size).
    pub fn bytes_read(&self) -> u64 {
        self.state.lock().expect("replay state poisoned").read_bytes
    }

    /// No attempt will follow (a backend answered): what was kept for one
    /// is let go, once the answering attempt has sent it (a retried call's
    /// backend may answer before its replay is through).
    pub fn stop_keeping(&self) {
        let mut state = self.state.lock().expect("replay state poisoned");
        state.overflowed = true;
        if state.replayed >= state.kept.len() {
            state.let_go_of_kept();
        }
    }

    /// A body for the next attempt, or `None` once too much was sent to replay.
    pub fn retry(&self) -> Option<ReplayBody> {
        let mut state = self.state.lock().expect("replay state poisoned");
        if state.overflowed {
            return None;
        }
        state.attempt += 1;
        state.replayed = 0;
        Some(ReplayBody {
            state: self.state.clone(),
            attempt: state.attempt,
            sent_trailers: false,
        })
    }
}

impl ReplayState {
    fn let_go_of_kept(&mut self) {
        self.kept = Vec::new();
        self.kept_bytes = 0;
        self.replayed = 0;
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut state = this.state.lock().expect("replay state poisoned");
        if state.attempt != this.attempt {
            return Poll::Ready(Some(Err("superseded by a retry".into())));
        }
        if let Some(frame) = state.kept.get(state.replayed).cloned() {
            state.replayed += 1;
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        if state.overflowed && !state.kept.is_empty() {
            // Replayed whole, and no attempt follows.
            state.let_go_of_kept();
        }
        if state.ended {
            if !this.sent_trailers {
                this.sent_trailers = true;
                if let Some(t) = state.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(inner) = state.inner.as_mut() else {
            state.ended = true;
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.ended = true;
                this.sent_trailers = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                state.last_read = tokio::time::Instant::now();
                if let Some(data) = frame.data_ref() {
                    state.read_bytes += data.len() as u64;
                    if !state.overflowed && state.kept_bytes + data.len() <= REPLAY_LIMIT {
                        state.kept_bytes += data.len();
                        state.kept.push(data.clone());
                        state.replayed += 1;
                    } else if !state.overflowed {
                        state.overflowed = true;
                        state.let_go_of_kept();
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    state.trailers = Some(t.clone());
                    state.ended = true;
                    this.sent_trailers = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = self.state.lock().expect("replay state poisoned");
        state.attempt == self.attempt
            && state.replayed >= state.kept.len()
            && (state.ended && (self.sent_trailers || state.trailers.is_none())
                || state.inner.as_ref().is_none_or(|i| i.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A client body that has sent `frames` and may send more.
    struct Client(VecDeque<&'static str>);

    impl Body for Client {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.0.pop_front() {
                Some(data) => {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data.as_bytes())))))
                }
                None => Poll::Pending,
            }
        }
    }

    fn next(body: &mut ReplayBody) -> Option<String> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let data = frame.into_data().expect("a data frame");
                Some(String::from_utf8(data.to_vec()).unwrap())
            }
            Poll::Ready(other) => panic!("not a data frame: {other:?}"),
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_retry_answered_mid_replay_still_sends_the_rest_of_the_replay() {
        let call = ReplayBody::new(RequestBody::boxed(Client(["a", "b", "c", "d"].into())));
        let mut first = call.retry().expect("a first attempt");
        assert_eq!(next(&mut first).as_deref(), Some("a"));
        assert_eq!(next(&mut first).as_deref(), Some("b"));
        let mut second = call.retry().expect("a retry");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            matches!(
                Pin::new(&mut first).poll_frame(&mut cx),
                Poll::Ready(Some(Err(_)))
            ),
            "the first attempt is superseded"
        );
        assert_eq!(next(&mut second).as_deref(), Some("a"));
        // Its backend answers now, the replay half sent.
        call.stop_keeping();
        assert!(call.retry().is_none(), "no attempt follows an answer");
        assert_eq!(next(&mut second).as_deref(), Some("b"));
        assert_eq!(next(&mut second).as_deref(), Some("c"));
        assert_eq!(next(&mut second).as_deref(), Some("d"));
        assert_eq!(next(&mut second), None);
        let state = call.state.lock().unwrap();
        assert!(
            state.kept.is_empty() && state.kept_bytes == 0,
            "let go once replayed"
        );
    }
}
