//! Real peers in their own processes: a private Tomcat 10 (JSR 356 examples) per test, Python `websockets` and
//! Node `ws` client scripts, and checks that fail (they do not skip) when one is missing. `scripts/test` installs
//! them all.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{text_of, unused_addr, within};

/// The Python and Node scripts of the peers tests (tests/peers).
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// The client scripts of the frames-mode tests (tests/frames_peers, Node's `ws` in its node_modules).
pub fn frames_peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/frames_peers")
}

/// Fails the test (it does not skip) when Python `websockets` 17 or later cannot be imported.
pub fn require_python_websockets() {
    let check = "import sys, websockets; v = websockets.__version__; \
                 int(v.split('.')[0]) >= 17 or sys.exit(f'websockets {v} is older than 17')";
    match std::process::Command::new("python3").args(["-c", check]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "Python `websockets` 17 or later is not installed for python3 ({}). Run scripts/test, which \
             installs the test peers.",
            text_of(&out.stderr).trim()
        ),
        Err(e) => panic!("cannot run python3 ({e}). Run scripts/test on a machine with Python 3.11."),
    }
}

/// Fails the test when Node or its `ws` package is missing.
pub fn require_node_ws() {
    let ws = frames_peers_dir().join("node_modules/ws/package.json");
    assert!(
        ws.is_file(),
        "Node's `ws` package is not installed ({} is missing). Run scripts/test, which installs it with \
         `npm install --prefix tests/frames_peers`.",
        ws.display()
    );
    if let Err(e) = std::process::Command::new("node").arg("--version").output() {
        panic!("cannot run node ({e}). Run scripts/test on a machine with Node.");
    }
}

/// A client script of tests/frames_peers in its own process, its stdout read line by line.
pub struct Script {
    pub name: &'static str,
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Script {
    pub fn start(name: &'static str, program: &str, script: &str, url: &str) -> Script {
        let mut child = Command::new(program)
            .arg(frames_peers_dir().join(script))
            .arg(url)
            .current_dir(frames_peers_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} {script}: {e}"));
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Script { name, child, lines }
    }

    pub async fn line(&mut self) -> String {
        let name = self.name;
        within(&format!("a line from the {name} client"), self.lines.next_line())
            .await
            .expect("read the client's stdout")
            .unwrap_or_else(|| panic!("the {name} client exited early"))
    }

    pub async fn exit_ok(&mut self) {
        let status = within("the client to exit", self.child.wait()).await.expect("wait");
        assert!(status.success(), "the {} client exited with {status}", self.name);
    }
}

/// How long a private Tomcat may take to deploy the examples and echo on a WebSocket.
pub const TOMCAT_READY_WAIT: Duration = Duration::from_secs(90);

pub const TOMCAT_HOME: &str = "/usr/share/tomcat10";
pub const TOMCAT_EXAMPLES: &str = "/usr/share/tomcat10-examples/examples";

/// A private Tomcat: its own `CATALINA_BASE` under the target's temp folder, one HTTP connector on a free
/// loopback port, the examples webapp mounted. Dropping it kills Tomcat's whole process group and deletes the
/// folder (kept, with its logs, when the test is failing).
pub struct Tomcat {
    base: PathBuf,
    pub port: u16,
    pub child: Option<std::process::Child>,
}

impl Tomcat {
    pub fn start() -> Tomcat {
        let catalina = Path::new(TOMCAT_HOME).join("bin/catalina.sh");
        let etc = Path::new(TOMCAT_HOME).join("etc");
        assert!(
            catalina.is_file() && etc.is_dir() && Path::new(TOMCAT_EXAMPLES).is_dir(),
            "Tomcat 10 is not installed ({} or {TOMCAT_EXAMPLES} is missing). Run scripts/test, which installs \
             the tomcat10 and tomcat10-examples packages.",
            catalina.display()
        );

        let base = unique_temp_dir("tomcat");
        let mut tomcat = Tomcat {
            base: base.clone(),
            port: 0,
            child: None,
        };
        for dir in ["conf/Catalina/localhost", "logs", "work", "webapps", "temp"] {
            fs::create_dir_all(base.join(dir)).expect("create CATALINA_BASE folders");
        }
        for file in ["web.xml", "catalina.properties", "context.xml", "logging.properties"] {
            fs::copy(etc.join(file), base.join("conf").join(file))
                .unwrap_or_else(|e| panic!("copy {}/{file}: {e}", etc.display()));
        }
        // A free port: bound, read and released just before Tomcat binds it.
        tomcat.port = unused_addr().port();
        fs::write(base.join("conf/server.xml"), server_xml(tomcat.port)).expect("server.xml");
        fs::write(
            base.join("conf/Catalina/localhost/examples.xml"),
            format!("<Context docBase=\"{TOMCAT_EXAMPLES}\"/>\n"),
        )
        .expect("examples.xml");

        let log = fs::File::create(tomcat.catalina_out()).expect("create catalina.out");
        let child = {
            use std::os::unix::process::CommandExt as _;
            std::process::Command::new(&catalina)
                .arg("run")
                .env("CATALINA_HOME", TOMCAT_HOME)
                .env("CATALINA_BASE", &base)
                .env("CATALINA_TMPDIR", base.join("temp"))
                .env("JAVA_OPTS", "-Xmx768m")
                .env_remove("CATALINA_OPTS")
                .env_remove("CATALINA_PID")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log handle"))
                .stderr(log)
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", catalina.display()))
        };
        tomcat.child = Some(child);
        tomcat
    }

