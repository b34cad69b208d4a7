//! Two `nimgate` processes sharing one real Redis: one minute of requests between them, one
//! concurrency cap between them, and the slots of a replica killed with requests in flight
//! back within the lease's life.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nim_sim::{Sim, SimOptions};

// Shared helpers: not every one is used here.
#[allow(dead_code)]
mod process;
use process::Running;

#[allow(dead_code)]
#[path = "process/redis.rs"]
mod redis_server;
use redis_server::RedisServer;

const KEY: &str = "replica-test-key";

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A replica: the binary serving `sim` with the Redis store at `redis`, the key limited by
/// `limits` (YAML flow mapping).
struct Replica {
    listen: SocketAddr,
    process: Running,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn start(sim: &Sim, redis: &RedisServer, limits: &str) -> Self {
        let (listen, admin) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("nimgate.yaml");
        std::fs::write(
            &config,
            format!(
                "server: {{ listen: \"{listen}\", admin_listen: \"{admin}\" }}\n\
                 backends: [{{ name: sim, url: \"{}\" }}]\n\
                 routes: [{{ model: \"*\", backends: [sim] }}]\n\
                 keys: [{{ name: team, key_env: TEAM_KEY, models: [\"*\"], limits: {limits} }}]\n\
                 rate_limits: {{ store: redis, redis_url: \"{}\", on_store_error: deny, lease_ttl: 2s, timeout: 500ms }}\n",
                sim.url(),
                redis.url()
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nimgate"))
            .args(["--config", config.to_str().unwrap()])
            .env("TEAM_KEY", KEY)
            .env("NIMGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let process = Running(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(listen).is_err() {
            assert!(Instant::now() < deadline, "nimgate did not listen on {listen}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { listen, process, _dir: dir }
    }

    /// A chat request; the whole answer as text.
    fn chat(&self) -> String {
        let mut stream = self.send(false);
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    /// A streamed chat request whose answer is left unread: it stays in flight.
    fn open_stream(&self) -> TcpStream {
        let mut stream = self.send(true);
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "the stream is admitted");
        stream
    }

    fn send(&self, stream: bool) -> TcpStream {
        let body = format!(
            r#"{{"model":"meta/llama-3.1-8b-instruct","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        let mut connection = TcpStream::connect(self.listen).unwrap();
        connection.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        connection.write_all(request.as_bytes()).unwrap();
        connection
    }
}

fn status(answer: &str) -> u16 {
    answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not an HTTP answer: {answer}"))
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn two_processes_admit_one_minute_of_requests_between_them() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sim = runtime.block_on(Sim::start(SimOptions::default())).unwrap();
    let redis = RedisServer::start();
    let replicas = [
        Replica::start(&sim, &redis, "{ requests_per_minute: 60 }"),
        Replica::start(&sim, &redis, "{ requests_per_minute: 60 }"),
    ];
    let started = Instant::now();
    let mut admitted = 0;
    let mut refused = Vec::new();
    for i in 0..120 {
        let answer = replicas[i % 2].chat();
        match status(&answer) {
            200 => admitted += 1,
            429 => refused.push(answer),
            other => panic!("{other}: {answer}"),
        }
    }
    let refilled = started.elapsed().as_secs();
    assert!((58..=62 + refilled).contains(&admitted), "{admitted} admitted in {:?}", started.elapsed());
    assert!(!refused.is_empty());
    for answer in &refused {
        assert_eq!(header(answer, "retry-after"), Some("1"), "{answer}");
    }
    // The wait one replica announces is the other's too.
    assert_eq!(status(&replicas[0].chat()), 429);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status(&replicas[1].chat()), 200);
    runtime.block_on(sim.stop());
}

#[test]
fn max_concurrency_holds_across_processes_and_a_killed_replicas_slots_come_back() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Streams whose chunks are never released: in flight until the test is done.
    let sim = runtime.block_on(Sim::start(SimOptions { gated_chunks: true, ..SimOptions::default() })).unwrap();
    let redis = RedisServer::start();
    let [a, mut b] = [
        Replica::start(&sim, &redis, "{ max_concurrency: 2 }"),
        Replica::start(&sim, &redis, "{ max_concurrency: 2 }"),
    ];
    let _on_a = a.open_stream();
    let _on_b = b.open_stream();
    for replica in [&a, &b] {
        let answer = replica.chat();
        assert_eq!(status(&answer), 429, "{answer}");
        assert!(answer.contains("concurrency_limit_exceeded"), "{answer}");
    }

    // b dies with its stream in flight: nothing releases its lease, which expires (2 s).
    b.process.0.kill().unwrap();
    b.process.0.wait().unwrap();
    let killed = Instant::now();
    let answer = a.chat();
    assert_eq!(status(&answer), 429, "the dead replica's slot is held until its lease expires: {answer}");
    let deadline = killed + Duration::from_secs(10);
    loop {
        let answer = a.chat();
        if status(&answer) == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot did not come back: {answer}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let back_after = killed.elapsed();
    assert!(back_after <= Duration::from_secs(4), "back after {back_after:?}, for a lease of 2 s");
    // The live replica renews its own lease (2 s have passed): one more stream, not two.
    let _second = a.open_stream();
    assert_eq!(status(&a.chat()), 429);
    drop(b);
    runtime.block_on(sim.stop());
}
