//! The bodies the proxy streams: requests to backends ([`ReplayBody`]) and
//! responses to clients ([`ResponseBody`]). Nothing is decoded or buffered
//! whole; frames pass through as they come.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::call::CallRecord;
use super::status;

/// How much of a request is kept so a call that never reached its backend
/// can be sent again. Unary calls usually fit; a longer stream past this
/// point is no longer retried.
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct ReplayState {
    inner: Incoming,
    /// Data frames taken so far, while they fit in [`REPLAY_LIMIT`].
    kept: Vec<Bytes>,
    kept_bytes: usize,
    overflowed: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// Only the newest attempt may read on from the client.
    attempt: u32,
}

/// A client's request body, shared by the attempts of one call. Each attempt
/// first replays what earlier attempts took, then reads on from the client.
pub struct ReplayBody {
    state: Arc<Mutex<ReplayState>>,
    attempt: u32,
    /// Frames of `kept` this attempt has sent.
    pos: usize,
    sent_trailers: bool,
}

impl ReplayBody {
    pub fn new(inner: Incoming) -> Self {
        let state = ReplayState {
            inner,
            kept: Vec::new(),
            kept_bytes: 0,
            overflowed: false,
            trailers: None,
            ended: false,
            attempt: 0,
        };
        ReplayBody {
            state: Arc::new(Mutex::new(state)),
            attempt: 0,
            pos: 0,
            sent_trailers: false,
        }
    }

    /// A body for the next attempt, or `None` once too much was sent to replay.
    pub fn retry(&self) -> Option<ReplayBody> {
        let mut state = self.state.lock().expect("replay state poisoned");
        if state.overflowed {
            return None;
        }
        state.attempt += 1;
        Some(ReplayBody {
            state: self.state.clone(),
            attempt: state.attempt,
            pos: 0,
            sent_trailers: false,
        })
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
        if this.pos < state.kept.len() {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(state.kept[this.pos - 1].clone()))));
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
        match Pin::new(&mut state.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.ended = true;
                this.sent_trailers = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !state.overflowed && state.kept_bytes + data.len() <= REPLAY_LIMIT {
                        state.kept_bytes += data.len();
                        state.kept.push(data.clone());
                        this.pos += 1;
                    } else if !state.overflowed {
                        state.overflowed = true;
                        state.kept = Vec::new();
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
        self.pos >= state.kept.len()
            && (state.ended && (self.sent_trailers || state.trailers.is_none())
                || state.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

pin_project_lite::pin_project! {
    /// A backend's response body on its way to the client: records the call's
    /// outcome, ends the call with DEADLINE_EXCEEDED when its deadline passes,
    /// and turns an upstream reset into UNAVAILABLE trailers.
    pub struct Observed {
        #[pin]
        inner: Incoming,
        deadline: Option<Pin<Box<Sleep>>>,
        record: CallRecord,
        done: bool,
    }
}

impl Observed {
    pub fn new(inner: Incoming, deadline: Option<Pin<Box<Sleep>>>, record: CallRecord) -> Self {
        Observed {
            inner,
            deadline,
            record,
            done: false,
        }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                *this.done = true;
                this.record.set_status(status::DEADLINE_EXCEEDED, false);
                let msg = format!(
                    "deadline exceeded at the gateway while {} streamed the response",
                    this.record.backend_addr()
                );
                return Poll::Ready(Some(Ok(Frame::trailers(status::trailers(
                    status::DEADLINE_EXCEEDED,
                    &msg,
                )))));
            }
        }
        match this.inner.poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    let code = status::code_of(t).unwrap_or(status::UNKNOWN);
                    this.record.set_status(code, true);
                    *this.done = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                *this.done = true;
                this.record.finish_without_trailers();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                *this.done = true;
                this.record.set_status(status::UNAVAILABLE, false);
                let msg = format!(
                    "backend {} of {} failed mid-call: {err}",
                    this.record.backend_addr(),
                    this.record.service()
                );
                Poll::Ready(Some(Ok(Frame::trailers(status::trailers(
                    status::UNAVAILABLE,
                    &msg,
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}

use std::future::Future;

/// What the gateway sends back: a backend's body, or nothing (trailers-only).
pub enum ResponseBody {
    Empty,
    Upstream(Pin<Box<Observed>>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Upstream(body) => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Upstream(body) => body.is_end_stream(),
        }
    }
}
