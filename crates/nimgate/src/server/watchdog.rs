//! The deadlines of one client connection, kept apart from hyper's polling so that they hold
//! whatever the client does: send nothing, send a head byte by byte, keep an idle connection
//! (or an idle h2 connection answering pings) open, or stop reading its answer. hyper only
//! polls a response body while it can write, so a body's own timers stop with a client that
//! does not read; this watchdog does not.
//!
//! - Opening: the first request's head must be complete within `header_read_timeout` of the
//!   accept, TLS handshake and protocol detection included. Otherwise: closed.
//! - Idle (no request in flight): closed gracefully after `idle_timeout`. On HTTP/1.1, once
//!   the first byte of a next head arrives, the head must be complete within
//!   `header_read_timeout` of it (enforced within twice that: see `verdict`).
//! - A client that has taken no byte for `idle_timeout` while the gateway has bytes for it is
//!   closed, which drops its response bodies: the backend slot and upstream connection go.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::activity::{Activity, Moment};
use crate::metrics::Metrics;

/// The connection's timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub header_read: Duration,
    pub idle: Duration,
}

/// Why the watchdog ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No complete first request head within `header_read_timeout` of the accept.
    FirstBytes,
    /// A later request head not complete within `header_read_timeout` of its first byte.
    HeaderRead,
    /// No request for `idle_timeout`: closed gracefully (h2: GOAWAY).
    Idle,
    /// The client took no byte of its answers for `idle_timeout`.
    WriteStalled,
}

impl Expiry {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FirstBytes => "first_bytes",
            Self::HeaderRead => "header_read",
            Self::Idle => "idle",
            Self::WriteStalled => "write_stalled",
        }
    }

    /// Whether the connection may finish what it is doing (nothing is in flight) rather than
    /// be dropped at once.
    pub fn graceful(self) -> bool {
        self == Self::Idle
    }
}

/// What to do at `moment`: wait for a change (until a deadline, when there is one) or end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is due; look again at this stored time (or on a change).
    Wait(u64),
    End(Expiry),
}

/// The decision, on plain numbers (milliseconds as `Activity` stores them). Requests starting
/// and ending wake nobody (that would cost every request a poll and a timer reset): the
/// watchdog looks again at least every `header_read_timeout` (or `idle_timeout`, when
/// shorter), which is when a request's end or a started head is noticed. So a head deadline
/// is kept within twice `header_read_timeout`; the others exactly.
pub fn verdict(m: &Moment, deadlines: &Deadlines) -> Verdict {
    let header_read = millis(deadlines.header_read);
    let idle = millis(deadlines.idle);
    // A full socket counts in every phase: the tail of an answer may still be going out.
    let write_due = (m.write_blocked != 0).then(|| (m.write_blocked.saturating_add(idle), Expiry::WriteStalled));
    let phase_due = if m.started == 0 {
        Some((1u64.saturating_add(header_read), Expiry::FirstBytes))
    } else if m.in_flight > 0 {
        None
    } else if m.head_started != 0 {
        Some((m.head_started.saturating_add(header_read), Expiry::HeaderRead))
    } else {
        Some((m.idle_since.saturating_add(idle), Expiry::Idle))
    };
    let due = match (write_due, phase_due) {
        (Some(w), Some(p)) => Some(if w.0 <= p.0 { w } else { p }),
        (w, p) => w.or(p),
    };
    let look_again = m.now.saturating_add(idle.min(header_read));
    match due {
        Some((at, expiry)) if m.now >= at => Verdict::End(expiry),
        Some((at, _)) => Verdict::Wait(at.min(look_again)),
        None => Verdict::Wait(look_again),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Watches `activity` until one of its deadlines passes.
pub async fn watch(activity: &Activity, deadlines: Deadlines) -> Expiry {
    let sleep = tokio::time::sleep_until(activity.accepted());
    tokio::pin!(sleep);
    loop {
        match verdict(&activity.moment(), &deadlines) {
            Verdict::End(expiry) => return expiry,
            Verdict::Wait(at) => {
                sleep.as_mut().reset(activity.instant(at));
                sleep.as_mut().await;
            }
        }
    }
}

/// The watchdog's own task, beside its connection's: polled only when one of its deadlines
/// comes (never on the connection's wake-ups, which would cost every frame). It ends with the
/// connection. An expiry that allows it, and the drain, ask the connection to finish
/// gracefully; any other expiry, or a graceful finish that takes longer than a head's time
/// while nothing is in flight, aborts the connection's task, which closes its socket and
/// drops its response bodies.
pub async fn guard(
    activity: Arc<Activity>,
    deadlines: Deadlines,
    connection: JoinHandle<()>,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    peer: SocketAddr,
) {
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = &mut connection => return,
            expiry = watch(&activity, deadlines) => {
                metrics.connections_expired.with_label_values(&[expiry.as_str()]).inc();
                tracing::debug!(%peer, reason = expiry.as_str(), "connection closed by its deadline");
                if expiry.graceful() {
                    // Nothing is in flight: hyper closes at once (h2 after its GOAWAY).
                    activity.stop_gracefully();
                    let _ = tokio::time::timeout(deadlines.header_read, &mut connection).await;
                }
                connection.abort();
                return;
            }
            () = draining_begins(&mut shutdown), if !draining => {
                draining = true;
                activity.stop_gracefully();
            }
        }
    }
}

