//! The built `wsgate` binary in a child process, its output lines (the log on stderr, the access log on stdout)
//! forwarded to a channel that the test reads.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::process::Stdio;

use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::{unused_addr, within};

/// The built `wsgate`, with its stderr and stdout lines forwarded to one channel; killed when dropped.
pub struct Binary {
    pub child: Child,
    log: mpsc::UnboundedReceiver<String>,
}

impl Binary {
    /// Starts `wsgate ARGS`. It does not wait for anything: see [`Binary::wait_for_log`].
    pub fn spawn(args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Binary {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        command.args(args);
        Binary::run(command)
    }

    /// [`Binary::spawn`] with these environment variables set for it.
    pub fn spawn_with_env(args: impl IntoIterator<Item = impl AsRef<OsStr>>, env: &[(&str, &str)]) -> Binary {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        command.args(args).envs(env.iter().copied());
        Binary::run(command)
    }

    /// [`Binary::spawn`] with at most `limit` open files, soft and hard (as `ulimit -n` sets them), so that wsgate
    /// cannot raise its own.
    pub fn spawn_with_open_files(limit: u32, args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Binary {
        let mut command = Command::new("bash");
        command
            .args(["-c", r#"ulimit -n "$1" || exit 97; shift; exec "$@""#, "wsgate"])
            .arg(limit.to_string())
            .arg(env!("CARGO_BIN_EXE_wsgate"))
            .args(args);
        Binary::run(command)
    }

    fn run(mut command: Command) -> Binary {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start wsgate");
        let stderr = child.stderr.take().expect("stderr");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, log) = mpsc::unbounded_channel();
        forward_lines(stderr, tx.clone());
        forward_lines(stdout, tx);
        Binary { child, log }
    }

    /// The first access log line (a JSON object on stdout) for which `matches` holds (earlier lines are passed
    /// over), parsed, within [`super::WAIT`].
    pub async fn wait_for_access(&mut self, matches: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        within("an access log line", async {
            loop {
                let line = self.log.recv().await.expect("wsgate exited");
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                    && value.get("kind").is_some()
                    && matches(&value)
                {
                    return value;
                }
            }
        })
        .await
    }

    /// The first log line containing one of `needles` (earlier lines are passed over), within [`super::WAIT`].
    pub async fn wait_for_log(&mut self, needles: &[&str]) -> String {
        self.wait_for_log_within(super::WAIT, needles).await
    }

    /// [`Binary::wait_for_log`] within `limit` (for what takes longer by design, such as a lookup timing out).
    pub async fn wait_for_log_within(&mut self, limit: std::time::Duration, needles: &[&str]) -> String {
        let find = async {
            loop {
                let line = self.log.recv().await.expect("wsgate exited");
                if needles.iter().any(|n| line.contains(n)) {
                    return line;
                }
            }
        };
        match tokio::time::timeout(limit, find).await {
            Ok(line) => line,
            Err(_) => panic!("timed out after {limit:?} waiting for a log line with one of {needles:?}"),
        }
    }

    /// Every line still to come, until wsgate's output ends (after it has exited), within [`super::WAIT`].
    pub async fn rest_of_log(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        within("the end of wsgate's output", async {
            while let Some(line) = self.log.recv().await {
                lines.push(line);
            }
        })
        .await;
        lines
    }

    /// The log lines so far.
    pub fn drain_log(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.log.try_recv() {
            lines.push(line);
        }
        lines
    }

    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.child.id().expect("pid") as i32).expect("pid");
        kill_process(pid, signal).expect("signal");
    }

    /// Waits for the process to exit, within [`super::WAIT`]; its exit code (`None` if a signal ended it).
    pub async fn exit_code(&mut self) -> Option<i32> {
        within("wsgate to exit", self.child.wait()).await.expect("wait").code()
    }
}

/// Sends each line `output` gives to `tx`.
fn forward_lines(output: impl tokio::io::AsyncRead + Unpin + Send + 'static, tx: mpsc::UnboundedSender<String>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(output).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
}

/// The built `wsgate proxy` on a free loopback port in front of one backend, with JSON logs. It derefs to its
/// [`Binary`].
pub struct BinaryProxy {
    /// The address it listens on.
    pub addr: SocketAddr,
    binary: Binary,
}

impl BinaryProxy {
    /// `wsgate proxy --listen ADDR --to BACKEND --log-format json EXTRA..`, once it has logged "listening".
    pub async fn start(backend: SocketAddr, extra: &[&str]) -> BinaryProxy {
        let addr = unused_addr();
        let (listen, to) = (addr.to_string(), backend.to_string());
        let args = ["proxy", "--listen", &listen, "--to", &to, "--log-format", "json"];
        let mut binary = Binary::spawn(args.iter().chain(extra));
        binary.wait_for_log(&["listening"]).await;
        BinaryProxy { addr, binary }
    }
}

impl Deref for BinaryProxy {
    type Target = Binary;

    fn deref(&self) -> &Binary {
        &self.binary
    }
}

impl DerefMut for BinaryProxy {
    fn deref_mut(&mut self) -> &mut Binary {
        &mut self.binary
    }
}
