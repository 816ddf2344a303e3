//! The tunnel's close machine, pure: when sluice's Close frames go out.
//!
//! A close request waits for the moment right after an answer went to the
//! client (both directions between messages), or, after [`QUIET_MAX_WAIT`],
//! for the next message boundary of each direction; a tunnel already silent
//! that long closes at once. Then the backend gets the Close
//! first and the backend's reply is replaced by sluice's own Close to the
//! client. If the backend does not answer within `close_timeout`, the
//! client gets its Close at its next boundary. A peer that starts the close
//! handshake itself is left to finish it. A message in flight holds the
//! Close frames back (sluice never cuts a message on its own account), but
//! only for `max_message_wait` after the close began: then the tunnel is
//! cut. The machine sees the flows only through [`Seen`], and time only
//! through the `now` it is given.

use std::time::Duration;

use tokio::time::Instant;

/// How long a close waits for an answer to go to the client, the moment a
/// client is least likely to be sending (it has just been answered); then
/// each direction gets its Close frame at its own next message boundary. A
/// tunnel silent this long when the close is asked for closes at once.
///
/// Measured with 2,000 clients that each send every 500 ms and wait for
/// the echo (`cargo bench --bench drain_bench -- --conns 2000 --window 10
/// --every 500`): closing after 500 ms of silence counted from the last
/// bytes caught 631 messages in 1,000 closes (the silence ended exactly
/// when each client's next message was due); counted from the request,
/// 3.0-4.5; waiting for the answer, as now, see the README.
pub const QUIET_MAX_WAIT: Duration = Duration::from_secs(2);

/// How long a Ping waits for a frame towards the client to end before the
/// tunnel looks again (new data wakes it sooner).
pub const FRAME_WAIT: Duration = Duration::from_millis(500);

/// What the machine needs to know of the two directions at one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Bytes moved, either way, since the last step.
    pub active: bool,
    /// Both directions are between messages.
    pub at_boundary: bool,
    /// A peer sent a Close frame (either direction).
    pub peer_close: bool,
    /// sluice's Close to the client is out or on its way (the backend's
    /// reply came and was replaced).
    pub client_closed: bool,
    /// A Close frame of sluice's waits for its direction's message to end.
    pub close_owed: bool,
    /// A message to the client ended since the last step: a client that
    /// waits for answers has just had one and is least likely to be
    /// sending.
    pub answered: bool,
}

/// What the flows are to do after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing new.
    None,
    /// Close towards the backend at its next message boundary, and replace
    /// the backend's Close reply to the client with ours.
    CloseBackend(u16),
    /// The backend did not answer in time: close towards the client at its
    /// next message boundary.
    CloseClient(u16),
    /// A message outlived `max_message_wait`: end the tunnel now.
    Cut,
}

/// Where the tunnel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Proxying.
    Open,
    /// A close was requested; waiting for an answer to the client.
    Requested {
        code: u16,
        since: Instant,
        /// When asked, the tunnel had been silent for `QUIET_MAX_WAIT`, and
        /// it has been since.
        idle: bool,
    },
    /// Close frames are out (ours or the peers'); waiting for the peers.
    Closing {
        deadline: Instant,
        /// Our close code while the client still waits for our Close: if
        /// the backend has not answered by the deadline, the client gets it
        /// then.
        client_pending: Option<u16>,
        /// A message still in flight at this time is cut.
        message_deadline: Instant,
    },
}

/// The close state of one tunnel.
#[derive(Debug, Clone, Copy)]
pub struct CloseMachine {
    phase: Phase,
    close_timeout: Duration,
    max_message_wait: Duration,
}

impl CloseMachine {
    /// An open tunnel whose close handshake may take `close_timeout` after
    /// the Close frames are out, and whose messages in flight may hold the
    /// close back for `max_message_wait`.
    pub fn new(close_timeout: Duration, max_message_wait: Duration) -> Self {
        Self {
            phase: Phase::Open,
            close_timeout,
            max_message_wait,
        }
    }