/// Resolves when the server starts draining (or is gone).
async fn draining_begins(shutdown: &mut watch::Receiver<bool>) {
    loop {
        let stopping = *shutdown.borrow_and_update();
        if stopping || shutdown.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Deadlines = Deadlines { header_read: Duration::from_secs(10), idle: Duration::from_secs(120) };

    fn at(now: u64) -> Moment {
        Moment { now, idle_since: 1, ..Moment::default() }
    }

    #[test]
    fn a_connection_must_complete_its_first_head_within_the_header_read_timeout() {
        assert_eq!(verdict(&at(5_000), &D), Verdict::Wait(10_001));
        assert_eq!(verdict(&at(10_001), &D), Verdict::End(Expiry::FirstBytes));
        // Bytes arriving do not extend it (a client sending `P` and nothing more).
        let trickling = Moment { head_started: 2, ..at(10_001) };
        assert_eq!(verdict(&trickling, &D), Verdict::End(Expiry::FirstBytes));
    }

    #[test]
    fn a_busy_connection_has_no_deadline_until_its_client_stops_reading() {
        let busy = Moment { started: 1, in_flight: 1, ..at(500_000) };
        assert_eq!(verdict(&busy, &D), Verdict::Wait(510_000), "only a look again");
        let blocked = Moment { write_blocked: 400_000, ..busy };
        assert_eq!(verdict(&blocked, &D), Verdict::Wait(510_000));
        assert_eq!(verdict(&Moment { now: 519_000, ..blocked }, &D), Verdict::Wait(520_000));
        assert_eq!(verdict(&Moment { now: 520_000, ..blocked }, &D), Verdict::End(Expiry::WriteStalled));
    }

    #[test]
    fn an_idle_connection_closes_after_the_idle_timeout_and_a_started_head_after_the_header_timeout() {
        let idle = Moment { started: 3, idle_since: 50_000, ..at(60_000) };
        assert_eq!(verdict(&idle, &D), Verdict::Wait(70_000), "looks again for a started head");
        assert_eq!(verdict(&Moment { now: 165_000, ..idle }, &D), Verdict::Wait(170_000));
        assert_eq!(verdict(&Moment { now: 170_000, ..idle }, &D), Verdict::End(Expiry::Idle));
        let heading = Moment { head_started: 100_000, ..idle };
        assert_eq!(verdict(&Moment { now: 101_000, ..heading }, &D), Verdict::Wait(110_000));
        assert_eq!(verdict(&Moment { now: 110_000, ..heading }, &D), Verdict::End(Expiry::HeaderRead));
        assert!(Expiry::Idle.graceful() && !Expiry::HeaderRead.graceful());
    }

    #[test]
    fn a_short_idle_timeout_is_looked_for_as_often() {
        let d = Deadlines { header_read: Duration::from_secs(10), idle: Duration::from_millis(800) };
        assert_eq!(verdict(&at(5_000), &d), Verdict::Wait(5_800));
    }

    #[test]
    fn huge_timeouts_saturate_instead_of_wrapping() {
        let d = Deadlines { header_read: Duration::MAX, idle: Duration::MAX };
        assert_eq!(verdict(&at(u64::MAX - 1), &d), Verdict::Wait(u64::MAX));
    }
}
