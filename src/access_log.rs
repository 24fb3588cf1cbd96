//! The access log: one JSON line per call, written by a thread of its own.
//!
//! A call hands its [`Entry`] over a bounded channel and goes on; formatting
//! and writing happen on the writer thread. When the writer falls behind
//! (a slow disk) and the channel is full, entries are dropped and counted
//! (`weir_access_log_dropped_total`), never waited for. `reopen` (SIGHUP)
//! makes the writer flush and open the path again, for log rotation by
//! rename: nothing written before it is lost.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// What one call leaves in the access log: serialized as its line, straight
/// into the writer's buffer (no intermediate JSON tree: the writer thread
/// shares two cores with calls).
#[derive(serde::Serialize)]
pub struct Entry {
    /// When the call arrived.
    #[serde(serialize_with = "rfc3339_millis")]
    pub time: SystemTime,
    pub client: Option<SocketAddr>,
    #[serde(serialize_with = "path_only")]
    pub path: Option<http::uri::PathAndQuery>,
    /// The route's `match`, if a route matched.
    pub route: Option<Arc<str>>,
    pub service: Option<Arc<str>>,
    /// The backend of the last attempt.
    pub backend: Option<Arc<str>>,
    pub policy: Option<Arc<str>>,
    /// The policy version that placed the call (its digest's first 12
    /// characters), and whether it was the rollout's candidate.
    pub policy_version: Option<String>,
    #[serde(rename = "grpc_status")]
    pub status: u32,
    #[serde(rename = "duration_ms", serialize_with = "milliseconds")]
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub attempts: u32,
}

fn rfc3339_millis<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

fn path_only<S: serde::Serializer>(
    path: &Option<http::uri::PathAndQuery>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(path.as_ref().map_or("", |p| p.path()))
}

/// Milliseconds, to the microsecond.
fn milliseconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

/// An entry to write, or `None`: look at the reopen flag now.
type Message = Option<Entry>;

/// The handle calls log through; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    sender: SyncSender<Message>,
    reopen: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
    /// Says the writer has written everything and stopped.
    stopped: Arc<std::sync::Mutex<Option<Receiver<()>>>>,
    metrics: AccessLogMetrics,
}

/// While calls keep coming, the writer writes their lines this often.
const BATCH_EVERY: Duration = Duration::from_millis(20);

/// Bytes of lines gathered before a write: small enough to stay in the
/// writer's cache (a larger buffer measured no better).
const WRITE_BUFFER: usize = 16 << 10;

/// How long `close` waits for the writer to catch up.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Default)]
struct AccessLogMetrics {
    lines: Counter,
    dropped: Counter,
    write_errors: Counter,
}

/// Where the lines go.
enum Sink {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File(PathBuf, std::io::BufWriter<std::fs::File>),
}

impl Sink {
    fn open(path: Option<&PathBuf>) -> std::io::Result<Sink> {
        Ok(match path {
            None => Sink::Stdout(std::io::BufWriter::with_capacity(
                WRITE_BUFFER,
                std::io::stdout(),
            )),
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                Sink::File(
                    path.clone(),
                    std::io::BufWriter::with_capacity(WRITE_BUFFER, file),
                )
            }
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File(_, w) => w,
        }
    }
}

impl AccessLog {
    /// Opens the log at `path` (stdout if none; an unwritable path is an
    /// error now, not later) and starts its writer thread, which ends when
    /// the last handle is dropped. `buffer`: entries that may wait for it.
    pub fn start(
        path: Option<PathBuf>,
        buffer: usize,
        registry: &mut Registry,
    ) -> std::io::Result<AccessLog> {
        let sink = Sink::open(path.as_ref())?;
        let metrics = AccessLogMetrics::default();
        let r = registry.sub_registry_with_prefix("weir_access_log");
        r.register("lines", "access log lines written", metrics.lines.clone());
        r.register(
            "dropped",
            "access log entries dropped because the writer fell behind",
            metrics.dropped.clone(),
        );
        r.register(
            "write_errors",
            "failed writes or reopens of the access log",
            metrics.write_errors.clone(),
        );
        let (sender, receiver) = std::sync::mpsc::sync_channel(buffer.max(1));
        let reopen = Arc::new(AtomicBool::new(false));
        let closing = Arc::new(AtomicBool::new(false));
        let (stop_signal, stopped) = std::sync::mpsc::channel();
        let writer = Writer {
            sink,
            receiver,
            reopen: reopen.clone(),
            closing: closing.clone(),
            metrics: metrics.clone(),
            line: Vec::with_capacity(1024),
        };
        std::thread::Builder::new()
            .name("weir-access-log".into())
            .spawn(move || {
                writer.run();
                let _ = stop_signal.send(());
            })?;
        Ok(AccessLog {
            sender,
            reopen,
            closing,
            stopped: Arc::new(std::sync::Mutex::new(Some(stopped))),
            metrics,
        })
    }