    /// True while proxying with no close requested or under way.
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// True once Close frames are out and the peers are awaited.
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    /// True when the close handshake has run out of time at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        matches!(self.phase, Phase::Closing { deadline, .. } if now >= deadline)
    }

    /// A close with `code` was requested at `now`; bytes last moved at
    /// `last_activity`. Only the first request of an open tunnel counts.
    /// (An answer that went out just before the request does not make it
    /// the moment: a client that thinks for 50 ms after each answer then
    /// sent its next request into the Close, 10 in 1,000 closes.)
    pub fn request(&mut self, code: u16, now: Instant, last_activity: Instant) {
        if self.is_open() {
            self.phase = Phase::Requested {
                code,
                since: now,
                idle: now >= last_activity + QUIET_MAX_WAIT,
            };
        }
    }

    /// Advances the machine with what the flows show at `now`; returns what
    /// they must do and the next time the machine must be looked at (it
    /// also must on any new data).
    pub fn step(&mut self, seen: Seen, now: Instant) -> (Action, Option<Instant>) {
        match self.phase {
            Phase::Open => (Action::None, None),
            Phase::Requested {
                code,
                since,
                mut idle,
            } => {
                if seen.active {
                    idle = false;
                }
                let message_deadline = since + self.max_message_wait;
                if seen.peer_close {
                    // A peer started the close handshake itself: let it finish.
                    self.phase = Phase::Closing {
                        deadline: now + self.close_timeout,
                        client_pending: None,
                        message_deadline,
                    };
                    return self.step(seen, now);
                }
                let moment = idle || seen.answered;
                if (seen.at_boundary && moment) || now >= since + QUIET_MAX_WAIT {
                    self.phase = Phase::Closing {
                        deadline: now + self.close_timeout,
                        client_pending: Some(code),
                        message_deadline,
                    };
                    return (Action::CloseBackend(code), None);
                }
                self.phase = Phase::Requested { code, since, idle };
                // Only new data (a readiness wake) or the end of the wait
                // can change anything.
                (Action::None, Some(since + QUIET_MAX_WAIT))
            }
            Phase::Closing {
                deadline,
                client_pending,
                message_deadline,
            } => {
                if seen.close_owed || !seen.at_boundary {
                    // A message is in flight: a Close waits for its end (ours,
                    // or a peer's answer), and close_timeout starts after it.
                    if now >= message_deadline {
                        return (Action::Cut, None);
                    }
                    self.phase = Phase::Closing {
                        deadline: deadline.max(now + self.close_timeout),
                        client_pending,
                        message_deadline,
                    };
                    // New data wakes the tunnel; else the wait's end does.
                    return (Action::None, Some(message_deadline));
                }
                if now >= deadline
                    && let Some(code) = client_pending
                    && !seen.client_closed
                {
                    // The backend did not answer: the client gets its Close
                    // at its next message boundary, and close_timeout more.
                    self.phase = Phase::Closing {
                        deadline: now + self.close_timeout,
                        client_pending: None,
                        message_deadline,
                    };
                    return (Action::CloseClient(code), None);
                }
                (Action::None, Some(deadline))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);
    const WAIT: Duration = Duration::from_secs(30);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const IDLE: Seen = Seen {
        active: false,
        at_boundary: true,
        peer_close: false,
        client_closed: false,
        close_owed: false,
        answered: false,
    };

    #[test]
    fn open_tunnels_wait_for_nothing() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        assert_eq!(m.step(IDLE, t0), (Action::None, None));
        assert!(m.is_open());
    }

    #[test]
    fn waits_for_an_answer_to_the_client_then_for_the_longest_wait() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        m.request(1012, t0, t0);
        assert!(!m.is_open());
        let wait = t0 + QUIET_MAX_WAIT;
        assert_eq!(m.step(IDLE, t0), (Action::None, Some(wait)));
        // Traffic without an answer to the client (the client talking) is
        // no moment to close.
        let busy = Seen {
            active: true,
            ..IDLE
        };
        assert_eq!(m.step(busy, t0 + ms(30)), (Action::None, Some(wait)));
        assert_eq!(m.step(IDLE, t0 + ms(500)), (Action::None, Some(wait)));
        assert_eq!(m.step(IDLE, wait), (Action::CloseBackend(1012), None));
        assert!(m.is_closing());
        assert_eq!(
            m.step(IDLE, wait + ms(1)),
            (Action::None, Some(wait + TIMEOUT))
        );
    }

    #[test]
    fn a_second_request_does_not_restart_the_wait() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        m.request(1012, t0, t0);
        m.request(1001, t0 + QUIET_MAX_WAIT - ms(10), t0);
        assert_eq!(
            m.step(IDLE, t0 + QUIET_MAX_WAIT),
            (Action::CloseBackend(1012), None)
        );
    }

    #[test]
    fn busy_tunnels_close_after_the_longest_wait() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        m.request(1012, t0, t0);
        let busy = Seen {
            active: true,
            ..IDLE
        };
        let mut t = t0;
        while t < t0 + QUIET_MAX_WAIT {
            assert_eq!(m.step(busy, t).0, Action::None, "at {:?}", t - t0);
            t += ms(20);
        }
        assert_eq!(
            m.step(busy, t0 + QUIET_MAX_WAIT),
            (Action::CloseBackend(1012), None)
        );
    }

    #[test]
    fn mid_message_it_waits_for_data_or_the_longest_wait() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        m.request(1012, t0, t0);
        let mid_message = Seen {
            at_boundary: false,
            ..IDLE
        };
        // Inside a message: no timer until the longest wait (new data
        // wakes the tunnel anyway).
        assert_eq!(
            m.step(mid_message, t0),
            (Action::None, Some(t0 + QUIET_MAX_WAIT))
        );
        // The flows then close at their own next boundary.
        assert_eq!(
            m.step(mid_message, t0 + QUIET_MAX_WAIT),
            (Action::CloseBackend(1012), None)
        );
    }

    #[test]
    fn a_peer_that_starts_the_close_is_left_to_finish_it() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        m.request(1012, t0, t0);
        let peer_closed = Seen {
            peer_close: true,
            ..IDLE
        };
        assert_eq!(
            m.step(peer_closed, t0 + ms(10)),
            (Action::None, Some(t0 + ms(10) + TIMEOUT))
        );
        assert!(m.is_closing());
        // No Close of ours is owed to the client: at the deadline it ends.
        let deadline = t0 + ms(10) + TIMEOUT;
        assert!(!m.is_expired(deadline - ms(1)));
        assert_eq!(
            m.step(peer_closed, deadline),
            (Action::None, Some(deadline))
        );
        assert!(m.is_expired(deadline));
    }

    #[test]
    fn a_backend_that_never_answers_lets_the_client_have_its_close_late() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        m.request(4000, t0, t0 - QUIET_MAX_WAIT);
        assert_eq!(m.step(IDLE, t0), (Action::CloseBackend(4000), None));
        let sent = t0;
        assert_eq!(
            m.step(IDLE, sent + TIMEOUT - ms(1)),
            (Action::None, Some(sent + TIMEOUT))
        );
        assert_eq!(
            m.step(IDLE, sent + TIMEOUT),
            (Action::CloseClient(4000), None)
        );
        assert!(
            !m.is_expired(sent + TIMEOUT),
            "close_timeout more for the client"
        );
        assert_eq!(
            m.step(IDLE, sent + TIMEOUT + ms(1)),
            (Action::None, Some(sent + TIMEOUT * 2))
        );
        assert!(m.is_expired(sent + TIMEOUT * 2));
    }

    #[test]
    fn a_backend_that_answers_gets_no_second_close_to_the_client() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        m.request(1012, t0, t0 - QUIET_MAX_WAIT);
        assert_eq!(m.step(IDLE, t0), (Action::CloseBackend(1012), None));
        let answered = Seen {
            client_closed: true,
            ..IDLE
        };
        let deadline = t0 + TIMEOUT;
        assert_eq!(m.step(answered, deadline), (Action::None, Some(deadline)));
        assert!(m.is_expired(deadline));
    }

    #[test]
    fn a_message_in_flight_holds_the_close_until_max_message_wait() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        m.request(1012, t0, t0);
        let stuck = Seen {
            at_boundary: false,
            ..IDLE
        };
        assert_eq!(
            m.step(stuck, t0 + QUIET_MAX_WAIT),
            (Action::CloseBackend(1012), None)
        );
        // Our Close to the backend waits for the client's message to end.
        let owed = Seen {
            close_owed: true,
            ..stuck
        };
        let mut t = t0 + QUIET_MAX_WAIT;
        while t < t0 + WAIT {
            assert_eq!(m.step(owed, t), (Action::None, Some(t0 + WAIT)));
            assert!(!m.is_expired(t), "close_timeout waits for the message");
            t += Duration::from_secs(1);
        }
        assert_eq!(m.step(owed, t0 + WAIT), (Action::Cut, None));
    }

    #[test]
    fn close_timeout_starts_when_the_message_has_ended() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        m.request(1012, t0, t0);
        let stuck = Seen {
            at_boundary: false,
            close_owed: true,
            ..IDLE
        };
        assert_eq!(
            m.step(stuck, t0 + QUIET_MAX_WAIT),
            (Action::CloseBackend(1012), None)
        );
        let ended = t0 + Duration::from_secs(12);
        assert_eq!(m.step(stuck, ended), (Action::None, Some(t0 + WAIT)));
        // The Close went out at the boundary; the backend has close_timeout.
        assert_eq!(
            m.step(IDLE, ended + ms(1)),
            (Action::None, Some(ended + TIMEOUT))
        );
        assert_eq!(
            m.step(IDLE, ended + TIMEOUT),
            (Action::CloseClient(1012), None)
        );
    }

    #[test]
    fn closes_right_after_an_answer_went_to_the_client() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        m.request(1012, t0, t0);
        let busy = Seen {
            active: true,
            ..IDLE
        };
        assert_eq!(
            m.step(busy, t0 + ms(5)),
            (Action::None, Some(t0 + QUIET_MAX_WAIT))
        );
        // An answer half-way through is no moment to close...
        let half = Seen {
            answered: true,
            at_boundary: false,
            ..busy
        };
        assert_eq!(m.step(half, t0 + ms(6)).0, Action::None);
        // ...one that has ended, with the client between messages, is.
        let answered = Seen {
            answered: true,
            ..busy
        };
        assert_eq!(
            m.step(answered, t0 + ms(7)),
            (Action::CloseBackend(1012), None)
        );
    }

    #[test]
    fn a_tunnel_idle_for_long_closes_at_once() {
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        let t0 = Instant::now();
        let asked = t0 + QUIET_MAX_WAIT;
        m.request(1012, asked, t0);
        assert_eq!(m.step(IDLE, asked), (Action::CloseBackend(1012), None));
        // One that moved bytes lately waits for its next answer: a client
        // talking every 500 ms sends, is answered, and is closed then.
        let mut m = CloseMachine::new(TIMEOUT, WAIT);
        m.request(1012, asked, asked - ms(400));
        assert_eq!(
            m.step(IDLE, asked),
            (Action::None, Some(asked + QUIET_MAX_WAIT))
        );
        let answered = Seen {
            active: true,
            answered: true,
            ..IDLE
        };
        assert_eq!(
            m.step(answered, asked + ms(110)),
            (Action::CloseBackend(1012), None),
            "right after the answer to its next message"
        );
    }
}
