//! `wsgate check` as an operator meets it: every example passes, and broken files are refused with every problem
//! placed at its line and column. A property test feeds the loader random TOML-ish text.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use wsgate::config::Config;
use wsgate::config::file::{Problem, parse};

/// A config file under the temp dir, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(text: &str) -> TempFile {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("wsgate-config-check-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write the temp config file");
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// The path as `wsgate check` prints it.
    fn shown(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run wsgate check")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `(line, column)`, both 1-based, of `value` in the only line of `text` that contains `line_text`.
fn place(text: &str, line_text: &str, value: &str) -> (usize, usize) {
    let found: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(line_text))
        .collect();
    assert_eq!(found.len(), 1, "`{line_text}` should be on exactly one line");
    let (index, line) = found[0];
    let at = line.find(value).expect("the value is on its line");
    (index + 1, line[..at].chars().count() + 1)
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// The summary `wsgate check` prints for a valid file.
fn summary(config: &Config) -> String {
    format!(
        "{}, {}, {} ({})",
        plural(config.listeners.len(), "listener"),
        plural(config.routes.len(), "route"),
        plural(config.upstreams.len(), "upstream"),
        plural(config.server_count(), "server")
    )
}

#[test]
fn every_example_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read examples/")
        .map(|entry| entry.expect("list examples/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "examples/ should hold the example configs: {files:?}");
    for file in &files {
        let out = check(file);
        assert_eq!(out.status.code(), Some(0), "{}:\n{}", file.display(), stderr(&out));
        let config = wsgate::config::file::load(file).expect("an example loads in-process too");
        let expected = format!("{}: ok: {}", file.display(), summary(&config));
        assert_eq!(stdout(&out).trim_end(), expected);
        assert!(expected.contains(" listener"), "{expected}");
        assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    }
}

const VALID: &str = r#"
[[listener]]
name = "public"
address = "127.0.0.1:18080"

[[route]]
upstream = "app"

[[upstream]]
name = "app"

[[upstream.server]]
address = "127.0.0.1:19000"
"#;

#[test]
fn a_valid_file_gets_its_summary() {
    let file = TempFile::new(VALID);
    let out = check(file.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("{}: ok: 1 listener, 1 route, 1 upstream (1 server)\n", file.shown())
    );
}

#[test]
fn an_unknown_key_is_placed_and_the_known_keys_listed() {
    let text = VALID.replace("upstream = \"app\"\n", "upstream = \"app\"\nno_such_key = 1\n");
    let file = TempFile::new(&text);
    let out = check(file.path());
    assert_eq!(out.status.code(), Some(1));
    let (line, column) = place(&text, "no_such_key", "no_such_key");
    let err = stderr(&out);
    let want = format!(
        "{}:{line}:{column}: unknown field `no_such_key`, expected one of",
        file.shown()
    );
    assert!(err.starts_with(&want), "want {want}\ngot {err}");
    for key in ["`upstream`", "`path_prefix`", "`relay`"] {
        assert!(err.contains(key), "the known keys should include {key}: {err}");
    }
    assert!(
        err.ends_with(&format!("wsgate: 1 problem in {}\n", file.shown())),
        "{err}"
    );
    assert!(stdout(&out).is_empty());
}

#[test]
fn every_semantic_problem_is_listed_with_its_place() {
    let text = r#"
[[listener]]
name = "public"
address = "127.0.0.1:18080"

[[listener]]
name = "again"
address = "127.0.0.1:18080"

[[listener]]
name = "nowhere"
address = "not-an-address"

[[route]]
name = "lost"
upstream = "missing"

[[route]]
name = "rooms"
path_regex = "^/rooms/(unclosed"
upstream = "app"

[[upstream]]
name = "app"

[[upstream.server]]
address = "127.0.0.1:19000"
weight = 0

[[upstream]]
name = "app"

[[upstream.server]]
address = "127.0.0.1:19001"

[[upstream]]
name = "empty"
"#;
    let file = TempFile::new(text);
    let out = check(file.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    let err = stderr(&out);

    let at = |line_text: &str, value: &str| {
        let (line, column) = place(text, line_text, value);
        format!("{}:{line}:{column}: ", file.shown())
    };
    // Lines that appear more than once are found by what is unique on them.
    let lines: Vec<&str> = text.lines().collect();
    let nth = |needle: &str, n: usize| {
        let index = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .nth(n)
            .map(|(i, _)| i)
            .expect("the line is in the text");
        index + 1
    };
    let second_app = nth("name = \"app\"", 1);
    let second_address = nth("address = \"127.0.0.1:18080\"", 1);
    let empty_upstream = nth("[[upstream]]", 2);
    let expected = [
        format!(
            "{}:{second_address}:11: `address`: two listeners on 127.0.0.1:18080",
            file.shown()
        ),
        at("not-an-address", "\"not-an-address\"")
            + "`address`: invalid address `not-an-address`: expected IP:PORT, e.g. 0.0.0.0:8080",
        at("weight = 0", "0") + "`weight`: must be from 1 to 1000, not 0",
        format!("{}:{second_app}:8: `name`: duplicate upstream name `app`", file.shown()),
        format!(
            "{}:{empty_upstream}:1: upstream `empty` has no servers: add at least one [[upstream.server]]",
            file.shown()
        ),
        at("\"missing\"", "\"missing\"") + "`upstream`: no upstream named `missing` (upstreams: ",
        at("(unclosed", "\"^/rooms/(unclosed\"") + "`path_regex`: invalid regular expression",
    ];
    for want in &expected {
        assert!(
            err.lines().any(|l| l.starts_with(want.as_str())),
            "missing: {want}\nin:\n{err}"
        );
    }
    let problems = err
        .lines()
        .filter(|l| l.starts_with(&format!("{}:", file.shown())))
        .count();
    assert_eq!(problems, expected.len(), "{err}");
    assert!(
        err.ends_with(&format!("wsgate: {} problems in {}\n", expected.len(), file.shown())),
        "{err}"
    );
}

#[test]
fn text_that_is_not_toml_is_refused_at_its_place() {
    let file = TempFile::new("listener = [\nthis is { not toml\n");
    let out = check(file.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let problem = err.lines().next().unwrap_or_default();
    let place = format!("{}:", file.shown());
    let rest = problem.strip_prefix(&place).unwrap_or_else(|| panic!("{err}"));
    let mut parts = rest.splitn(3, ':');
    let line: usize = parts
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    let column: usize = parts
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!((1..=2).contains(&line) && column >= 1, "{err}");
    assert!(parts.next().is_some_and(|m| !m.trim().is_empty()), "{err}");
    assert!(
        err.ends_with(&format!("wsgate: 1 problem in {}\n", file.shown())),
        "{err}"
    );
    assert!(stdout(&out).is_empty());
}

#[test]
fn an_empty_file_lacks_a_listener_and_a_route() {
    let file = TempFile::new("# nothing here yet\n");
    let out = check(file.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let shown = file.shown();
    assert!(
        err.contains(&format!("{shown}: no [[listener]]: at least one is needed")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{shown}: no [[route]]: at least one is needed")),
        "{err}"
    );
    assert!(err.ends_with(&format!("wsgate: 2 problems in {shown}\n")), "{err}");
}

#[test]
fn an_access_log_in_a_missing_directory_or_a_bad_redacted_name_is_refused_with_its_place() {
    let text = format!(
        "[server]\naccess_log = \"no-such-dir/access.log\"\naccess_log_redact = [\"session\", \"a=b\"]\n{VALID}"
    );
    let file = TempFile::new(&text);
    let out = check(file.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let dir = file.path().parent().expect("the temp dir").join("no-such-dir");
    let (line, column) = place(&text, "access_log =", "\"no-such-dir");
    let want = format!(
        "{}:{line}:{column}: `access_log`: {}: directory {} does not exist\n",
        file.shown(),
        dir.join("access.log").display(),
        dir.display()
    );
    assert!(err.starts_with(&want), "want {want}\ngot {err}");
    let (line, column) = place(&text, "access_log_redact", "\"a=b\"");
    let want = format!(
        "{}:{line}:{column}: `access_log_redact`: `a=b` is no query parameter name\n",
        file.shown()
    );
    assert!(err.contains(&want), "want {want}\ngot {err}");
    assert!(
        err.ends_with(&format!("wsgate: 2 problems in {}\n", file.shown())),
        "{err}"
    );

    // A file beside the config file (the temp dir exists) is fine, and so are "stdout" and "off".
    for target in ["access.log", "stdout", "off"] {
        let text = format!("[server]\naccess_log = \"{target}\"\n{VALID}");
        let file = TempFile::new(&text);
        let out = check(file.path());
        assert_eq!(out.status.code(), Some(0), "{target}: {}", stderr(&out));
    }
}

#[test]
fn a_missing_file_is_refused_with_its_name() {
    let path = std::env::temp_dir().join(format!("wsgate-config-check-{}-missing.toml", std::process::id()));
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("wsgate: cannot read {}: ", path.display())),
        "{err}"
    );
    assert!(err.contains("No such file or directory"), "{err}");
    assert!(stdout(&out).is_empty());
}

// ---- The loader never panics, and places what it refuses ----

const HEADERS: &[&str] = &[
    "[server]",
    "[[listener]]",
    "[[route]]",
    "[[upstream]]",
    "[[upstream.server]]",
    "[upstream.sticky]",
    "[route.headers]",
    "[listener]",
    "[[server]]",
    "[upstream]",
    "[[route.upstream]]",
    "[[",
    "[]",
    "[[nope]]",
];

const KEYS: &[&str] = &[
    // [server]
    "drain_timeout",
    "handshake_timeout",
    "log_format",
    "workers",
    "watch",
    // [[listener]]
    "name",
    "address",
    // [[route]]
    "listener",
    "host",
    "path_prefix",
    "path",
    "path_regex",
    "headers",
    "headers.X-Tenant",
    "upstream",
    "relay",
    "idle_timeout",
    "permessage_deflate",
    "allow",
    "deny",
    "allowed_origins",
    "allow_missing_origin",
    "max_message_size",
    "max_frame_size",
    "messages_per_second",
    "burst",
    "ping_interval",
    "pong_timeout",
    "validate_utf8",
    "close_timeout",
    "write_timeout",
    // [[upstream]]
    "balance",
    "hash_key",
    "connect_timeout",
    "sticky",
    "sticky.cookie",
    "sticky.header",
    "server",
    "weight",
    // sticky tables
    "cookie",
    "header",
    "max_age",
    "forward_cookie",
    "secret",
    // wrong ones
    "no_such_key",
    "\"quoted key\"",
    "ключ",
    "a.b.c",
];

/// Values of every type, valid and not. Addresses are IP literals or `localhost`: nothing here needs DNS.
const VALUES: &[&str] = &[
    "\"public\"",
    "\"app\"",
    "\"\"",
    "\"   \"",
    "\"127.0.0.1:8080\"",
    "\"127.0.0.1:0\"",
    "\"0.0.0.0:8080\"",
    "\"[::1]:9000\"",
    "\"localhost:9000\"",
    "\"127.0.0.1\"",
    "\"127.0.0.1:99999\"",
    "\"not an address\"",
    "\"/ws\"",
    "\"ws\"",
    "\"/\"",
    "\"^/rooms/[0-9]+$\"",
    "\"(unclosed\"",
    "\"(?i)/ws\"",
    "\"*.example.com\"",
    "\"chat.example.com\"",
    "\"localhost:8080\"",
    "\"*.\"",
    "\"tunnel\"",
    "\"frames\"",
    "\"round_robin\"",
    "\"least_conn\"",
    "\"consistent_hash\"",
    "\"random_two\"",
    "\"source_ip\"",
    "\"header:X-User\"",
    "\"cookie:\"",
    "\"query:room\"",
    "\"path\"",
    "\"text\"",
    "\"json\"",
    "\"xml\"",
    "\"ünï©ødé ✓\"",
    "'literal \\ string'",
    "\"\"\"multi\nline\"\"\"",
    "\"bad \\q escape\"",
    "\"unterminated",
    // durations
    "\"250ms\"",
    "\"30s\"",
    "\"5m\"",
    "\"1h\"",
    "\"1.5h\"",
    "\"30\"",
    "\"0s\"",
    "\"720h\"",
    "\"721h\"",
    "\"31d\"",
    "\"-1s\"",
    "\"1e3s\"",
    "\".s\"",
    "\"10 ms\"",
    "\"99999999999999999999999h\"",
    // sizes
    "\"512\"",
    "\"64KiB\"",
    "\"16MiB\"",
    "\"1GiB\"",
    "\"2KB\"",
    "\"1.5MiB\"",
    "\"1PiB\"",
    "\"99999999999GiB\"",
    "\"kib\"",
    "\"fastest\"",
    "\"body\"",
    "\"query:\"",
    "\"cookie\"",
    "4294967296",
    // numbers
    "0",
    "1",
    "3",
    "1000",
    "1001",
    "-1",
    "-9223372036854775808",
    "9223372036854775807",
    "18446744073709551616",
    "0x10",
    "1_000",
    "1.5",
    "-0.0",
    "inf",
    "nan",
    "1e400",
    // other types
    "true",
    "false",
    "1979-05-27T07:32:00Z",
    "[]",
    "[1, \"a\"]",
    "[[1], [2]]",
    "[\"127.0.0.1:9000\"]",
    "{}",
    "{ cookie = \"SERVERID\" }",
    "{ cookie = \"SERVERID\", max_age = \"1h\", secret = \"s\" }",
    "{ cookie = \"bad name\" }",
    "{ header = \"X-User\", path = \"/\" }",
    "{ cookie = \"A\", header = \"B\" }",
    "{ \"X-Tenant\" = \"a\" }",
    "{ \"bad header\" = \"a\" }",
    "{ address = \"127.0.0.1:9000\", weight = 2 }",
    "{ x = { y = 1 } }",
    "",
];

/// Free text for string values: no `:`, so it never forms a `host:port` that would be looked up in DNS.
fn free_string() -> impl Strategy<Value = String> {
    "[^:\"\\\\\n]{0,12}".prop_map(|s| format!("\"{s}\""))
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(VALUES).prop_map(str::to_string),
        1 => free_string(),
        1 => any::<i64>().prop_map(|n| n.to_string()),
    ]
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(HEADERS).prop_map(str::to_string),
        8 => (prop::sample::select(KEYS), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => Just(String::new()),
        1 => Just("# a comment".to_string()),
        1 => "\\PC{0,20}",
    ]
}

// Sections with the keys the schema has for them, and values mostly of the type each key wants: files that get
// past the TOML parser to the checks of values and names.

const SERVER_KEYS: &[&str] = &[
    "drain_timeout",
    "handshake_timeout",
    "log_format",
    "workers",
    "watch",
    "max_connections",
    "listen_backlog",
    "tcp_keepalive",
    "access_log",
    "access_log_redact",
];
const LISTENER_KEYS: &[&str] = &[
    "name",
    "address",
    "name",
    "address",
    "allow",
    "deny",
    "max_connections_per_ip",
    "ipv6_prefix",
    "handshakes_per_second_per_ip",
    "handshake_burst",
];
const ROUTE_KEYS: &[&str] = &[
    "name",
    "listener",
    "host",
    "path_prefix",
    "path",
    "path_regex",
    "headers",
    "upstream",
    "upstream",
    "relay",
    "relay",
    "idle_timeout",
    "permessage_deflate",
    "max_message_size",
    "max_frame_size",
    "messages_per_second",
    "burst",
    "ping_interval",
    "pong_timeout",
    "validate_utf8",
    "close_timeout",
    "write_timeout",
];
const UPSTREAM_KEYS: &[&str] = &[
    "name",
    "name",
    "balance",
    "hash_key",
    "connect_timeout",
    "sticky",
    "retries",
    "retry_budget_percent",
    "max_connections",
    "max_pending_handshakes",
    "slow_start",
    "drain_rate",
    "rebalance",
    "rebalance_threshold",
];
const SERVER_ENTRY_KEYS: &[&str] = &["address", "address", "weight", "backup", "drain", "max_connections"];
const HEALTH_KEYS: &[&str] = &[
    "kind",
    "path",
    "host",
    "expect_status",
    "send",
    "interval",
    "timeout",
    "rise",
    "fall",
];
const OUTLIER_KEYS: &[&str] = &["consecutive_failures", "ejection", "max_ejected_percent"];
const HEALTH_KINDS: &[&str] = &["\"tcp\"", "\"http\"", "\"websocket\"", "\"smoke\""];
const STATUS_LISTS: &[&str] = &["[200]", "[200, 204]", "[]", "[700]", "[\"200\"]"];
const FRACTIONS: &[&str] = &["0.1", "0.5", "0.0", "1.5", "-1.0", "nan", "1"];
const STICKY_KEYS: &[&str] = &["cookie", "header", "path", "max_age", "forward_cookie", "secret"];

const NAMES: &[&str] = &["\"public\"", "\"app\"", "\"chat\"", "\"admin\"", "\"\""];
const ADDRESSES: &[&str] = &[
    "\"127.0.0.1:9000\"",
    "\"127.0.0.1:9001\"",
    "\"127.0.0.1:0\"",
    "\"0.0.0.0:8080\"",
    "\"[::1]:9000\"",
    "\"localhost:9000\"",
    "\"127.0.0.1\"",
    "\"not-an-address\"",
];
const PATHS: &[&str] = &[
    "\"/ws\"",
    "\"/\"",
    "\"ws\"",
    "\"^/rooms/[0-9]+$\"",
    "\"(unclosed\"",
    "\"(?i)/ws\"",
];
const HOSTS: &[&str] = &[
    "\"chat.example.com\"",
    "\"*.example.com\"",
    "\"Example.COM\"",
    "\"*.\"",
    "\"a..b\"",
];
const HEADER_TABLES: &[&str] = &[
    "{ \"X-Tenant\" = \"a\" }",
    "{ \"bad header\" = \"a\" }",
    "{}",
    "{ X = 1 }",
];
const DURATIONS: &[&str] = &[
    "\"250ms\"",
    "\"30s\"",
    "\"1.5h\"",
    "\"0s\"",
    "\"10ms\"",
    "\"720h\"",
    "\"90\"",
];
const SIZES: &[&str] = &["\"64KiB\"", "\"16MiB\"", "512", "0", "\"0\"", "\"2KB\""];
const COUNTS: &[&str] = &["0", "1", "2", "1000", "1001", "4294967295"];
const BOOLS: &[&str] = &["true", "false"];
const RELAYS: &[&str] = &["\"tunnel\"", "\"frames\"", "\"frames\""];
const BALANCES: &[&str] = &[
    "\"round_robin\"",
    "\"least_conn\"",
    "\"consistent_hash\"",
    "\"random_two\"",
    "\"source_ip\"",
];
const HASH_KEYS: &[&str] = &[
    "\"header:X-User\"",
    "\"cookie:sid\"",
    "\"query:room\"",
    "\"path\"",
    "\"source_ip\"",
];
const STICKIES: &[&str] = &[
    "\"source_ip\"",
    "{ cookie = \"SERVERID\" }",
    "{ cookie = \"SERVERID\", max_age = \"1h\", secret = \"s\", forward_cookie = true }",
    "{ header = \"X-User\" }",
    "{ header = \"X-User\", secret = \"s\" }",
    "{ cookie = \"bad name\" }",
    "{}",
];
const NETWORK_LISTS: &[&str] = &[
    "[\"10.0.0.0/8\"]",
    "[\"127.0.0.1\", \"::1/128\"]",
    "[\"2001:db8::/32\", \"10.1.2.3/8\"]",
    "[\"10.0.0.0/33\"]",
    "[\"not an address\"]",
    "[]",
];
const ORIGIN_LISTS: &[&str] = &[
    "[\"https://app.example.com\"]",
    "[\"https://*.example.com\", \"http://localhost:3000\"]",
    "[\"ftp://x\"]",
    "[\"https://a/b\"]",
    "[\"https://a:0\"]",
    "[\"*\"]",
    "[]",
];
const DEFLATES: &[&str] = &["\"pass\"", "\"strip\"", "\"zip\""];
const LOG_FORMATS: &[&str] = &["\"text\"", "\"json\""];
const STICKY_NAMES: &[&str] = &["\"SERVERID\"", "\"X-User\"", "\"bad name\"", "\"\""];

/// Values a key's type accepts (some of them out of range): serde takes them, the checks after it may not.
fn typed(key: &str) -> &'static [&'static str] {
    match key {
        "name" | "listener" | "upstream" | "secret" => NAMES,
        "address" => ADDRESSES,
        "path_prefix" | "path" | "path_regex" => PATHS,
        "host" => HOSTS,
        "headers" => HEADER_TABLES,
        "relay" => RELAYS,
        "permessage_deflate" => DEFLATES,
        "balance" => BALANCES,
        "hash_key" => HASH_KEYS,
        "sticky" => STICKIES,
        "log_format" => LOG_FORMATS,
        "cookie" | "header" => STICKY_NAMES,
        "max_message_size" | "max_frame_size" => SIZES,
        "messages_per_second"
        | "burst"
        | "workers"
        | "listen_backlog"
        | "weight"
        | "retries"
        | "retry_budget_percent"
        | "max_connections"
        | "max_pending_handshakes"
        | "drain_rate"
        | "rise"
        | "fall"
        | "consecutive_failures"
        | "max_ejected_percent" => COUNTS,
        "watch" | "validate_utf8" | "forward_cookie" | "backup" | "drain" | "rebalance" | "allow_missing_origin" => {
            BOOLS
        }
        "allow" | "deny" => NETWORK_LISTS,
        "allowed_origins" => ORIGIN_LISTS,
        "max_connections_per_ip" | "ipv6_prefix" | "handshakes_per_second_per_ip" | "handshake_burst" => COUNTS,
        "kind" => HEALTH_KINDS,
        "expect_status" => STATUS_LISTS,
        "rebalance_threshold" => FRACTIONS,
        "send" => NAMES,
        _ => DURATIONS,
    }
}

/// A key and a value, mostly of the type the key wants.
fn typed_pair(key: &'static str) -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        19 => prop::sample::select(typed(key)).prop_map(str::to_string),
        1 => value(),
    ]
    .prop_map(move |v| (key.to_string(), v))
}

/// The keys of a section: its required ones (rarely one left out), then a few others.
fn pairs(required: &'static [&'static str], optional: &'static [&'static str]) -> impl Strategy<Value = String> {
    let required: Vec<_> = required.iter().map(|&key| typed_pair(key)).collect();
    let optional = prop::collection::vec(prop::sample::select(optional).prop_flat_map(typed_pair), 0..5);
    (required, optional, prop::bool::weighted(0.1)).prop_map(|(required, optional, drop_one)| {
        let mut text = String::new();
        let mut seen = std::collections::HashSet::new();
        for (key, value) in required.into_iter().skip(usize::from(drop_one)).chain(optional) {
            // A key twice in a table is a TOML error: keep the first, so most files reach the checks after parsing.
            if seen.insert(key.clone()) {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
        text
    })
}

fn section() -> impl Strategy<Value = String> {
    let upstream = (
        pairs(&["name"], UPSTREAM_KEYS),
        prop::collection::vec(pairs(&["address"], SERVER_ENTRY_KEYS), 0..4),
        prop::option::weighted(0.15, pairs(&[], STICKY_KEYS)),
        prop::option::weighted(0.2, pairs(&["kind"], HEALTH_KEYS)),
        prop::option::weighted(0.15, pairs(&[], OUTLIER_KEYS)),
    )
        .prop_map(|(upstream, servers, sticky, health, outlier)| {
            let mut text = format!("[[upstream]]\n{upstream}");
            for server in servers {
                text.push_str(&format!("[[upstream.server]]\n{server}"));
            }
            for (table, keys) in [("sticky", sticky), ("health", health), ("outlier", outlier)] {
                if let Some(keys) = keys {
                    text.push_str(&format!("[upstream.{table}]\n{keys}"));
                }
            }
            text
        });
    prop_oneof![
        3 => pairs(&["name", "address"], LISTENER_KEYS).prop_map(|p| format!("[[listener]]\n{p}")),
        4 => pairs(&["upstream"], ROUTE_KEYS).prop_map(|p| format!("[[route]]\n{p}")),
        4 => upstream,
    ]
}

/// Mostly plausible files (sections of the schema, a valid file with lines added, or lines alone); sometimes any
/// text at all.
fn document() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (
            prop::option::weighted(0.3, pairs(&[], SERVER_KEYS)),
            prop::collection::vec(section(), 0..10)
        )
            .prop_map(|(server, sections)| {
                let server = server.map(|p| format!("[server]\n{p}\n"));
                server.unwrap_or_default() + &sections.join("\n")
            }),
        2 => (prop::collection::vec(line(), 0..6), 0..=VALID.lines().count())
            .prop_map(|(lines, at)| {
                let mut all: Vec<String> = VALID.lines().map(str::to_string).collect();
                all.splice(at..at, lines);
                all.join("\n")
            }),
        2 => prop::collection::vec(line(), 0..30).prop_map(|lines| lines.join("\n")),
        1 => prop::collection::vec(line(), 0..20).prop_map(|lines| lines.join("\r\n")),
        1 => any::<String>(),
    ]
}

