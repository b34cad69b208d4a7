//! Graceful drain of the real binary: SIGTERM during a stream lets the stream finish, refuses
//! new connections at once, and exits 0.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nim_sim::{Sim, SimOptions};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let child = Command::new(env!("CARGO_BIN_EXE_nimgate"))
        .args(["--config", config.to_str().unwrap()])
        .env("NIMGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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

    let pid = gateway.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    std::thread::sleep(Duration::from_millis(200));
    assert!(TcpStream::connect(listen).is_err(), "new connections are refused during the drain");

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
    runtime.block_on(sim.stop());
}
