//! The `nimgate` binary as a test's child process: killed if the test fails half way, and
//! signalled from Rust, since minimal systems (a Debian container) have no `kill` program.

use std::process::Child;

pub use nix::sys::signal::Signal;

/// A child process killed (and reaped) when the test ends, however it ends.
pub struct Running(pub Child);

impl Running {
    /// Sends `signal` to the process, as an operator's `kill -SIGNAL PID` would.
    pub fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.0.id()).expect("a pid fits in i32");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal the child process");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
