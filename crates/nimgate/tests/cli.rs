//! The `nimgate` binary as an operator uses it: `check-config` on the shipped examples and on a
//! broken file, `hash-key`, and `demo` answering a real request and exiting cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod process;
use process::{Running, Signal};

fn nimgate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nimgate"));
    command.env_remove("NIMGATE_CONFIG").env("NIMGATE_LOG", "warn");
    command
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

#[test]
fn check_config_accepts_the_shipped_examples() {
    for file in ["config/nimgate.yaml", "config/demo.yaml"] {
        let out = nimgate()
            .args(["check-config"])
            .arg(repo_file(file))
            .env("NVIDIA_API_KEY", "nvapi-example")
            .env("NIMGATE_CI_KEY", "sk-ci-example")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{file}: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(": ok"), "{stdout}");
        assert!(stdout.contains("route(s)"), "{stdout}");
    }
}

#[test]
fn the_shipped_examples_hold_no_key_anyone_could_guess() {
    let guessable = ["password", "1", "123456", "secret", "changeme", "admin", "test", "key", "nimgate", "demo", ""];
    for file in ["config/nimgate.yaml", "config/demo.yaml"] {
        let text = std::fs::read_to_string(repo_file(file)).unwrap();
        for guess in guessable {
            let digest = nimgate::auth::digest_hex(guess);
            assert!(!text.contains(&digest), "{file} holds the digest of {guess:?}");
        }
    }
}

#[test]
fn check_config_lists_every_problem_with_its_path_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "backends:\n  - { name: a, url: 'http://127.0.0.1:8000' }\n  - { name: a, url: 'nope' }\nroutes:\n  - { model: 'x/*', backends: [a, ghost] }\nkeys:\n  - { name: k, key_env: NOT_SET_ANYWHERE, models: [] }\n",
    )
    .unwrap();
    let out = nimgate().arg("check-config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "backends[1].name: duplicate backend name `a`",
        "backends[1].url: `nope` is not an absolute URL",
        "routes[0].backends[1]: unknown backend `ghost`",
        "keys[0].key_env: environment variable NOT_SET_ANYWHERE is not set",
        "keys[0].models: no ACL",
    ] {
        assert!(stderr.contains(expected), "missing `{expected}` in:\n{stderr}");
    }
    assert!(stderr.contains("5 problems"), "{stderr}");
}

#[test]
fn check_config_reports_unreadable_and_unparsable_files() {
    let out = nimgate().args(["check-config", "/no/such/file.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file /no/such/file.yaml"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.yaml");
    std::fs::write(&file, "server:\n  listn: 0.0.0.0:8080\n").unwrap();
    let out = nimgate().arg("check-config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listn"), "{stderr}");
}

#[test]
fn env_overrides_apply_to_check_config() {
    let out = nimgate()
        .arg("check-config")
        .arg(repo_file("config/demo.yaml"))
        .env("NIMGATE__SERVER__LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen: `not-an-address`"));
}

#[test]
fn hash_key_prints_the_sha256_of_an_argument_or_stdin() {
    let expected = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
    let out = nimgate().args(["hash-key", "password"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);

    let mut child = nimgate().arg("hash-key").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"password\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
}

#[test]
fn demo_serves_a_chat_completion_and_exits_0_on_sigterm() {
    let child = nimgate()
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut demo = Running(child);
    let mut stdout = BufReader::new(demo.0.stdout.take().unwrap());
    let mut banner = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !banner.contains("Ctrl-C stops it.") {
        assert!(Instant::now() < deadline, "no banner: {banner}");
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "demo exited early: {banner}");
        banner.push_str(&line);
    }
    let addr = banner
        .lines()
        .find_map(|line| line.trim().strip_prefix("gateway    http://"))
        .expect("the banner shows the gateway URL")
        .to_owned();
    assert!(banner.contains("API key    sk-nimgate-demo"), "{banner}");
    assert!(banner.contains(&format!("curl -s http://{addr}/v1/chat/completions")), "{banner}");

    let body = r#"{"model":"llama","messages":[{"role":"user","content":"Hello!"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer sk-nimgate-demo\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"chat.completion\""), "{answer}");

    demo.signal(Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = demo.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "demo did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_gateway_warns_when_its_open_file_limit_cannot_hold_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nimgate.yaml");
    std::fs::write(
        &config,
        "server: { listen: \"127.0.0.1:0\", admin_listen: \"127.0.0.1:0\", allow_anonymous: true, max_connections: 5000 }\n\
         backends: [{ name: a, url: \"http://127.0.0.1:9\" }]\nroutes: [{ model: \"*\", backends: [a] }]\n",
    )
    .unwrap();
    // A hard limit of 512 descriptors (or lower, where the machine has less): raised to, but
    // short of 2 x 5,000.
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n 512 || true; exec '{}' --config '{}'", env!("CARGO_BIN_EXE_nimgate"), config.display()))
        .env("NIMGATE_LOG_FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut gateway = Running(child);
    let mut stderr = BufReader::new(gateway.0.stderr.take().unwrap());
    let mut logged = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !logged.contains("nimgate listening") {
        assert!(Instant::now() < deadline, "not listening: {logged}");
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the gateway exited: {logged}");
        logged.push_str(&line);
    }
    assert!(logged.contains("the open-file limit cannot hold max_connections"), "{logged}");
    assert!(logged.contains("max_connections=5000"), "{logged}");
}
