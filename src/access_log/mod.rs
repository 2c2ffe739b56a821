//! The access log: one JSON line per WebSocket session, per plain HTTP request, and per connection that got no
//! request through ([`line`] builds them). Sessions hand their lines over without waiting, through a bounded
//! queue, to one writer thread that appends them to stdout or to a file (`[server] access_log`); it is not the
//! `tracing` subscriber, which carries the operational log on stderr.
//!
//! The writer writes whole lines only (a batch of what is queued, one `write` when the file takes it all): with
//! `O_APPEND`, lines never interleave, whoever else appends to the file. Files are opened where the setting
//! changes (at start, on reload, on SIGUSR1), never by the writer, so that a file that cannot be opened is said at
//! once; the writer only swaps in what it is handed. A full queue (a destination that stopped taking lines) drops
//! lines rather than stall a session; drops and write errors are logged at most once a minute.
//!
//! Not here: what goes into a line (the session fills [`crate::observe::ConnectionRecord`]).

pub mod line;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config::AccessLogTarget;

/// Lines queued for the writer at most; beyond, new lines are dropped (and counted).
const QUEUE_LINES: usize = 8192;
/// The most bytes the writer gathers into one write.
const MAX_BATCH: usize = 64 * 1024;
/// How often a failing destination is reported.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// How long the end of the process waits for queued lines to be written.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// Permissions of an access log file wsgate creates (before the umask).
const FILE_MODE: u32 = 0o640;

/// Why the access log cannot go where it is configured to.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the access log {}: {source}", path.display())]
pub struct OpenError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// The access log as sessions see it: whether it is on, and where to hand a line.
#[derive(Debug)]
pub struct AccessLog {
    /// `None` for a log that never writes (in unit tests).
    sender: Option<SyncSender<Msg>>,
    enabled: AtomicBool,
    /// The target in force, to tell a reload that changes it from one that does not.
    target: ArcSwap<AccessLogTarget>,
    shared: Arc<WriterShared>,
}

/// What the writer thread and the handle share.
#[derive(Debug, Default)]
struct WriterShared {
    /// A destination opened for the writer to take up before its next write.
    next: ArcSwapOption<Destination>,
    /// Lines dropped on a full queue since the writer last said so.
    dropped: AtomicU64,
    /// The same, since start (`wsgate_access_log_lines_dropped_total`).
    dropped_total: AtomicU64,
}

#[derive(Debug)]
enum Msg {
    Line(Vec<u8>),
    /// Lines from now on go here (a reload, a reopen): the lines queued before it go where they were meant to.
    Switch(Arc<Destination>),
    /// Write what is queued and stop (the process ends); answered when done.
    Stop(std::sync::mpsc::Sender<()>),
}

/// Where lines are written.
#[derive(Debug)]
enum Destination {
    Stdout,
    Off,
    File { path: PathBuf, file: File },
}

impl Destination {
    fn open(target: &AccessLogTarget) -> Result<Destination, OpenError> {
        Ok(match target {
            AccessLogTarget::Stdout => Destination::Stdout,
            AccessLogTarget::Off => Destination::Off,
            AccessLogTarget::File(path) => Destination::File {
                path: path.clone(),
                file: open_file(path)?,
            },
        })
    }

    fn write(&self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Destination::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Destination::Off => Ok(()),
            Destination::File { file, .. } => {
                let mut file: &File = file;
                file.write_all(bytes)
            }
        }
    }

    fn name(&self) -> String {
        match self {
            Destination::Stdout => "stdout".into(),
            Destination::Off => "off".into(),
            Destination::File { path, .. } => path.display().to_string(),
        }
    }
}

/// Opens (creating it when missing) an access log file for appending.
fn open_file(path: &Path) -> Result<File, OpenError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|source| OpenError {
            path: path.to_path_buf(),
            source,
        })
}

/// The writer thread of a started access log, joined by [`AccessLog::stop`].
#[derive(Debug)]
pub struct Writer(JoinHandle<()>);

impl AccessLog {
    /// Opens `target` and starts the writer thread.
    pub fn start(target: &AccessLogTarget) -> Result<(Arc<AccessLog>, Writer), StartError> {
        let destination = Destination::open(target)?;
        let (sender, queue) = sync_channel(QUEUE_LINES);
        let shared = Arc::new(WriterShared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("wsgate-access-log".into())
                .spawn(move || write_lines(queue, destination, &shared))
                .map_err(StartError::Thread)?
        };
        let log = AccessLog {
            sender: Some(sender),
            enabled: AtomicBool::new(*target != AccessLogTarget::Off),
            target: ArcSwap::from_pointee(target.clone()),
            shared,
        };
        Ok((Arc::new(log), Writer(thread)))
    }

