//! The real binary's signals: SIGTERM during a stream lets the stream finish, refuses new
//! connections at once, and exits 0; SIGHUP reloads the config file, and a changed listen
//! address is reported as needing a restart.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nim_sim::{Sim, SimOptions};

mod process;
use process::{Running, Signal};

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[test]
fn sigterm_during_a_stream_finishes_it_refuses_new_connections_and_exits_0() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // 40 chunks 25 ms apart: a stream of about a second.
    let sim = runtime
        .block_on(Sim::start(SimOptions {
            tokens: 40,
            chunk_delay: Duration::from_millis(25),
            ..SimOptions::default()
        }))
        .unwrap();
    let (listen, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nimgate.yaml");
    std::fs::write(
        &config,
        format!(
            "server: {{ listen: \"{listen}\", admin_listen: \"{admin}\", allow_anonymous: true, drain_timeout: 10s }}\n\
             backends: [{{ name: sim, url: \"{}\" }}]\n\
             routes: [{{ model: \"*\", backends: [sim] }}]\n",
            sim.url()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("stderr.log");
    let child = Command::new(env!("CARGO_BIN_EXE_nimgate"))
        .args(["--config", config.to_str().unwrap()])
        .env("NIMGATE_LOG", "info")
        .env_remove("NIMGATE_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut gateway = Running(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        match TcpStream::connect(listen) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("nimgate did not listen on {listen}: {e}"),
        }
    };

    let body = r#"{"model":"meta/llama-3.1-8b-instruct","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "the stream ended before its first event");
        seen.extend_from_slice(&buffer[..n]);
    }

    gateway.signal(Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(listen).is_ok() {
        assert!(Instant::now() < deadline, "new connections are refused during the drain");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The stream goes on to its end. The server closes the drained connection after it.
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                seen.extend_from_slice(&buffer[..n]);
                if String::from_utf8_lossy(&seen).contains("0\r\n\r\n") {
                    break;
                }
            }
            Err(e) => panic!("the stream broke during the drain: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("data: [DONE]"), "the stream completed: {text}");
    assert_eq!(text.matches("chat.completion.chunk").count(), 42, "role, 40 tokens, finish: {text}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = gateway.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "nimgate did not exit after the drain");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    // The default log format is text, one line per event.
    let log = std::fs::read_to_string(&log_path).unwrap();
    for said in ["nimgate listening", "SIGTERM received", "shutting down", "drained"] {
        let line = log.lines().find(|l| l.contains(said)).unwrap_or_else(|| panic!("no `{said}` in {log}"));
        assert!(line.contains(" INFO ") && !line.starts_with('{'), "a text line: {line}");
    }
    runtime.block_on(sim.stop());
}

/// One request with `Connection: close`; the whole answer as text.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    http_with(addr, method, path, "", body)
}

/// `http` with extra header lines (each ending in CRLF).
fn http_with(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{headers}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_reloads_routes_keys_and_limits_refuses_a_bad_file_and_a_new_listen_address_needs_a_restart() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sim = runtime
        .block_on(Sim::start(SimOptions { models: vec!["a/one".into(), "b/two".into()], ..SimOptions::default() }))
        .unwrap();
    let (listen, admin, elsewhere) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nimgate.yaml");
    let digest = |name: &str| nimgate::auth::digest_hex(&format!("sk-{name}"));
    let write = |listen: SocketAddr, routes: &str, keys: &str| {
        std::fs::write(
            &config,
            format!(
                "server: {{ listen: \"{listen}\", admin_listen: \"{admin}\" }}\n\
                 logging: {{ format: json, level: info }}\n\
                 backends: [{{ name: sim, url: \"{}\" }}]\n\
                 routes: [{routes}]\n\
                 keys: [{keys}]\n",
                sim.url()
            ),
        )
        .unwrap();
    };
    let team_a = |rpm: u32| {
        format!(
            "{{ name: team-a, key_sha256: {}, models: [\"*\"], limits: {{ requests_per_minute: {rpm} }} }}",
            digest("team-a")
        )
    };
    let team_b = format!("{{ name: team-b, key_sha256: {}, models: [\"*\"] }}", digest("team-b"));
    write(listen, "{ model: a/one, backends: [sim] }", &format!("{}, {team_b}", team_a(600)));
    // The format comes from the config file's `logging:` (no NIMGATE_LOG_FORMAT here).
    let mut child = Command::new(env!("CARGO_BIN_EXE_nimgate"))
        .args(["--config", config.to_str().unwrap()])
        .env_remove("NIMGATE_LOG")
        .env_remove("NIMGATE_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log, read as it comes, to tell which trigger reloaded.
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let reader = {
        let log = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        })
    };
    let gateway = Running(child);
    wait_listening(listen);
    wait_listening(admin);
    let chat = |key: &str, model: &str| {
        http_with(
            listen,
            "POST",
            "/v1/chat/completions",
            &format!("authorization: Bearer sk-{key}\r\n"),
            &format!(r#"{{"model":"{model}","messages":[]}}"#),
        )
    };
    assert!(chat("team-a", "b/two").starts_with("HTTP/1.1 404"));
    assert!(chat("team-b", "a/one").starts_with("HTTP/1.1 200"));
    assert!(chat("team-a", "a/one").contains("x-ratelimit-limit-requests: 600\r\n"));
    let sighup = || gateway.signal(Signal::SIGHUP);
    let wait_log = |what: &str, found: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !log.lock().unwrap().lines().any(found) {
            assert!(Instant::now() < deadline, "no {what} in the log: {}", log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // A new route, a revoked key, a changed limit, and a new listen address that cannot change
    // without a restart. The file watch may pick the change up before the signal does; either
    // way it applies, and the log shows the signal's own reload.
    write(elsewhere, "{ model: a/one, backends: [sim] }, { model: b/two, backends: [sim] }", &team_a(1200));
    sighup();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !chat("team-a", "b/two").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "the reload did not apply");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(chat("team-b", "a/one").starts_with("HTTP/1.1 401"), "the removed key is refused");
    assert!(chat("team-a", "a/one").contains("x-ratelimit-limit-requests: 1200\r\n"), "the new limit is in force");
    let answer = http(admin, "GET", "/admin/config", "");
    let body: serde_json::Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(body["version"].as_u64().unwrap() >= 2, "{body}");
    assert_eq!(body["restart_needed"], serde_json::json!(["server.listen"]), "{body}");
    assert!(TcpStream::connect(elsewhere).is_err(), "the old listener stays until a restart");
    wait_log("reload by SIGHUP", &|line| line.contains("config reloaded") && line.contains(r#""trigger":"SIGHUP""#));

    // A broken file: refused with its field path, in the log and the error counter; the
    // configuration in force keeps serving.
    write(elsewhere, "{ model: a/one, backends: [nowhere] }", &team_a(1200));
    sighup();
    wait_log("refused reload with its field path", &|line| {
        line.contains("config reload refused") && line.contains("routes[0].backends")
    });
    assert!(chat("team-a", "b/two").starts_with("HTTP/1.1 200"), "the last good config serves");
    let metrics = http(admin, "GET", "/metrics", "");
    assert!(!metrics.contains("nimgate_config_reloads_total{result=\"error\"} 0\n"), "{metrics}");
    assert!(metrics.contains("nimgate_config_reloads_total{result=\"error\"} "), "{metrics}");
    drop(gateway);
    let _ = reader.join();
    // Every line was JSON, as `logging.format` asked.
    for line in log.lock().unwrap().lines() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "not JSON: {line}");
    }
    runtime.block_on(sim.stop());
}

#[test]
fn the_access_log_has_one_line_per_request_at_its_end_and_no_secrets() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sim = runtime.block_on(Sim::start(SimOptions { tokens: 5, ..SimOptions::default() })).unwrap();
    let stalling = runtime
        .block_on(Sim::start(SimOptions {
            failures: nim_sim::Failures { stall_after_chunks: Some(2), ..Default::default() },
            ..SimOptions::default()
        }))
        .unwrap();
    let (listen, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nimgate.yaml");
    std::fs::write(
        &config,
        format!(
            "server: {{ listen: \"{listen}\", admin_listen: \"{admin}\" }}\n\
             backends: [{{ name: gpu, url: \"{}\" }}, {{ name: stuck, url: \"{}\", timeouts: {{ idle: 200ms }} }}]\n\
             routes: [{{ model: \"meta/*\", backends: [gpu] }},\n\
               {{ model: stuck/model, backends: [stuck], upstream_model: meta/llama-3.1-8b-instruct }}]\n\
             keys: [{{ name: team-a, key_env: TEAM_A_KEY, models: [\"*\"] }}]\n",
            sim.url(),
            stalling.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nimgate"))
        .args(["--config", config.to_str().unwrap()])
        .env("NIMGATE_LOG", "warn,nimgate::access=info")
        .env("NIMGATE_LOG_FORMAT", "json")
        .env("TEAM_A_KEY", "sk-very-secret-key")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let gateway = Running(child);
    wait_listening(listen);
    let send = |body: &str, key: &str| {
        http_with(listen, "POST", "/v1/chat/completions", &format!("authorization: Bearer {key}\r\n"), body)
    };
    let prompt = r#""messages":[{"role":"user","content":"my confidential prompt"}]"#;
    let model = "meta/llama-3.1-8b-instruct";
    let answer = send(&format!(r#"{{"model":"{model}",{prompt}}}"#), "sk-very-secret-key");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let streamed = send(&format!(r#"{{"model":"{model}","stream":true,{prompt}}}"#), "sk-very-secret-key");
    assert!(streamed.contains("[DONE]"), "{streamed}");
    assert!(send(&format!(r#"{{"model":"{model}",{prompt}}}"#), "sk-wrong-key").starts_with("HTTP/1.1 401"));
    let broken = send(&format!(r#"{{"model":"stuck/model","stream":true,{prompt}}}"#), "sk-very-secret-key");
    assert!(broken.contains("upstream_timeout") && !broken.contains("[DONE]"), "{broken}");
    gateway.signal(Signal::SIGTERM);
    let mut log = String::new();
    std::io::BufReader::new(stderr).read_to_string(&mut log).unwrap();
    drop(gateway);

    assert!(!log.contains("sk-very-secret-key") && !log.contains("sk-wrong-key"), "{log}");
    assert!(!log.contains("confidential"), "{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "nimgate::access")
        .collect();
    assert_eq!(lines.len(), 4, "one line per request: {log}");
    // Flattened JSON: the fields sit beside `target` and `message`.
    let fields: Vec<&serde_json::Value> = lines.iter().collect();
    // The JSON answer, then the stream: both complete, with their tokens.
    for line in &fields[..2] {
        assert_eq!(line["key"], "team-a", "{line}");
        assert_eq!(
            (line["model"].as_str(), line["route"].as_str()),
            (Some("meta/llama-3.1-8b-instruct"), Some("meta/*"))
        );
        assert_eq!((line["backend"].as_str(), line["attempts"].as_u64()), (Some("gpu"), Some(1)));
        assert_eq!((line["status"].as_u64(), line["outcome"].as_str()), (Some(200), Some("complete")), "{line}");
        assert_eq!(line["completion_tokens"], 5, "{line}");
        assert!(line["prompt_tokens"].as_u64().unwrap() > 0);
        assert!(line["bytes"].as_u64().unwrap() > 100);
        assert!(line["duration_ms"].as_f64().unwrap() >= line["ttfb_ms"].as_f64().unwrap());
        assert!(line["request_id"].as_str().unwrap().len() >= 16);
    }
    assert_eq!((fields[2]["status"].as_u64(), fields[2]["code"].as_str()), (Some(401), Some("invalid_api_key")));
    assert_eq!(fields[2]["key"], "-");
    // The broken stream: logged once, in its access line, with the cause.
    let stuck = fields[3];
    assert_eq!((stuck["level"].as_str(), stuck["outcome"].as_str()), (Some("WARN"), Some("timeout")), "{stuck}");
    assert_eq!(stuck["error"], "the backend sent nothing for 200ms", "{stuck}");
    assert_eq!((stuck["route"].as_str(), stuck["backend"].as_str()), (Some("stuck/model"), Some("stuck")));
    assert_eq!(log.matches("sent nothing for 200ms").count(), 1, "the error is logged once: {log}");
    runtime.block_on(sim.stop());
}
