//! The response bodies the proxy streams back to clients ([`ResponseBody`]):
//! a backend's, watched on its way ([`Observed`]), or none. Nothing is
//! decoded or buffered whole; frames pass through as they come. (Requests
//! go to backends as [`crate::upstream::ReplayBody`].)

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::call::{AttemptRecord, CallRecord};
use super::status;
use crate::upstream::{BoxError, ReplayBody, UpstreamBody};

pin_project_lite::pin_project! {
    /// A backend's response body on its way to the client: records the
    /// outcome of the attempt and of the call, ends the call with
    /// DEADLINE_EXCEEDED when its deadline passes, and turns an upstream
    /// reset into UNAVAILABLE trailers.
    pub struct Observed {
        #[pin]
        inner: UpstreamBody,
        timers: Timers,
        attempt: AttemptRecord,
        call: CallRecord,
        // Client-facing messages may name the backend.
        name_backends: bool,
        done: bool,
    }
}

impl Observed {
    pub fn new(
        inner: UpstreamBody,
        timers: Timers,
        attempt: AttemptRecord,
        call: CallRecord,
        name_backends: bool,
    ) -> Self {
        Observed {
            inner,
            timers,
            attempt,
            call,
            name_backends,
            done: false,
        }
    }
}

/// The stream idle timeout of one call: no bytes moving either way (the
/// response here, the request in its `ReplayBody`) for `limit`. One timer,
/// re-armed only when it fires, not per frame.
pub struct Idle {
    request: ReplayBody,
    limit: Duration,
    last_response: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Idle {
    pub fn new(request: ReplayBody, limit: Duration) -> Self {
        let now = Instant::now();
        Idle {
            request,
            limit,
            last_response: now,
            timer: Box::pin(tokio::time::sleep_until(now + limit)),
        }
    }

    fn moved(&mut self) {
        self.last_response = Instant::now();
    }

    /// True once the call has been idle for the limit.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            let last = self.last_response.max(self.request.last_read());
            if last.elapsed() >= self.limit {
                return true;
            }
            self.timer.as_mut().reset(last + self.limit);
        }
        false
    }
}

/// A call's deadline and stream idle timeout: armed when its attempt
/// begins, carried on into the response, so each is one timer per call.
pub struct Timers {
    deadline: Option<Pin<Box<Sleep>>>,
    idle: Idle,
}

/// What ended a wait.
pub enum Expired {
    Deadline,
    Idle,
}

impl Timers {
    pub fn new(deadline: Option<Instant>, request: &ReplayBody, idle_limit: Duration) -> Self {
        Timers {
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            idle: Idle::new(request.clone_handle(), idle_limit),
        }
    }

    /// The deadline first, then idleness.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Expired> {
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Expired::Deadline);
            }
        }
        if self.idle.poll_expired(cx) {
            return Poll::Ready(Expired::Idle);
        }
        Poll::Pending
    }
}

/// "a backend of `service`", or "backend ADDR of `service`" when allowed.
fn which_backend(attempt: &AttemptRecord, name_backends: bool) -> String {
    if name_backends {
        format!(
            "backend {} of {:?}",
            attempt.backend_addr(),
            attempt.service()
        )
    } else {
        format!("a backend of {:?}", attempt.service())
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
        match this.timers.poll_expired(cx) {
            Poll::Ready(Expired::Deadline) => {
                *this.done = true;
                this.attempt.deadline_passed();
                this.call.set_status(status::DEADLINE_EXCEEDED);
                let msg = format!(
                    "deadline exceeded at the gateway while {} streamed the response",
                    which_backend(this.attempt, *this.name_backends)
                );
                return Poll::Ready(Some(Ok(Frame::trailers(status::trailers(
                    status::DEADLINE_EXCEEDED,
                    &msg,
                )))));
            }
            Poll::Ready(Expired::Idle) => {
                *this.done = true;
                this.attempt.set_status(status::DEADLINE_EXCEEDED);
                this.call.set_status(status::DEADLINE_EXCEEDED);
                let msg = format!(
                    "no bytes moved for {:?} (the stream idle timeout) while {} streamed the response",
                    this.timers.idle.limit,
                    which_backend(this.attempt, *this.name_backends)
                );
                return Poll::Ready(Some(Ok(Frame::trailers(status::trailers(
                    status::DEADLINE_EXCEEDED,
                    &msg,
                )))));
            }
            Poll::Pending => {}
        }
        match this.inner.poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                this.timers.idle.moved();
                if let Some(data) = frame.data_ref() {
                    this.call.note_response_bytes(data.len());
                }
                if let Some(t) = frame.trailers_ref() {
                    let code = status::code_of(t).unwrap_or(status::UNKNOWN);
                    this.attempt.set_status(code);
                    this.call.set_status(code);
                    *this.done = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                // Neither trailers nor a status in the headers: the backend
                // broke the protocol (a status in the headers was set already).
                *this.done = true;
                this.attempt.set_status(status::INTERNAL);
                this.call.set_status(status::INTERNAL);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                *this.done = true;
                this.attempt.set_status(status::UNAVAILABLE);
                this.call.set_status(status::UNAVAILABLE);
                tracing::debug!(backend = %this.attempt.backend_addr(), service = %this.attempt.service(), cause = %crate::errors::chain(&err), "backend failed mid-call");
                let msg = format!(
                    "{} failed mid-call",
                    which_backend(this.attempt, *this.name_backends)
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