/// What every problem must satisfy: a place inside the text, or (only for what a file lacks) no place.
fn check_problem(text: &str, p: &Problem) -> Result<(), TestCaseError> {
    prop_assert_eq!(p.file.as_str(), "fuzz.toml");
    prop_assert!(!p.message.trim().is_empty(), "empty message: {:?}", p);
    if p.line == 0 {
        // By design: what is missing from the whole file has no place.
        let unplaced = p.message.starts_with("no [[listener]]") || p.message.starts_with("no [[route]]");
        prop_assert!(unplaced, "a problem without a place: {:?}", p);
        prop_assert_eq!(p.column, 0);
        prop_assert_eq!(p.to_string(), format!("fuzz.toml: {}", p.message));
    } else {
        let lines = text.split('\n').count();
        prop_assert!(p.line <= lines, "line {} of {}: {:?}", p.line, lines, p);
        prop_assert!(p.column >= 1, "{:?}", p);
        let shown = p.to_string();
        prop_assert!(
            shown.starts_with(&format!("fuzz.toml:{}:{}: ", p.line, p.column)),
            "{}",
            shown
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_toml_never_panics_the_loader(text in document()) {
        match parse(&text, "fuzz.toml") {
            Ok(config) => {
                // A config that loads is servable: the code that uses it checks nothing again.
                prop_assert!(!config.listeners.is_empty());
                prop_assert!(!config.routes.is_empty());
                for route in &config.routes {
                    prop_assert!(route.upstream.is_some_and(|u| u < config.upstreams.len()));
                }
                for upstream in &config.upstreams {
                    prop_assert!(!upstream.servers.is_empty());
                }
            }
            Err(problems) => {
                prop_assert!(!problems.is_empty());
                for p in &problems {
                    check_problem(&text, p)?;
                }
            }
        }
    }
}

#[test]
fn a_malformed_otlp_endpoint_is_placed() {
    for (endpoint, says) in [
        ("127.0.0.1:4318/v1/traces", "expected the full OTLP/HTTP traces URL"),
        ("grpc://127.0.0.1:4317/v1/traces", "scheme `grpc`"),
        ("http://127.0.0.1:4318", "no path"),
        ("http://user:pw@127.0.0.1:4318/v1/traces", "user information"),
    ] {
        let text = format!("{VALID}\n[tracing]\notlp_endpoint = \"{endpoint}\"\n");
        let file = TempFile::new(&text);
        let out = check(file.path());
        assert_eq!(out.status.code(), Some(1), "{endpoint}");
        let (line, column) = place(&text, "otlp_endpoint", &format!("\"{endpoint}\""));
        let want = format!("{}:{line}:{column}: `tracing.otlp_endpoint`: ", file.shown(),);
        let err = stderr(&out);
        assert!(
            err.starts_with(&want) && err.contains(says),
            "{endpoint}: want {want}…{says}\ngot {err}"
        );
    }
    let text = format!(
        "{VALID}\n[tracing]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\nheaders = {{ \"content-type\" = \"x\" }}\n"
    );
    let file = TempFile::new(&text);
    let err = stderr(&check(file.path()));
    assert!(
        err.contains("`tracing.headers`: `content-type` is written by wsgate itself"),
        "{err}"
    );
    let ok = format!("{VALID}\n[tracing]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\n");
    let file = TempFile::new(&ok);
    assert_eq!(check(file.path()).status.code(), Some(0));
}

#[test]
fn a_bad_listen_backlog_or_tcp_keepalive_is_placed() {
    let text = format!("[server]\nlisten_backlog = 0\ntcp_keepalive = \"3h\"\n{VALID}");
    let file = TempFile::new(&text);
    let out = check(file.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let (line, column) = place(&text, "listen_backlog = 0", "0");
    assert!(
        err.contains(&format!(":{line}:{column}: `listen_backlog`: must be from 1 to 65535")),
        "{err}"
    );
    let (line, column) = place(&text, "tcp_keepalive", "\"3h\"");
    assert!(
        err.contains(&format!(":{line}:{column}: `tcp_keepalive`: must be at most 2h")),
        "{err}"
    );
    let off = format!("[server]\ntcp_keepalive = \"0s\"\nlisten_backlog = 65535\n{VALID}");
    let file = TempFile::new(&off);
    let out = check(file.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
