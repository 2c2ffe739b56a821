//! The Autobahn TestSuite's fuzzingclient cases (a reduced selection) against a Node `ws` echo server, directly and
//! through wsgate in frames mode: every case that passes directly must pass through wsgate. The work is done by
//! `tests/autobahn/run.py` (the `kosoku` runner from PyPI drives the cases); this test runs it against the debug
//! build and shows its table and failures. `scripts/test` installs `kosoku` and the echo server's `ws`; when one
//! is missing the test fails and says so.
//!
//! The whole suite: `cargo build --release && python3 tests/autobahn/run.py --full`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// What run.py may take for the kosoku runs of the reduced selection (about 15 s a pass with a debug build here);
/// generous, as machines differ up to 3x in speed.
const KOSOKU_TIMEOUT: Duration = Duration::from_secs(240);
/// The whole script: two kosoku runs plus starting and stopping the echo server and wsgate.
const SCRIPT_WAIT: Duration = Duration::from_secs(2 * 240 + 120);

fn autobahn_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/autobahn")
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Fails the test (it does not skip) when kosoku or the echo server's `ws` package is missing.
fn require_peers() {
    match std::process::Command::new("python3")
        .args(["-c", "import kosoku._cli"])
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the Autobahn runner `kosoku` is not installed for python3 ({}). Run scripts/test, which installs \
             it (pip install kosoku).",
            text_of(&out.stderr).trim()
        ),
        Err(e) => panic!("cannot run python3 ({e}). Run scripts/test on a machine with Python 3.11."),
    }
    if !autobahn_dir().join("node_modules/ws/package.json").is_file() {
        panic!(
            "tests/autobahn/node_modules is missing (Node `ws` for the echo server). Run scripts/test, which runs \
             `npm install --prefix tests/autobahn --no-audit --no-fund`."
        );
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => panic!("cannot run node (the echo server's runtime). Run scripts/test on a machine with Node.js."),
    }
}

#[tokio::test]
async fn autobahn_cases_that_pass_directly_pass_through_wsgate_frames_mode() {
    require_peers();
    let child = tokio::process::Command::new("python3")
        .arg(autobahn_dir().join("run.py"))
        .arg("--wsgate")
        .arg(env!("CARGO_BIN_EXE_wsgate"))
        .arg("--timeout")
        .arg(KOSOKU_TIMEOUT.as_secs().to_string())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // run.py stops its echo server, wsgate and kosoku itself; they also get SIGKILL when it dies.
        .kill_on_drop(true)
        .spawn()
        .expect("spawn python3 tests/autobahn/run.py");
    let out = match tokio::time::timeout(SCRIPT_WAIT, child.wait_with_output()).await {
        Ok(out) => out.expect("wait for tests/autobahn/run.py"),
        Err(_) => panic!("tests/autobahn/run.py did not finish within {SCRIPT_WAIT:?}"),
    };
    let report = format!(
        "--- run.py stdout ---\n{}\n--- run.py stderr ---\n{}",
        text_of(&out.stdout),
        text_of(&out.stderr)
    );
    match out.status.code() {
        Some(0) => println!("{report}"),
        Some(1) => panic!("some Autobahn cases pass directly but not through wsgate:\n{report}"),
        _ => panic!(
            "tests/autobahn/run.py could not run the suite ({}):\n{report}",
            out.status
        ),
    }
}