    /// Hands `entry` to the writer; drops it (counted) if the writer is behind.
    pub fn record(&self, entry: Entry) {
        match self.sender.try_send(Some(entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.dropped.inc();
            }
        }
    }

    /// Writes out every entry handed over so far and stops the writer
    /// (the end of a shutdown: the calls cut off by the drain timeout are
    /// in the log too). Blocks up to [`CLOSE_WAIT`].
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.sender.send(None); // behind every entry already queued
        let stopped = self.stopped.lock().expect("access log").take();
        if let Some(stopped) = stopped {
            if stopped.recv_timeout(CLOSE_WAIT).is_err() {
                tracing::warn!("access log: the writer did not finish within {CLOSE_WAIT:?}");
            }
        }
    }

    /// Asks the writer to flush and open its path again (after a rotation).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
        // A full channel wakes the writer anyway; it checks the flag each line.
        let _ = self.sender.try_send(None);
    }
}

struct Writer {
    sink: Sink,
    receiver: Receiver<Message>,
    reopen: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
    metrics: AccessLogMetrics,
    /// The line being written.
    line: Vec<u8>,
}

impl Writer {
    /// Writes what comes, flushing whenever nothing more is waiting: one
    /// write per batch under load, each line out at once when calls are few.
    fn run(mut self) {
        // Idle, it waits for an entry (a sender wakes it). Busy, it sleeps
        // between batches instead: a writer blocked in `recv` would be
        // woken by every call (a futex wake each), one not waiting costs
        // the calls nothing.
        while let Ok(first) = self.receiver.recv() {
            let mut next = Some(first);
            loop {
                while let Some(message) = next {
                    if self.reopen.swap(false, Ordering::SeqCst) {
                        self.flush();
                        self.reopen_sink();
                    }
                    match message {
                        Some(entry) => self.write(&entry),
                        // `close`'s mark: everything before it is written.
                        None if self.closing.load(Ordering::SeqCst) => {
                            self.flush();
                            return;
                        }
                        None => {}
                    }
                    next = self.receiver.try_recv().ok();
                }
                self.flush();
                std::thread::sleep(BATCH_EVERY);
                next = self.receiver.try_recv().ok();
                if next.is_none() {
                    break; // quiet: back to waiting
                }
            }
        }
        self.flush();
    }

    fn write(&mut self, entry: &Entry) {
        // Serialized whole into a buffer of its own, then handed over in
        // one write: serde's many small writes stay inlined.
        self.line.clear();
        if let Err(err) = serde_json::to_writer(&mut self.line, entry) {
            return self.failed("write", &err.into());
        }
        self.line.push(b'\n');
        match self.sink.writer().write_all(&self.line) {
            Ok(()) => {
                self.metrics.lines.inc();
            }
            Err(err) => self.failed("write", &err),
        }
    }

    fn flush(&mut self) {
        if let Err(err) = self.sink.writer().flush() {
            self.failed("flush", &err);
        }
    }

    fn reopen_sink(&mut self) {
        let Sink::File(path, _) = &self.sink else {
            return; // stdout has nothing to reopen
        };
        let path = path.clone();
        match Sink::open(Some(&path)) {
            Ok(sink) => {
                self.sink = sink;
                tracing::info!(path = %path.display(), "access log reopened");
            }
            Err(err) => self.failed("reopen", &err),
        }
    }

    fn failed(&self, what: &str, err: &std::io::Error) {
        self.metrics.write_errors.inc();
        tracing::warn!(what, cause = %err, "access log");
    }
}