    /// A log that writes nothing and has no thread.
    #[cfg(test)]
    pub fn off() -> AccessLog {
        AccessLog {
            sender: None,
            enabled: AtomicBool::new(false),
            target: ArcSwap::from_pointee(AccessLogTarget::Off),
            shared: Arc::default(),
        }
    }

    /// Whether lines are wanted (sessions build none when not).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Lines dropped on a full queue since start.
    pub fn dropped_total(&self) -> u64 {
        self.shared.dropped_total.load(Ordering::Relaxed)
    }

    /// Hands a line (one JSON object and its newline) to the writer, without waiting: dropped when the queue is
    /// full.
    pub fn write(&self, line: Vec<u8>) {
        let Some(sender) = &self.sender else { return };
        if let Err(TrySendError::Full(_)) = sender.try_send(Msg::Line(line)) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            self.shared.dropped_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends lines to `target` from now on (a reload); nothing changes when it is the target in force. On an error
    /// the log goes on where it was.
    pub fn retarget(&self, target: &AccessLogTarget) -> Result<(), OpenError> {
        if **self.target.load() == *target {
            return Ok(());
        }
        self.hand_over(Destination::open(target)?);
        self.target.store(Arc::new(target.clone()));
        self.enabled.store(*target != AccessLogTarget::Off, Ordering::Relaxed);
        tracing::info!(access_log = %target_name(target), "access log target changed");
        Ok(())
    }

    /// Opens the file again by its name (SIGUSR1, after logrotate has renamed it): the lines after this go to the
    /// new file. Nothing to do for stdout. On an error the log goes on in the file it had.
    pub fn reopen(&self) -> Result<(), OpenError> {
        let target = self.target.load();
        if let AccessLogTarget::File(path) = &**target {
            self.hand_over(Destination::File {
                path: path.clone(),
                file: open_file(path)?,
            });
            tracing::info!(access_log = %path.display(), "access log reopened");
        }
        Ok(())
    }

    fn hand_over(&self, destination: Destination) {
        let destination = Arc::new(destination);
        if let Some(sender) = &self.sender
            && let Err(TrySendError::Full(_)) = sender.try_send(Msg::Switch(destination.clone()))
        {
            // A full queue has the writer busy: it takes the new destination up before its next write.
            self.shared.next.store(Some(destination));
        }
    }

    /// Writes what is queued and stops the writer, waiting for it a short while at most (a destination that
    /// takes nothing must not hold up the end of the process).
    pub fn stop(&self, writer: Writer) {
        let Some(sender) = &self.sender else { return };
        let (done, finished) = std::sync::mpsc::channel();
        let mut message = Msg::Stop(done);
        let tries = STOP_WAIT.as_millis() / 10;
        for _ in 0..tries {
            match sender.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        if finished.recv_timeout(STOP_WAIT).is_ok() {
            let _ = writer.0.join();
        }
    }
}

/// Why the access log did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot start the access log thread: {0}")]
    Thread(#[source] io::Error),
}

fn target_name(target: &AccessLogTarget) -> String {
    match target {
        AccessLogTarget::Stdout => "stdout".into(),
        AccessLogTarget::Off => "off".into(),
        AccessLogTarget::File(path) => path.display().to_string(),
    }
}

/// The writer thread. Idle, it waits on the queue; once a line has come, it sleeps [`BUSY_TICK`] between batches
/// instead, taking up everything queued meanwhile, for as long as lines keep coming: a session handing over a line
/// then never has to wake it (no system call per line on a busy proxy), and a busy log is one write per tick. Ends on
/// [`Msg::Stop`] or when every handle is gone.
fn write_lines(queue: Receiver<Msg>, first: Destination, shared: &WriterShared) {
    let mut destination = Arc::new(first);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut trouble = Trouble::default();
    let mut idle = true;
    loop {
        let mut stop = None;
        let mut taken = 0;
        if idle {
            match queue.recv() {
                Ok(message) => {
                    taken += 1;
                    stop = take(message, &mut batch, &mut destination, shared, &mut trouble);
                }
                Err(_) => return,
            }
        } else {
            std::thread::sleep(BUSY_TICK);
        }
        // Everything queued now, written in batches of MAX_BATCH.
        while stop.is_none() {
            match queue.try_recv() {
                Ok(message) => {
                    taken += 1;
                    stop = take(message, &mut batch, &mut destination, shared, &mut trouble);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    flush(&mut batch, &mut destination, shared, &mut trouble);
                    return;
                }
            }
            if batch.len() >= MAX_BATCH {
                flush(&mut batch, &mut destination, shared, &mut trouble);
            }
        }
        flush(&mut batch, &mut destination, shared, &mut trouble);
        trouble.dropped(shared.dropped.swap(0, Ordering::Relaxed));
        if let Some(done) = stop {
            let _ = done.send(());
            return;
        }
        idle = taken == 0;
    }
}

/// How long a busy writer sleeps between batches (and so the longest a line waits on a busy proxy).
const BUSY_TICK: Duration = Duration::from_millis(25);

/// Adds a line to the batch, or writes the batch where it was meant to go before a switch; a stop message is
/// handed back.
fn take(
    message: Msg,
    batch: &mut Vec<u8>,
    destination: &mut Arc<Destination>,
    shared: &WriterShared,
    trouble: &mut Trouble,
) -> Option<std::sync::mpsc::Sender<()>> {
    match message {
        Msg::Line(line) => batch.extend_from_slice(&line),
        Msg::Switch(next) => {
            flush(batch, destination, shared, trouble);
            *destination = next;
        }
        Msg::Stop(done) => return Some(done),
    }
    None
}

/// Writes the batch to the destination in force (taking up a new one first).
fn flush(batch: &mut Vec<u8>, destination: &mut Arc<Destination>, shared: &WriterShared, trouble: &mut Trouble) {
    if let Some(taken) = shared.next.swap(None) {
        *destination = taken;
    }
    if !batch.is_empty() {
        if let Err(e) = destination.write(batch) {
            let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
            trouble.failed(&destination.name(), &e, lines);
        }
        batch.clear();
    }
}

/// What went wrong since it was last said: said at once the first time, then at most every [`REPORT_EVERY`].
#[derive(Default)]
struct Trouble {
    last_said: Option<SystemTime>,
    lost: u64,
    dropped: u64,
}

impl Trouble {
    fn failed(&mut self, destination: &str, error: &io::Error, lines: u64) {
        self.lost += lines;
        if self.due() {
            tracing::error!(
                access_log = %destination,
                error = %error,
                lines_lost = self.lost,
                "cannot write the access log"
            );
            self.lost = 0;
        }
    }

    fn dropped(&mut self, lines: u64) {
        self.dropped += lines;
        if self.dropped > 0 && self.due() {
            tracing::warn!(
                lines_dropped = self.dropped,
                "access log lines dropped: its destination takes them slower than they come"
            );
            self.dropped = 0;
        }
    }

    /// Whether it is time to say something again (and, if so, notes that it is said now).
    fn due(&mut self) -> bool {
        let now = SystemTime::now();
        let due = self
            .last_said
            .is_none_or(|at| now.duration_since(at).map_or(true, |since| since >= REPORT_EVERY));
        if due {
            self.last_said = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wsgate-access-log-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        path
    }

    /// Waits (bounded) until `path` holds `lines` lines.
    fn wait_for_lines(path: &Path, lines: usize) -> String {
        for _ in 0..500 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= lines {
                return text;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{} never held {lines} lines", path.display());
    }

    #[test]
    fn lines_go_to_the_file_and_to_the_new_one_after_a_rename_and_reopen() {
        let path = temp_file("reopen");
        let (log, writer) = AccessLog::start(&AccessLogTarget::File(path.clone())).expect("start");
        log.write(b"{\"n\":1}\n".to_vec());
        wait_for_lines(&path, 1);
        let rotated = path.with_extension("log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        log.write(b"{\"n\":2}\n".to_vec());
        wait_for_lines(&rotated, 2);
        log.reopen().expect("reopen");
        log.write(b"{\"n\":3}\n".to_vec());
        assert_eq!(wait_for_lines(&path, 1), "{\"n\":3}\n");
        log.stop(writer);
        assert_eq!(
            std::fs::read_to_string(&rotated).expect("rotated"),
            "{\"n\":1}\n{\"n\":2}\n"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o077 & !0o040, 0, "not readable by others: {mode:o}");
    }

    #[test]
    fn a_retarget_switches_the_file_off_and_on() {
        let path = temp_file("retarget");
        let (log, writer) = AccessLog::start(&AccessLogTarget::Off).expect("start");
        assert!(!log.enabled());
        log.retarget(&AccessLogTarget::File(path.clone())).expect("retarget");
        assert!(log.enabled());
        log.write(b"a\n".to_vec());
        wait_for_lines(&path, 1);
        log.retarget(&AccessLogTarget::Off).expect("retarget");
        assert!(!log.enabled());
        let missing = AccessLogTarget::File(path.with_file_name("no-such-dir").join("x.log"));
        assert!(log.retarget(&missing).is_err(), "a file that cannot be opened");
        assert!(!log.enabled(), "the log stays as it was");
        log.stop(writer);
    }

    #[test]
    fn stop_writes_what_is_queued() {
        let path = temp_file("stop");
        let (log, writer) = AccessLog::start(&AccessLogTarget::File(path.clone())).expect("start");
        for i in 0..1000 {
            log.write(format!("{i}\n").into_bytes());
        }
        log.stop(writer);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(text.lines().last(), Some("999"));
    }
}
