//! One request and its response on a backend connection, driven by h2 in
//! the caller's own task.
//!
//! hyper's HTTP/2 client hands every request over a channel to its
//! connection task, which spawns a task per request to wait for the
//! response and sends it back over a oneshot: a spawn and two hops between
//! tasks per call (on a multi-threaded runtime, often between threads). Here
//! the call's task opens the stream itself, pumps the request body while it
//! waits for the response head, and reads the response body as the client
//! takes it; the connection's own task only moves frames. Only a request
//! still streaming when the response head arrives (client or bidirectional
//! streaming) gets a task of its own to pump the rest.
//!
//! Flow control is hyper's: a request chunk is polled from the client only
//! once the backend has window for the one before it (so at most one chunk
//! per stream waits here), and response bytes are released to the backend's
//! window as the client takes them.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};

use super::replay::ReplayBody;

/// Opens streams on one backend connection.
pub type Sender = h2::client::SendRequest<Bytes>;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The request never left the gateway: the connection could take no
    /// new stream (closed, or going away).
    #[error("the connection took no new stream: {0}")]
    NotSent(#[source] h2::Error),
    /// The stream was opened; it ended before the response head.
    #[error(transparent)]
    Stream(h2::Error),
}

/// Sends `request` on a new stream of `sender`'s connection; resolves with
/// the response head once it arrives, the body still streaming.
pub async fn send(
    mut sender: Sender,
    request: Request<ReplayBody>,
) -> Result<Response<UpstreamBody>, SendError> {
    poll_fn(|cx| sender.poll_ready(cx))
        .await
        .map_err(SendError::NotSent)?;
    let (parts, body) = request.into_parts();
    let end = body.is_end_stream();
    let (mut response, stream) = sender
        .send_request(Request::from_parts(parts, ()), end)
        .map_err(SendError::NotSent)?;
    let mut pump = (!end).then(|| Pump::new(body, stream));
    let head = poll_fn(|cx| {
        if let Some(p) = pump.as_mut() {
            if Pin::new(p).poll(cx).is_ready() {
                pump = None;
            }
        }
        Pin::new(&mut response).poll(cx)
    })
    .await
    .map_err(SendError::Stream)?;
    if let Some(pump) = pump {
        // The request streams on after the response began.
        tokio::spawn(pump);
    }
    Ok(head.map(UpstreamBody::new))
}

/// Removes the headers HTTP/2 forbids (RFC 9113 §8.2.2), which h2 refuses
/// to send. A client connection's requests never have them (h2 refuses to
/// receive them too); an in-process caller's may.
pub fn strip_connection_headers(headers: &mut HeaderMap) {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    if headers.get(TE).is_some_and(|v| v != "trailers") {
        headers.remove(TE);
    }
    if let Some(listed) = headers.remove(CONNECTION) {
        for name in listed.to_str().unwrap_or_default().split(',') {
            headers.remove(name.trim());
        }
    }
    for name in [TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// A request body on its way into an HTTP/2 stream.
struct Pump {
    body: ReplayBody,
    stream: h2::SendStream<Bytes>,
    /// A chunk taken from the body, waiting for the backend's window.
    waiting: Option<(Bytes, bool)>,
}

impl Pump {
    fn new(body: ReplayBody, stream: h2::SendStream<Bytes>) -> Self {
        Pump {
            body,
            stream,
            waiting: None,
        }
    }
}

impl Future for Pump {
    type Output = ();

    /// Ready when the body is sent whole, or the stream ended (a reset
    /// either way, which the response side reports).
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // The backend reset the stream: nothing more to send.
            if this.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if let Some((data, end)) = this.waiting.take() {
                while this.stream.capacity() == 0 {
                    match this.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            this.waiting = Some((data, end));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                    }
                }
                if this.stream.send_data(data, end).is_err() || end {
                    return Poll::Ready(());
                }
                continue;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = this.body.is_end_stream();
                        if data.is_empty() {
                            if this.stream.send_data(data, end).is_err() || end {
                                return Poll::Ready(());
                            }
                            continue;
                        }
                        // A claim of one byte: h2 raises it to the chunk's
                        // length as it is sent (hyper's way, see its #4003).
                        this.stream.reserve_capacity(1);
                        this.waiting = Some((data, end));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.stream.reserve_capacity(0);
                            let _reset_is_reported_by_the_response =
                                this.stream.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(err)) => {
                    tracing::debug!(cause = %crate::errors::chain(&*err), "request body failed; resetting the backend stream");
                    this.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    let _reset_is_reported_by_the_response =
                        this.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// A backend's response body: its DATA frames, then its trailers. Bytes
/// taken are given back to the backend's window at once; dropped before
/// its end, the stream is reset (CANCEL).
#[derive(Debug)]
pub struct UpstreamBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl UpstreamBody {
    fn new(recv: h2::RecvStream) -> Self {
        UpstreamBody {
            recv,
            data_done: false,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _closed_streams_need_no_window =
                        this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(err))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}