    pub fn catalina_out(&self) -> PathBuf {
        self.base.join("logs/catalina.out")
    }

    pub fn echo_url(&self) -> String {
        format!("ws://127.0.0.1:{}/examples/websocket/echoAnnotation", self.port)
    }

    /// The last `lines` lines of catalina.out.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.catalina_out()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until a WebSocket on Tomcat itself echoes, failing with the log's tail if that does not happen in
    /// [`TOMCAT_READY_WAIT`] or Tomcat exits.
    pub async fn wait_ready(&mut self) -> Duration {
        let started = Instant::now();
        let url = self.echo_url();
        let mut last_error = String::from("no attempt yet");
        while started.elapsed() < TOMCAT_READY_WAIT {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "Tomcat exited ({status}) before it was ready. Tail of {}:\n{}",
                    self.catalina_out().display(),
                    self.log_tail(60)
                );
            }
            match tokio::time::timeout(Duration::from_secs(5), echo_once(&url)).await {
                Ok(Ok(())) => return started.elapsed(),
                Ok(Err(e)) => last_error = e,
                Err(_) => last_error = "the probe timed out after 5 s".into(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "Tomcat did not echo on {url} within {TOMCAT_READY_WAIT:?} (last error: {last_error}). Tail of {}:\n{}",
            self.catalina_out().display(),
            self.log_tail(60)
        );
    }
}

impl Drop for Tomcat {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "Tomcat's CATALINA_BASE (logs in logs/) is kept in {}",
                self.base.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.base);
        }
    }
}

/// A fresh, empty folder under Cargo's temp folder for integration tests.
pub fn unique_temp_dir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{what}-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// One HTTP/1.1 connector on 127.0.0.1:`port`, no shutdown port, the examples deployed from their descriptor.
pub fn server_xml(port: u16) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by tests/support/peers.rs for one test run. -->
<Server port="-1" shutdown="SHUTDOWN">
  <Listener className="org.apache.catalina.startup.VersionLoggerListener" />
  <Listener className="org.apache.catalina.core.JreMemoryLeakPreventionListener" />
  <Listener className="org.apache.catalina.core.ThreadLocalLeakPreventionListener" />
  <Service name="Catalina">
    <Connector address="127.0.0.1" port="{port}" protocol="HTTP/1.1"
               connectionTimeout="20000" maxParameterCount="1000" />
    <Engine name="Catalina" defaultHost="localhost">
      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false">
        <Valve className="org.apache.catalina.valves.AccessLogValve" directory="logs"
               prefix="localhost_access_log" suffix=".txt"
               pattern="%h %l %u %t &quot;%r&quot; %s %b" />
      </Host>
    </Engine>
  </Service>
</Server>
"#
    )
}

/// Connects to `url`, sends one text message and waits for it to come back.
pub async fn echo_once(url: &str) -> Result<(), String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    ws.send(Message::text("ready?"))
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == "ready?" => break,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => return Err(format!("unexpected answer {other:?}")),
            Some(Err(e)) => return Err(format!("receive: {e}")),
            None => return Err("closed without an echo".into()),
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// A text of exactly `len` bytes, mixing one- and multi-byte characters so that UTF-8 validation meets code points
/// split across reads and Tomcat's partial messages.
pub fn long_text(len: usize) -> String {
    let mut s = String::with_capacity(len);
    let pattern = ['a', 'b', 'é', 'ü', '€', 'z', '0', '✓', '😀'];
    let mut i = 0;
    while s.len() + 4 <= len {
        s.push(pattern[i % pattern.len()]);
        i += 1;
    }
    while s.len() < len {
        s.push('.');
    }
    s
}
