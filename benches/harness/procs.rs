//! The processes under test: started pinned to a core with `taskset`, waited for until their
//! port answers, measured from `/proc` (CPU time, RSS) and killed when dropped. Also the nginx
//! reference configuration and the redis-server that `--redis` runs as nimgate's shared store.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A started process (and, for nginx, its workers) that is killed when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `program args`, pinned to `core` when given, with output to `log`.
    pub fn spawn(
        name: &str,
        core: Option<usize>,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Proc, String> {
        let out = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut command = match core {
            Some(core) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(core.to_string()).arg(program);
                c
            }
            None => Command::new(program),
        };
        command.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        Ok(Proc { name: name.to_owned(), child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds used so far by the process and its descendants, as (user, system).
    pub fn cpu_seconds(&self, ticks_per_second: f64) -> (f64, f64) {
        let (user, system) =
            tree(self.pid()).iter().map(|&pid| cpu_ticks(pid)).fold((0, 0), |(u, s), (pu, ps)| (u + pu, s + ps));
        (user as f64 / ticks_per_second, system as f64 / ticks_per_second)
    }

    /// Resident memory now, KiB, summed over the process tree.
    pub fn rss_kib(&self) -> u64 {
        tree(self.pid()).iter().map(|&pid| status_kib(pid, "VmRSS:")).sum()
    }

    /// Peak resident memory so far, KiB, summed over the process tree.
    pub fn peak_rss_kib(&self) -> u64 {
        tree(self.pid()).iter().map(|&pid| status_kib(pid, "VmHWM:")).sum()
    }

    /// Waits until `addr` accepts connections; fails if the process exits first.
    pub fn wait_listening(&mut self, addr: SocketAddr, log: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                let output = fs::read_to_string(log).unwrap_or_default();
                return Err(format!("{} exited ({status}) before listening:\n{output}", self.name));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{} did not listen on {addr} within 20 s", self.name))
    }

    /// Waits until the redis-server at `addr` answers PING: it accepts connections before it is
    /// ready, and answers `-LOADING` until then. Fails if it exits first.
    pub fn wait_redis(&mut self, addr: SocketAddr, log: &Path) -> Result<(), String> {
        self.wait_listening(addr, log)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                let output = fs::read_to_string(log).unwrap_or_default();
                return Err(format!("{} exited ({status}) before answering PING:\n{output}", self.name));
            }
            if redis_ping(addr) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{} did not answer PING on {addr} within 20 s", self.name))
    }
}

/// One inline `PING` on a fresh connection: true when the answer is `+PONG`.
fn redis_ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(100)) else { return false };
    let mut reply = [0u8; 7];
    stream.set_read_timeout(Some(Duration::from_millis(500))).is_ok()
        && stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first, so that a process can finish cleanly (and tools wrapped around it,
        // such as a profiler, can write their output); SIGKILL whatever is left after 5 s.
        let pids = tree(self.pid());
        signal("-TERM", self.pid());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in pids.into_iter().rev() {
            signal("-KILL", pid);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal with kill(1); a process that already exited is not an error worth printing.
fn signal(which: &str, pid: u32) {
    let _ = Command::new("kill").arg(which).arg(pid.to_string()).stderr(std::process::Stdio::null()).status();
}

/// `pid` and all its descendants, parents first.
fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(parent) = stat_fields(child).and_then(|f| f.get(1).and_then(|p| p.parse().ok())) {
                parents.push((child, parent));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let current = out[i];
        out.extend(parents.iter().filter(|(_, parent)| *parent == current).map(|(child, _)| *child));
        i += 1;
    }
    out
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// (utime, stime): fields 14 and 15 of stat, 12 and 13 after the command name.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    stat_fields(pid).map_or((0, 0), |f| {
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        (field(11), field(12))
    })
}

fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 when it cannot say.
pub fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A loopback address nothing listens on yet.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// An nginx configuration proxying each `(listen, upstream)` pair with upstream keepalive and
/// no buffering (so streams pass as they come, like nimgate), one worker, no access log.
pub fn nginx_config(prefix: &Path, pairs: &[(SocketAddr, SocketAddr)]) -> String {
    let mut servers = String::new();
    for (i, (listen, upstream)) in pairs.iter().enumerate() {
        let _ = write!(
            servers,
            r#"
    upstream backend{i} {{
        server {upstream};
        keepalive 4096;
    }}
    server {{
        listen {listen} backlog=4096;
        client_max_body_size 10m;
        location / {{
            proxy_pass http://backend{i};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}"#
        );
    }
    let p = prefix.display();
    format!(
        r#"worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{
    worker_connections 19000;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
{servers}
}}
"#
    )
}

/// Where nginx is, if installed.
pub fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// Where redis-server is, if installed: on `PATH`, or where Debian's package puts it.
pub fn redis_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .chain([PathBuf::from("/usr/bin/redis-server")])
        .find(|p| p.is_file())
}

/// A redis-server's arguments: loopback only, on `addr`'s port, nothing written to disk (no
/// snapshots, no append-only file; `dir` only in case something is written anyway).
pub fn redis_args(addr: SocketAddr, dir: &Path) -> Vec<String> {
    let port = addr.port().to_string();
    let dir = dir.display().to_string();
    ["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", &dir]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
