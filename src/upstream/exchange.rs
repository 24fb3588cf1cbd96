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
use http::{HeaderMap, HeaderName, Request, Response};
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
    /// h2 refused the request itself (a header HTTP/2 forbids, a URI with
    /// no authority): no backend would take it either.
    #[error("the request cannot be sent over HTTP/2: {0}")]
    Malformed(#[source] h2::Error),
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
        .map_err(|err| {
            // The connection's own errors carry a reason or come from its
            // socket; the rest are h2's objections to the request (the
            // pool retires a connection before its stream ids run out).
            if err.reason().is_some() || err.is_io() || err.is_go_away() {
                SendError::NotSent(err)
            } else {
                SendError::Malformed(err)
            }
        })?;
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
    let mut response = head.map(UpstreamBody::new);
    if let Some(mut pump) = pump {
        // The request streams on after the response began, in a task of
        // its own, told when the response side is gone: its handle on the
        // stream would keep h2 from resetting it, so a backend would never
        // hear of a call the client or the gateway ended.
        let (alive, gone) = tokio::sync::oneshot::channel();
        pump.response_gone = Some(gone);
        response.body_mut().pump = Some(alive);
        tokio::spawn(pump);
    }
    Ok(response)
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
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
}

/// A request body on its way into an HTTP/2 stream.
struct Pump {
    body: ReplayBody,
    stream: h2::SendStream<Bytes>,
    /// A chunk taken from the body, waiting for the backend's window.
    waiting: Option<(Bytes, bool)>,
    /// A chunk went to h2 already.
    sent_data: bool,
    /// Resolves once the response body is dropped (a pump of its own only).
    response_gone: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Pump {
    fn new(body: ReplayBody, stream: h2::SendStream<Bytes>) -> Self {
        Pump {
            body,
            stream,
            waiting: None,
            sent_data: false,
            response_gone: None,
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
            // The response ended or was let go (the call is over): nothing
            // more goes to the backend, and it hears so (not a clean end of
            // the request, which would pass a cut-off upload as whole).
            if let Some(gone) = this.response_gone.as_mut() {
                if Pin::new(gone).poll(cx).is_ready() {
                    this.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
            }
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
                        // The first chunk goes to h2 at once, which keeps it
                        // until the stream opens: the HEADERS and a unary
                        // call's message leave in one write. (Waiting for
                        // window first parted them: a stream has none until
                        // the connection's task has opened it, so each call
                        // took two writes and two wake-ups more.) It is one
                        // chunk, as `waiting` would hold; later ones wait.
                        if data.is_empty() || !this.sent_data {
                            this.sent_data = true;
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
/// its end, the stream is reset (CANCEL), the request's pump with it.
#[derive(Debug)]
pub struct UpstreamBody {
    recv: h2::RecvStream,
    data_done: bool,
    /// Keeps a request's own pump going; dropped with the body, it stops it.
    pump: Option<tokio::sync::oneshot::Sender<()>>,
}

impl UpstreamBody {
    fn new(recv: h2::RecvStream) -> Self {
        UpstreamBody {
            recv,
            data_done: false,
            pump: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{BoxError, RequestBody};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A request body whose client never sends more nor ends it.
    struct Open;

    impl Body for Open {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
    }

    /// A streaming call the gateway ends (its deadline, its idle timeout,
    /// a client gone) while the request is still open: the backend's stream
    /// is reset, though the request's own pump still holds it.
    #[tokio::test]
    async fn letting_go_of_the_response_resets_a_request_still_streaming() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut stream = respond
                .send_response(Response::new(()), false)
                .expect("headers sent");
            let mut body = request.into_body();
            let ended = tokio::select! {
                data = body.data() => format!("{data:?}"),
                reset = std::future::poll_fn(|cx| stream.poll_reset(cx)) => format!("{reset:?}"),
            };
            ended
        });
        let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = h2::client::handshake(socket).await.unwrap();
        tokio::spawn(conn);
        let mut request = Request::new(ReplayBody::new(RequestBody::boxed(Open)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = format!("http://{addr}/a.B/C").parse().unwrap();
        let response = send(sender, request).await.expect("the response head");
        drop(response);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), backend)
            .await
            .expect("the backend heard within 10 s")
            .unwrap();
        assert!(ended.contains("CANCEL"), "the backend saw {ended}");
    }

    async fn backend_connection(
        close_at_once: bool,
    ) -> (
        Sender,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
        String,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            if close_at_once {
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
            }
            while conn.accept().await.is_some() {}
        });
        let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = h2::client::handshake(socket).await.unwrap();
        (sender, tokio::spawn(conn), format!("http://{addr}/a.B/C"))
    }

    fn request(uri: &str) -> Request<ReplayBody> {
        let mut request = Request::new(ReplayBody::fixed(Bytes::from_static(b"x")));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri.parse().unwrap();
        request
    }

    /// A request h2 will not send is no backend's fault: it is not retried
    /// elsewhere as "not reached", it fails as what it is.
    #[tokio::test]
    async fn a_request_h2_refuses_is_malformed_not_unsent() {
        let (sender, _conn, uri) = backend_connection(false).await;
        let mut bad = request(&uri);
        bad.headers_mut()
            .insert(http::header::CONNECTION, "keep-alive".parse().unwrap());
        let err = send(sender, bad).await.expect_err("h2 refuses it");
        assert!(matches!(err, SendError::Malformed(_)), "{err:?}");
    }

    /// A connection the backend closed takes no request: it was not sent,
    /// and may go to another connection or backend.
    #[tokio::test]
    async fn a_request_on_a_closed_connection_is_not_sent() {
        let (sender, conn, uri) = backend_connection(true).await;
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), conn).await;
        assert!(ended.is_ok(), "the connection ended within 10 s");
        let err = send(sender, request(&uri)).await.expect_err("not sent");
        assert!(matches!(err, SendError::NotSent(_)), "{err:?}");
    }

    /// An upload whose client has 64 chunks of 16 KiB ready at once (and
    /// sends no more, so a pump that ignored the window would stop there).
    struct Eager(Arc<AtomicUsize>);

    impl Body for Eager {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.0.load(Ordering::SeqCst) == 64 {
                return Poll::Pending;
            }
            self.0.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![7u8; 16 << 10])))))
        }
    }

    /// A backend that reads nothing holds the upload at its window: the
    /// gateway takes from the client only what fits in it, and one chunk
    /// more (the first goes with the HEADERS without waiting for window).
    #[tokio::test]
    async fn a_backend_that_reads_nothing_holds_the_upload_at_its_window() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            let (request, _respond) = conn.accept().await.unwrap().unwrap();
            // Holds the call, reads none of it; keeps the connection going.
            let _held = request;
            while conn.accept().await.is_some() {}
        });
        let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = h2::client::handshake(socket).await.unwrap();
        tokio::spawn(conn);
        let pulled = Arc::new(AtomicUsize::new(0));
        let mut request = Request::new(ReplayBody::new(RequestBody::boxed(Eager(pulled.clone()))));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = format!("http://{addr}/a.B/C").parse().unwrap();
        let call = tokio::spawn(send(sender, request));
        // HTTP/2's initial window is 65,535 bytes: four 16 KiB chunks fill it.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while pulled.load(Ordering::SeqCst) < 4 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the upload never began"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let taken = pulled.load(Ordering::SeqCst);
        assert!(
            taken <= 6,
            "took {taken} chunks of 16 KiB from the client for a 64 KiB window"
        );
        call.abort();
    }
}
