//! wsgate between real, independent WebSocket implementations running as separate processes on 127.0.0.1:
//! Python `websockets` (client and backend, with permessage-deflate) and Tomcat 10 (JSR 356 backend, plus its
//! plain HTTP pages). The peers are installed by `scripts/test`; when one is missing the test fails and says so.

mod support;

use support::*;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes as WsBytes, Message};

/// The Python client's whole run (it bounds each of its own waits much lower).
const PYTHON_CLIENT_WAIT: Duration = Duration::from_secs(60);
/// How long a private Tomcat may take to deploy the examples and echo on a WebSocket.
const TOMCAT_READY_WAIT: Duration = Duration::from_secs(90);

const TOMCAT_HOME: &str = "/usr/share/tomcat10";
const TOMCAT_EXAMPLES: &str = "/usr/share/tomcat10-examples/examples";

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------------------------
// Python websockets, permessage-deflate
// ---------------------------------------------------------------------------------------------------------------

/// Fails the test (it does not skip) when Python `websockets` 17 or later cannot be imported.
fn require_python_websockets() {
    let check = "import sys, websockets; v = websockets.__version__; \
                 int(v.split('.')[0]) >= 17 or sys.exit(f'websockets {v} is older than 17')";
    match std::process::Command::new("python3").args(["-c", check]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "Python `websockets` 17 or later is not installed for python3 ({}). Run scripts/test, which \
             installs the test peers.",
            text_of(&out.stderr).trim()
        ),
        Err(e) => {
            panic!("cannot run python3 ({e}). Run scripts/test on a machine with Python 3.11.")
        }
    }
}

