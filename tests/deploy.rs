//! The deployment files (`deploy/`, `Dockerfile`) checked as far as this machine can, with no container runtime
//! and no cluster: the systemd unit by `systemd-analyze verify`, and wsgate's side of it (`Type=notify`: READY,
//! RELOADING, STOPPING on a real notify socket); the Kubernetes manifests parsed (PyYAML) and held against each
//! other and against the config they carry (which `wsgate check` takes); the Helm chart's values against what its
//! templates use; the Dockerfile's stages and what they copy. Not checked here: a real image build, a real cluster,
//! a rendered chart (no Helm binary installs from the registries this machine reaches).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::process::Signal;
use serde_json::Value;
use tokio::net::UnixDatagram;

use support::binary::Binary;
use support::{TempDir, within};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The YAML documents of a file, as JSON (PyYAML's `safe_load_all`, which `scripts/test` installs).
fn yaml(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{} is not YAML (or PyYAML is missing): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python3")
}

/// `wsgate check` on `config`, with the in-cluster path it holds made local: the admin token file. (Its backends
/// come from the Kubernetes API, which `check` does not ask.) The local config, which it took.
fn check_config(config: &str, dir: &TempDir) -> String {
    let token = dir.join("admin-token");
    std::fs::write(&token, "a-token-of-the-operator\n").unwrap();
    let local = config.replace("/etc/wsgate/secret/admin-token", token.to_str().unwrap());
    let file = dir.join("wsgate.toml");
    std::fs::write(&file, &local).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    local
}

/// The config's `drain_timeout`, in seconds.
fn drain_seconds(config: &str) -> u64 {
    let parsed = wsgate::config::file::parse(config, "wsgate.toml").unwrap_or_else(|p| panic!("{p:?}"));
    parsed.server.drain_timeout.as_secs()
}

#[test]
fn the_systemd_unit_verifies() {
    let dir = TempDir::new("deploy-systemd");
    let unit = std::fs::read_to_string(root().join("deploy/systemd/wsgate.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    // systemd-analyze checks that the binary exists: the one just built stands in for /usr/local/bin/wsgate.
    let local = dir.join("wsgate.service");
    std::fs::write(
        &local,
        unit.replace("/usr/local/bin/wsgate", env!("CARGO_BIN_EXE_wsgate")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&local)
        .output()
        .expect("systemd-analyze runs (Debian's systemd package)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    // The stop timeout covers the drain.
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop > 30,
        "TimeoutStopSec={stop} is not above the default drain_timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_when_wsgate_is_ready_reloads_and_stops() {
    let dir = TempDir::new("deploy-notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let config = dir.join("wsgate.toml");
    std::fs::write(
        &config,
        "[[listener]]\nname = \"m\"\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"a\"\n\
         [[upstream]]\nname = \"a\"\n[[upstream.server]]\naddress = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let mut wsgate = Binary::spawn_with_env(
        ["run", "--config", config.to_str().unwrap()],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let ready = next(&socket).await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");

    wsgate.signal(Signal::HUP);
    let reloading = next(&socket).await;
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let micros: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .expect("MONOTONIC_USEC with RELOADING=1");
    assert!(micros > 0);
    let ready = next(&socket).await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");

    wsgate.signal(Signal::TERM);
    let stopping = next(&socket).await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    assert_eq!(wsgate.exit_code().await, Some(0));
}

#[test]
fn the_kubernetes_manifests_hold_together() {
    let dir = TempDir::new("deploy-k8s");
    let k8s = root().join("deploy/kubernetes");
    let docs: Vec<Value> = ["configmap", "deployment", "service", "pdb", "serviceaccount"]
        .iter()
        .flat_map(|name| yaml(&k8s.join(format!("{name}.yaml"))))
        .collect();
    let of = |kind: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let config = of("ConfigMap")["data"]["wsgate.toml"].as_str().unwrap();
    let local = check_config(config, &dir);

    let deployment = of("Deployment");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    let container = &spec["containers"][0];
    // The grace period covers the pause before SIGTERM and the whole drain.
    let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop pause");
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    let drain = drain_seconds(&local);
    assert!(grace > pause + drain, "grace {grace}, pause {pause}, drain {drain}");
    // Not root, nothing to escalate, a read-only root.
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    // The ports are the config's.
    for (port, name) in [(8080, "ws"), (9090, "admin")] {
        assert!(
            config.contains(&format!(":{port}\"")),
            "the config does not listen on {port}"
        );
        assert!(
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["containerPort"] == port && p["name"] == name),
            "no container port {name} = {port}"
        );
    }
    assert_eq!(
        container["args"],
        serde_json::json!(["run", "--config", "/etc/wsgate/wsgate.toml"])
    );

    // The Service and the PodDisruptionBudget select the pods.
    assert_eq!(&of("Service")["spec"]["selector"], labels);
    let pdb = of("PodDisruptionBudget");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // The ServiceAccount may read EndpointSlices, and nothing else.
    let account = of("ServiceAccount")["metadata"]["name"].clone();
    assert_eq!(spec["serviceAccountName"], account);
    let rules = of("Role")["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["apiGroups"], serde_json::json!(["discovery.k8s.io"]));
    assert_eq!(rules[0]["resources"], serde_json::json!(["endpointslices"]));
    assert_eq!(rules[0]["verbs"], serde_json::json!(["get", "list", "watch"]));
    let binding = of("RoleBinding");
    assert_eq!(binding["roleRef"]["name"], of("Role")["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], account);
}

#[test]
fn the_helm_charts_templates_use_only_values_it_has() {
    let dir = TempDir::new("deploy-helm");
    let chart = root().join("deploy/helm/wsgate");
    let meta = &yaml(&chart.join("Chart.yaml"))[0];
    assert_eq!(meta["apiVersion"], "v2");
    assert_eq!(meta["name"], "wsgate");
    let values = &yaml(&chart.join("values.yaml"))[0];
    let config = values["config"].as_str().unwrap();
    let local = check_config(config, &dir);
    assert_eq!(values["drainTimeoutSeconds"].as_u64(), Some(drain_seconds(&local)));
    // Every `.Values.a.b` a template names is in values.yaml.
    let pattern = regex::Regex::new(r"\.Values((?:\.[A-Za-z][A-Za-z0-9]*)+)").unwrap();
    let mut used = 0;
    for entry in std::fs::read_dir(chart.join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for found in pattern.captures_iter(&text) {
            used += 1;
            let mut at = values;
            for part in found[1].trim_start_matches('.').split('.') {
                at = &at[part];
            }
            assert!(
                !at.is_null(),
                "{} uses .Values{} which values.yaml lacks",
                path.display(),
                &found[1]
            );
        }
    }
    assert!(used > 10, "only {used} values used: the pattern missed them");
}

#[test]
fn the_dockerfile_builds_in_a_stage_and_runs_as_nonroot_from_what_it_copies() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(stages[0].starts_with("FROM rust:") && stages[0].ends_with(" AS build"));
    assert!(stages[1].contains("distroless") && stages[1].ends_with(":nonroot"));
    assert!(text.contains("USER nonroot"));
    assert!(text.contains("cargo build --release --locked --bin wsgate"));
    assert!(text.contains("COPY --from=build"));
    // What the build stage copies is enough for Cargo: the manifest and the lock file resolve with only that.
    let dir = TempDir::new("deploy-docker");
    for line in text.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            let from = root().join(source);
            let to = dir.join(source);
            copy(&from, &to);
        }
    }
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--locked",
            "--offline",
            "--no-deps",
            "--format-version",
            "1",
        ])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignored.lines().any(|l| l == "target"));
}

/// The next message wsgate sends to the notify socket.
async fn next(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 1024];
    let n = within("a message to systemd", socket.recv(&mut buf)).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn copy(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}
