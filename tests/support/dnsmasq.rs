//! A real DNS server for the tests: Debian's `dnsmasq` (package `dnsmasq-base`, which `scripts/test` installs),
//! private to one test: on a free loopback port, answering from a hosts file of the test's own (read again on
//! SIGHUP, see [`Dnsmasq::set_hosts`]) and from `--srv-host` lines (read only at start: [`Dnsmasq::restart_with_srv`]
//! starts it again on the same port), every record with a TTL of 1 s; killed when dropped.
//!
//! Names under `.test` are its own (`--local=/test/`): a type the hosts file lacks for such a name is answered
//! with no record (NOERROR), an unknown name with NXDOMAIN. Any other name would be forwarded, and with no upstream
//! server the query is refused (REFUSED): a name outside `.test` that the hosts file gives only an IPv6 address has
//! its A lookups fail while its AAAA lookups succeed.
//!
//! It is asked with queries built here by hand (no `dig` needed): [`Dnsmasq::a_records`] and
//! [`Dnsmasq::srv_records`] say what a resolver would be told.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::{TempDir, WAIT};

/// DNS record types asked for.
pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;

/// Response codes.
pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_REFUSED: u8 = 5;

/// The TTL of every record it serves.
pub const TTL_SECS: u32 = 1;

pub struct Dnsmasq {
    /// The port it answers on, UDP and TCP, at 127.0.0.1.
    pub port: u16,
    dir: TempDir,
    hosts: PathBuf,
    srv: Vec<String>,
    child: Option<Child>,
}

/// An SRV record as answered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// Without the final dot.
    pub target: String,
}

/// What it answered to one query.
#[derive(Debug)]
pub struct Answer {
    /// The response code (0: no error, 3: no such name, 5: refused).
    pub rcode: u8,
    /// The answer section's records: type, data (names in it may point elsewhere in the message) and where
    /// the data starts in the message.
    pub records: Vec<(u16, Vec<u8>, usize)>,
    /// The whole message, for data that points back into it.
    message: Vec<u8>,
}

impl Dnsmasq {
    /// Starts one that answers from `hosts` (the text of a hosts file: `ADDRESS NAME…` lines) and the `srv`
    /// lines (`--srv-host` values: `_service._proto.NAME,TARGET,PORT,PRIORITY,WEIGHT`), and waits until it
    /// answers. Fails the test when `dnsmasq` is not installed.
    pub async fn start(name: &str, hosts: &str, srv: &[&str]) -> Dnsmasq {
        let dir = TempDir::new(&format!("dnsmasq-{name}"));
        // Started as root, dnsmasq runs as `nobody`, which must still read the hosts file on SIGHUP.
        set_mode(&dir.0, 0o755);
        let hosts_path = dir.join("hosts");
        let mut server = Dnsmasq {
            port: 0,
            hosts: hosts_path,
            dir,
            srv: srv.iter().map(ToString::to_string).collect(),
            child: None,
        };
        server.write_hosts(hosts);
        // A port found free may be taken before dnsmasq binds it: try a few.
        for attempt in 1.. {
            server.port = free_port();
            match server.run().await {
                Ok(()) => return server,
                Err(why) if attempt < 3 => eprintln!("dnsmasq did not start on port {}: {why}", server.port),
                Err(why) => panic!("dnsmasq did not start: {why}"),
            }
        }
        unreachable!()
    }

    /// Its address, for wsgate's `discovery.resolver`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Writes a new hosts file and has dnsmasq read it (SIGHUP) if it runs (else it reads it when started again).
    /// It answers from the new file once it has read it: wait for that with [`Dnsmasq::wait_for_a`].
    pub fn set_hosts(&self, hosts: &str) {
        self.write_hosts(hosts);
        if let Some(child) = &self.child {
            let pid = Pid::from_raw(child.id() as i32).expect("a pid");
            kill_process(pid, Signal::HUP).expect("SIGHUP to dnsmasq");
        }
    }