#[tokio::test]
async fn permessage_deflate_negotiates_end_to_end_with_python_websockets() {
    require_python_websockets();
    let mut backend = tokio::process::Command::new("python3")
        .arg(peers_dir().join("deflate_backend.py"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn python3 deflate_backend.py");
    let stdout = backend.stdout.take().expect("backend stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = within("the Python backend to print its port", lines.next_line())
        .await
        .expect("read the backend's stdout");
    let Some(line) = line else {
        backend.start_kill().ok();
        let out = within("the Python backend to exit", backend.wait_with_output())
            .await
            .expect("backend output");
        panic!(
            "the Python backend exited without printing its port: {}\n{}",
            out.status,
            text_of(&out.stderr)
        );
    };
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the Python backend printed {line:?}, not a port"));
    let proxy = Proxy::start(&[SocketAddr::from(([127, 0, 0, 1], port))]);

    let client = tokio::process::Command::new("python3")
        .arg(peers_dir().join("deflate_client.py"))
        .arg(proxy.addr.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(PYTHON_CLIENT_WAIT, client).await {
        Ok(out) => out.expect("run python3 deflate_client.py"),
        Err(_) => panic!("the Python client did not finish within {PYTHON_CLIENT_WAIT:?}"),
    };
    let report = format!(
        "client {}\n--- client stdout ---\n{}--- client stderr ---\n{}",
        out.status,
        text_of(&out.stdout),
        text_of(&out.stderr)
    );
    if !out.status.success() {
        backend.start_kill().ok();
        let backend_out = within("the Python backend to exit", backend.wait_with_output())
            .await
            .expect("backend output");
        panic!(
            "the Python client failed through wsgate:\n{report}--- backend stderr ---\n{}",
            text_of(&backend_out.stderr)
        );
    }
    println!("{report}");
}

// ---------------------------------------------------------------------------------------------------------------
// Tomcat 10 (JSR 356)
// ---------------------------------------------------------------------------------------------------------------

/// A private Tomcat: its own `CATALINA_BASE` under the target's temp folder, one HTTP connector on a free
/// loopback port, the examples webapp mounted. Dropping it kills Tomcat's whole process group and deletes the
/// folder (kept, with its logs, when the test is failing).
struct Tomcat {
    base: PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl Tomcat {
    fn start() -> Tomcat {
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

    fn catalina_out(&self) -> PathBuf {
        self.base.join("logs/catalina.out")
    }

    fn echo_url(&self) -> String {
        format!("ws://127.0.0.1:{}/examples/websocket/echoAnnotation", self.port)
    }

    /// The last `lines` lines of catalina.out.
    fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.catalina_out()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until a WebSocket on Tomcat itself echoes, failing with the log's tail if that does not happen in
    /// [`TOMCAT_READY_WAIT`] or Tomcat exits.
    async fn wait_ready(&mut self) -> Duration {
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
fn unique_temp_dir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("peers-{what}-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// One HTTP/1.1 connector on 127.0.0.1:`port`, no shutdown port, the examples deployed from their descriptor.
fn server_xml(port: u16) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by tests/peers.rs for one test run. -->
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
async fn echo_once(url: &str) -> Result<(), String> {
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

/// A text of exactly `len` bytes, mixing one- and multi-byte characters so that a 16-bit length and Tomcat's
/// partial messages both get exercised.
fn long_text(len: usize) -> String {
    let mut s = String::with_capacity(len);
    let pattern = ['a', 'b', 'é', 'ü', '€', 'z', '0', '✓'];
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

/// Text and binary echo (small and 70 000-byte messages, and a ping) on `path` through the proxy.
async fn check_echo(proxy: &Proxy, path: &str) {
    let mut ws = connect(&proxy.url(path)).await;
    let big = long_text(70_000);
    assert_eq!(big.len(), 70_000);
    for text in ["hello Tomcat", "ünïcødé ✓", big.as_str(), "after the big one"] {
        ws.send(Message::text(text)).await.expect("send text");
        let echo = next_text(&mut ws).await;
        assert!(
            echo == text,
            "{path}: text echo of {} bytes came back as {} bytes",
            text.len(),
            echo.len()
        );
    }
    let binary: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for payload in [vec![0u8, 1, 2, 255, 254], binary] {
        ws.send(Message::binary(payload.clone())).await.expect("send binary");
        match next_message(&mut ws).await {
            Message::Binary(b) => assert!(
                b[..] == payload[..],
                "{path}: binary echo of {} bytes came back as {} different bytes",
                payload.len(),
                b.len()
            ),
            other => panic!("{path}: expected a binary echo, got {other:?}"),
        }
    }
    // Tomcat answers a ping by itself.
    ws.send(Message::Ping(WsBytes::from_static(b"are you there")))
        .await
        .expect("send ping");
    match within("Tomcat's pong", ws.next()).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"are you there", "{path}: pong payload"),
        Some(Ok(other)) => panic!("{path}: expected a pong, got {other:?}"),
        Some(Err(e)) => panic!("{path}: client error waiting for the pong: {e}"),
        None => panic!("{path}: closed while waiting for the pong"),
    }
    close_normally(ws, path).await;
}

/// Sends a close with code 1000 and expects Tomcat's close (code 1000) back, then the end of the connection.
async fn close_normally(mut ws: Client, path: &str) {
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .expect("send close");
    let answer = within("Tomcat's close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("{path}: expected a close frame, got {other:?}"),
                Some(Err(e)) => panic!("{path}: client error waiting for the close: {e}"),
                None => panic!("{path}: connection ended without a close frame"),
            }
        }
    })
    .await;
    let code = answer.as_ref().map(|f| u16::from(f.code));
    assert_eq!(code, Some(1000), "{path}: close answered with {answer:?}");
    within("the connection to end after the close", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// A plain HTTP/1.1 request through the proxy; returns the status code and the whole response.
async fn http_request(proxy: &Proxy, request: &str) -> (u16, String) {
    let response = raw_exchange(proxy.addr, request.as_bytes()).await;
    let status = response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {response:?}"));
    (status, response)
}

#[tokio::test]
async fn tomcat_jsr356_echo_through_wsgate() {
    let test_started = Instant::now();
    let mut tomcat = Tomcat::start();
    let ready_after = tomcat.wait_ready().await;
    println!("Tomcat ready after {ready_after:.1?}");
    let proxy = Proxy::start(&[SocketAddr::from(([127, 0, 0, 1], tomcat.port))]);

    check_echo(&proxy, "/examples/websocket/echoAnnotation").await;
    check_echo(&proxy, "/examples/websocket/echoProgrammatic").await;

    // Plain HTTP through wsgate: a static page and a servlet, GET and POST.
    let host = format!("127.0.0.1:{}", proxy.addr.port());
    let (status, page) = http_request(
        &proxy,
        &format!("GET /examples/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "GET /examples/ through wsgate:\n{page}");
    assert!(
        page.contains("Apache Tomcat Examples"),
        "GET /examples/ is not the examples index:\n{page}"
    );

    let (status, page) = http_request(
        &proxy,
        &format!(
            "GET /examples/servlets/servlet/RequestParamExample?firstname=Ada&lastname=Lovelace HTTP/1.1\r\n\
             Host: {host}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "GET RequestParamExample through wsgate:\n{page}");
    assert!(
        page.contains("Ada") && page.contains("Lovelace"),
        "the servlet did not see the query parameters:\n{page}"
    );

    let form = "firstname=Grace&lastname=Hopper";
    let (status, page) = http_request(
        &proxy,
        &format!(
            "POST /examples/servlets/servlet/RequestParamExample HTTP/1.1\r\nHost: {host}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{form}",
            form.len()
        ),
    )
    .await;
    assert_eq!(status, 200, "POST RequestParamExample through wsgate:\n{page}");
    assert!(
        page.contains("Grace") && page.contains("Hopper"),
        "the servlet did not see the posted form:\n{page}"
    );

    println!(
        "Tomcat test took {:.1?} in all ({ready_after:.1?} of it waiting for Tomcat)",
        test_started.elapsed()
    );
    drop(proxy);
    drop(tomcat);
}
