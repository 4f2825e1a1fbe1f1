//! The official Tencent CMQ Python SDK (`qcloud-cmq-sdk-py3` from PyPI, used as published)
//! against the broker's CMQ-compatible HTTP API: `tests/cmq_sdk/scenario.py` drives it through
//! queues, messages, long polls, delays, rewind, topics with tags and binding keys,
//! subscriptions, paging and a wrong key.
//!
//! Needs python3 with venv and access to PyPI. The virtual environment is cached under
//! `target/tmp/`, so only the first run downloads. Outside CI the test is skipped when those are
//! missing; with `CI` set it fails instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::http_api::HttpBroker;
use super::support::ALICE;

/// The SDK release the scenario is written against.
const SDK_REQUIREMENT: &str = "qcloud-cmq-sdk-py3==0.1";

/// Longest the scenario may take (it takes seconds; its own alarm stops it at 240 s).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

fn describe(what: &str, output: &Output) -> String {
    format!(
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The venv's python with the SDK installed, made once per test process: the tests that use
/// it run in parallel, and two of them making the same venv at once break each other.
fn prepare_venv() -> Result<PathBuf, String> {
    static PYTHON: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    PYTHON.get_or_init(make_venv).clone()
}

/// Makes the venv (or finds it made by an earlier run) and installs the SDK in it.
fn make_venv() -> Result<PathBuf, String> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cmq-sdk-venv");
    let python = venv_python(&venv);
    let marker = venv.join("cmqd-installed.txt");
    if python.is_file() && std::fs::read_to_string(&marker).is_ok_and(|m| m == SDK_REQUIREMENT) {
        return Ok(python);
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv).map_err(|e| format!("cannot clear {venv:?}: {e}"))?;
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !made.status.success() {
        return Err(describe(
            "python3 -m venv (Debian: apt-get install python3-venv)",
            &made,
        ));
    }
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            SDK_REQUIREMENT,
        ])
        .env_remove("PIP_REQUIRE_VIRTUALENV")
        .output()
        .map_err(|e| format!("cannot run the venv's python: {e}"))?;
    if !installed.status.success() {
        return Err(describe(
            &format!("pip install {SDK_REQUIREMENT}"),
            &installed,
        ));
    }
    std::fs::write(&marker, SDK_REQUIREMENT)
        .map_err(|e| format!("cannot write {marker:?}: {e}"))?;
    Ok(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_runs_a_full_scenario() {
    let python = match tokio::task::spawn_blocking(prepare_venv).await.unwrap() {
        Ok(python) => python,
        Err(reason) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run this test (python3, python3-venv and PyPI): {reason}"
            );
            eprintln!("SKIPPED: the CMQ Python SDK is not available: {reason}");
            return;
        }
    };
    let broker = HttpBroker::start().await;
    let endpoint = broker.endpoint();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cmq_sdk/scenario.py");
    // The SDK writes its log file into the working directory.
    let workdir = tempfile::tempdir().unwrap();
    let cwd = workdir.path().to_path_buf();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .current_dir(cwd)
            .env("CMQ_ENDPOINT", endpoint)
            .env("CMQ_SECRET_ID", ALICE.0)
            .env("CMQ_SECRET_KEY", ALICE.1)
            .env_remove("PYTHONPATH")
            .env("PYTHONUNBUFFERED", "1")
            .output()
    });
    let output = tokio::time::timeout(SCENARIO_TIMEOUT, run)
        .await
        .expect("the scenario did not finish in time")
        .unwrap()
        .expect("cannot run the scenario");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let sdk_log =
        std::fs::read_to_string(workdir.path().join("CMQ_python_sdk.log")).unwrap_or_default();
    let sdk_log_tail: String = {
        let lines: Vec<&str> = sdk_log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    assert!(
        output.status.success() && stdout.contains("SCENARIO OK"),
        "the SDK scenario failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- SDK log (last lines)\n{sdk_log_tail}",
        output.status
    );
    broker.stop().await;
}

/// The same scenario against a follower of a 3-node cluster of real processes: every request
/// is forwarded to the leader. Before the step that publishes to the topics (made on the first
/// leader, with their subscriptions), the scenario pauses, the test kills the leader with
/// SIGKILL and lets it go on at once: the follower rides out the election (or is elected), and
/// every later step must see what the first leader acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_runs_against_a_follower_while_the_leader_is_killed() {
    use crate::cluster_support::{
        ClusterOptions, RealCluster, CLUSTER_SECRET_ID, CLUSTER_SECRET_KEY, LEADER_WAIT,
    };
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    let python = match tokio::task::spawn_blocking(prepare_venv).await.unwrap() {
        Ok(python) => python,
        Err(reason) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run this test (python3, python3-venv and PyPI): {reason}"
            );
            eprintln!("SKIPPED: the CMQ Python SDK is not available: {reason}");
            return;
        }
    };
    let mut cluster = RealCluster::start(
        3,
        ClusterOptions {
            http: true,
            ..ClusterOptions::default()
        },
    )
    .await;
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let follower = cluster.other_than(leader);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cmq_sdk/scenario.py");
    let workdir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .current_dir(workdir.path())
        .env("CMQ_ENDPOINT", format!("http://{}", cluster.http(follower)))
        .env("CMQ_SECRET_ID", CLUSTER_SECRET_ID)
        .env("CMQ_SECRET_KEY", CLUSTER_SECRET_KEY)
        .env("CMQ_PAUSE_BEFORE", "publish and batch publish")
        .env_remove("PYTHONPATH")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run the scenario");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = String::new();
    let mut killed = false;
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line == "PAUSED" {
                cluster.kill9(leader);
                killed = true;
                stdin.write_all(b"go\n").await.unwrap();
                stdin.flush().await.unwrap();
            }
            stdout.push_str(&line);
            stdout.push('\n');
        }
        let mut err = String::new();
        stderr.read_to_string(&mut err).await.unwrap();
        (child.wait().await.unwrap(), err)
    };
    let (status, stderr) = tokio::time::timeout(SCENARIO_TIMEOUT, run)
        .await
        .expect("the scenario did not finish in time");
    let sdk_log =
        std::fs::read_to_string(workdir.path().join("CMQ_python_sdk.log")).unwrap_or_default();
    let sdk_log_tail: String = {
        let lines: Vec<&str> = sdk_log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    if !(status.success() && stdout.contains("SCENARIO OK")) {
        cluster.print_logs();
    }
    assert!(killed, "the scenario never paused:\n{stdout}\n{stderr}");
    assert!(
        status.success() && stdout.contains("SCENARIO OK"),
        "the SDK scenario against a follower failed ({status}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- SDK log (last lines)\n{sdk_log_tail}"
    );
}