    /// Kills it at once, and waits until it is gone: queries to its port go unanswered (refused).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the hosts file as it is now and the same SRV lines.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(why) = self.run().await {
            panic!("dnsmasq did not start again on port {}: {why}", self.port);
        }
    }

    /// Starts it again on the same port with other SRV lines (dnsmasq reads them only at start).
    pub async fn restart_with_srv(&mut self, srv: &[&str]) {
        self.srv = srv.iter().map(ToString::to_string).collect();
        self.restart().await;
    }

    /// Asks it once for the `qtype` records of `name`; `None` when no answer came within half a second.
    pub async fn ask(&self, name: &str, qtype: u16) -> Option<Answer> {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("a UDP socket");
        let id = rand_id();
        socket.send_to(&query(id, name, qtype), self.addr()).await.ok()?;
        let mut buf = vec![0u8; 4096];
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Ok(Ok(n)) => n,
                // Refused (nothing listens) or timed out.
                Ok(Err(_)) | Err(_) => return None,
            };
            if let Some(answer) = parse(&buf[..n], id) {
                return Some(answer);
            }
        }
    }

    /// The IPv4 addresses it gives for `name` now (empty for none; `None` when it does not answer, or answers
    /// with an error).
    pub async fn a_records(&self, name: &str) -> Option<Vec<Ipv4Addr>> {
        let answer = self.ask(name, TYPE_A).await.filter(|a| a.rcode == RCODE_NOERROR)?;
        let mut ips: Vec<Ipv4Addr> = answer
            .records
            .iter()
            .filter(|(t, data, _)| *t == TYPE_A && data.len() == 4)
            .map(|(_, d, _)| Ipv4Addr::new(d[0], d[1], d[2], d[3]))
            .collect();
        ips.sort();
        Some(ips)
    }

    /// The SRV records it gives for `name` now, sorted (`None` when it does not answer, or answers with an error).
    pub async fn srv_records(&self, name: &str) -> Option<Vec<Srv>> {
        let answer = self.ask(name, TYPE_SRV).await.filter(|a| a.rcode == RCODE_NOERROR)?;
        let mut found: Vec<Srv> = answer
            .records
            .iter()
            .enumerate()
            .filter(|(_, (t, data, _))| *t == TYPE_SRV && data.len() > 6)
            .map(|(i, (_, d, _))| Srv {
                priority: u16::from_be_bytes([d[0], d[1]]),
                weight: u16::from_be_bytes([d[2], d[3]]),
                port: u16::from_be_bytes([d[4], d[5]]),
                target: answer.name_in(i, 6),
            })
            .collect();
        found.sort();
        Some(found)
    }

    /// Waits, within [`WAIT`], until it gives exactly `ips` (in any order) as the A records of `name`.
    pub async fn wait_for_a(&self, name: &str, ips: &[Ipv4Addr]) {
        let mut want = ips.to_vec();
        want.sort();
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.a_records(name).await;
            if now.as_ref() == Some(&want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq still answers {now:?} for {name}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits, within [`WAIT`], until it answers the `qtype` query for `name` with the response code `rcode`.
    pub async fn wait_for_rcode(&self, name: &str, qtype: u16, rcode: u8) {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.ask(name, qtype).await.map(|a| a.rcode);
            if now == Some(rcode) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq still answers {name} (type {qtype}) with response code {now:?}, not {rcode}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn write_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).expect("write the hosts file");
        set_mode(&self.hosts, 0o644);
    }

    /// Starts dnsmasq on `self.port` and waits until it answers; why not, with what it said.
    async fn run(&mut self) -> Result<(), String> {
        let stderr_path = self.dir.join("dnsmasq.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("a file for dnsmasq's stderr");
        let mut command = Command::new("dnsmasq");
        command
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--pid-file",
                "--no-resolv",
                "--no-hosts",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--local=/test/",
                "--log-facility=-",
            ])
            .arg(format!("--port={}", self.port))
            .arg(format!("--local-ttl={TTL_SECS}"))
            .arg(format!("--addn-hosts={}", self.hosts.display()));
        for line in &self.srv {
            command.arg(format!("--srv-host={line}"));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run dnsmasq ({e}): install it (Debian: apt-get install dnsmasq-base; scripts/test does)")
            });
        self.child = Some(child);
        let said = || {
            let mut text = String::new();
            let _ = std::fs::File::open(&stderr_path).and_then(|mut f| f.read_to_string(&mut text));
            text
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("dnsmasq exited ({status}): {}", said()));
            }
            if self.ask("ready.wsgate.test", TYPE_A).await.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("dnsmasq did not answer within {WAIT:?}: {}", said()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Answer {
    /// The name in the data of the `record`th answer, from byte `at` of that data on, without the final dot.
    fn name_in(&self, record: usize, at: usize) -> String {
        let (_, _, offset) = self.records[record];
        read_name(&self.message, offset + at)
            .map(|(name, _)| name)
            .unwrap_or_default()
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both).
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A query id that differs between queries.
fn rand_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let mixed = std::process::id() as u16 ^ 0x5a5a;
    NEXT.fetch_add(1, Ordering::Relaxed).wrapping_add(mixed)
}

/// A standard query (recursion desired) for the `qtype` records of `name`, class IN.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&0x0100u16.to_be_bytes());
    // One question, no answers, authorities or additional records.
    message.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        message.push(u8::try_from(label.len()).expect("a short label"));
        message.extend_from_slice(label.as_bytes());
    }
    message.push(0);
    message.extend_from_slice(&qtype.to_be_bytes());
    message.extend_from_slice(&1u16.to_be_bytes());
    message
}

/// The answer section of a response to the query `id`; `None` for anything else.
fn parse(message: &[u8], id: u16) -> Option<Answer> {
    if message.len() < 12 || u16::from_be_bytes([message[0], message[1]]) != id || message[2] & 0x80 == 0 {
        return None;
    }
    let rcode = message[3] & 0x0f;
    let questions = u16::from_be_bytes([message[4], message[5]]);
    let answers = u16::from_be_bytes([message[6], message[7]]);
    let mut at = 12;
    for _ in 0..questions {
        at = read_name(message, at)?.1 + 4;
    }
    let mut records = Vec::new();
    for _ in 0..answers {
        at = read_name(message, at)?.1;
        let header = message.get(at..at + 10)?;
        let rtype = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[8], header[9]]));
        let data = message.get(at + 10..at + 10 + len)?;
        records.push((rtype, data.to_vec(), at + 10));
        at += 10 + len;
    }
    Some(Answer {
        rcode,
        records,
        message: message.to_vec(),
    })
}

/// The name at `message[at..]` (following compression pointers), and where the bytes after it start.
fn read_name(message: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    let mut end = None;
    // Bounded: a malformed message cannot loop.
    for _ in 0..128 {
        let len = *message.get(at)?;
        if len == 0 {
            return Some((labels.join("."), end.unwrap_or(at + 1)));
        }
        if len & 0xc0 == 0xc0 {
            let low = *message.get(at + 1)?;
            end.get_or_insert(at + 2);
            at = usize::from(u16::from_be_bytes([len & 0x3f, low]));
            continue;
        }
        let label = message.get(at + 1..at + 1 + usize::from(len))?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + usize::from(len);
    }
    None
}
