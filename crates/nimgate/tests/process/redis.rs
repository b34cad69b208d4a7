//! A real `redis-server` of the test's own on an ephemeral loopback port, without persistence,
//! killed (by its PID) when the test ends. Stopped and started again on the same port for the
//! tests of an outage. `scripts/test` installs Debian's redis-server when it is missing.
//! Shared by the binary's tests and the integration tests (`#[path]`).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// `(certificate, key)` PEM files: the server speaks only TLS on its port.
    tls: Option<(String, String)>,
}

impl RedisServer {
    /// A new server on a free port.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A new server speaking only TLS, with the certificate and key of these PEM files
    /// (clients are not asked for certificates).
    pub fn start_tls(certificate: &std::path::Path, key: &std::path::Path) -> Self {
        let paths = (certificate.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned());
        Self::start_with(Some(paths))
    }

    fn start_with(tls: Option<(String, String)>) -> Self {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut server = Self { port, child: None, tls: tls.clone() };
            if server.start_again_within(Duration::from_secs(10)) {
                return server;
            }
        }
        panic!("redis-server did not start (scripts/test installs it: apt-get install redis-server)");
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (as a crash would): its data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid fits in i32"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the server runs");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid fits in i32"));
        nix::sys::signal::kill(pid, signal).expect("signal redis-server");
    }

    /// Starts it again on the same port, empty.
    pub fn start_again(&mut self) {
        assert!(self.start_again_within(Duration::from_secs(10)), "redis-server did not start again on {}", self.port);
    }

    fn start_again_within(&mut self, deadline: Duration) -> bool {
        self.stop();
        let port = self.port.to_string();
        let listen: Vec<&str> = match &self.tls {
            None => vec!["--port", &port],
            Some((certificate, key)) => vec![
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                certificate,
                "--tls-key-file",
                key,
                "--tls-auth-clients",
                "no",
            ],
        };
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--logfile", "", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test installs it: apt-get install redis-server)");
        self.child = Some(child);
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if self.ping() {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false; // exited: the port was taken meanwhile
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// One command in Redis's inline protocol; its first reply line (plain servers only).
    pub fn command(&self, command: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("redis-server listens");
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.write_all(format!("{command}\r\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line.trim_end().to_owned()
    }

    /// Whether it answers (a TLS server: whether it listens).
    fn ping(&self) -> bool {
        if self.tls.is_some() {
            return TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        }
        TcpStream::connect(("127.0.0.1", self.port)).is_ok_and(|mut stream| {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut line = String::new();
            stream.write_all(b"PING\r\n").is_ok()
                && BufReader::new(stream).read_line(&mut line).is_ok()
                && line.starts_with("+PONG")
        })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
