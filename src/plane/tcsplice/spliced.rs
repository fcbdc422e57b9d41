//! The second half of a tcsplice connection's life (`Relay` is in relay.rs): the handoff
//! itself — freeze both sockets, write the SPLICE entries, make the peers speak, check that
//! nothing slipped through — and the watch over a spliced flow until it ends, then the
//! cleanup: entries, conntrack, and a RST to both peers when the flow did not end by itself.
//!
//! Invariant: `splice` either leaves the connection spliced, or thaws both sockets exactly as
//! it found them (with the entries back to OBSERVE when it gives up for good).

use super::handoff::{self, Fallback, Held, Refusal, Thaw};
use super::map::{splice_entries, Frozen, Seen};
use super::relay::{Phase, Relay};
use super::Plane;
use crate::end::End;
use crate::sock::Pair;
use crate::sys;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

/// Both FINs seen but not both acknowledged: the flow ends after this long without a packet
/// (the kernel's own tcp_fin_timeout). Seeing a FIN is not its delivery: one lost past the
/// router is retransmitted after an RTO that can exceed a second, and must still find the
/// entries (a 1 s quiet period here cut off 1 in 10,000 soak connections' EOF).
const FIN_QUIET: Duration = Duration::from_secs(60);
/// A spliced flow with no packet for this long is over (its peers are gone, or would be
/// cut off by the router anyway: it is conntrack's own ESTABLISHED timeout,
/// nf_conntrack_tcp_timeout_established): its peers get a RST. `--idle-timeout` ends idle
/// connections sooner, on every plane.
const SPLICED_IDLE: Duration = Duration::from_secs(5 * 24 * 3600);

impl Relay {
    /// Freezes both sockets and hands the flow to the program.
    pub(super) fn splice(
        &mut self,
        p: &mut Plane,
        pair: &mut Pair,
        held: Option<[Held; 2]>,
    ) -> Option<End> {
        let (a, b) = pair.fds();
        let legs = self.legs?;
        let (fa, wa) = match handoff::freeze(a) {
            Ok(x) => x,
            Err(e) => {
                self.abandon(p, Some((a, b)), held, handoff::error("TCP_REPAIR", e));
                return None;
            }
        };
        let (fb, wb) = match handoff::freeze(b) {
            Ok(x) => x,
            Err(e) => {
                handoff::thaw(a, &wa);
                self.abandon(p, Some((a, b)), held, handoff::error("TCP_REPAIR", e));
                return None;
            }
        };
        let windows = [wa, wb];
        // Blocked and quiet a moment ago; frozen now, so this answer stays true.
        if !self.quiet(pair) {
            handoff::thaw(a, &wa);
            handoff::thaw(b, &wb);
            return None; // the caller unblocks and waits for the next quiet moment
        }
        let Some(mut seen) = self.read_seen(p) else {
            return self.undo(
                p,
                (a, b),
                &windows,
                held,
                (Fallback::Error, "flows map".into()),
            );
        };
        if legs.timestamps && seen.iter().any(|s| s.ts_last.is_none()) {
            let why = (Fallback::Options, "no timestamp seen from a peer".into());
            return self.undo(p, (a, b), &windows, held, why);
        }
        let eof = self.user.eof();
        for (s, e) in seen.iter_mut().zip(eof) {
            s.fin |= e; // an end of stream that arrived before the entries did
        }
        // The client as its packets show it before NAT (its port may differ from the one
        // the socket sees), so the keys match at ingress and the rewrite bypasses NAT.
        let client = Frozen {
            peer: legs.client,
            ..fa
        };
        let entries = splice_entries(&client, legs.client_dst, seen[0], &fb, seen[1]);
        for (k, f) in &entries {
            let res = match k.encode() {
                Some(key) => p.kernel.replace(&key, f),
                None => Err(std::io::ErrorKind::InvalidInput.into()),
            };
            if let Err(e) = res {
                let why = (Fallback::Error, format!("SPLICE: {e}"));
                return self.undo(p, (a, b), &windows, held, why);
            }
        }
        // The peers answer these probes with their windows, through the splice; then the
        // frozen sockets get a zero window, so a stray segment reaching one is not acked.
        let fixed = [(a, &fa), (b, &fb)].into_iter().try_for_each(|(fd, f)| {
            handoff::kick(fd)?;
            handoff::close_window(fd, f.rcv_nxt)
        });
        // Nothing may have reached the sockets since they were read.
        let moved = [(a, &fa), (b, &fb)].into_iter().any(|(fd, f)| {
            crate::sys::repair::queue_seqs(fd).map_or(true, |q| q != (f.snd_nxt, f.rcv_nxt))
        });
        if let Err(e) = fixed {
            let why = (Fallback::Error, format!("frozen socket: {e}"));
            return self.undo(p, (a, b), &windows, held, why);
        }
        if moved {
            let why = (Fallback::Error, "a frozen socket received data".into());
            return self.undo(p, (a, b), &windows, held, why);
        }
        crate::debug!(
            "#{} tcsplice: spliced at client seq {} ack {}, upstream seq {} ack {}; TSval client {:?} server {:?}, router {} {}; wscale {}/{} {}/{}",
            self.id,
            fa.rcv_nxt,
            fa.snd_nxt,
            fb.rcv_nxt,
            fb.snd_nxt,
            seen[0].ts_last,
            seen[1].ts_last,
            fa.ts_now,
            fb.ts_now,
            fa.snd_wscale,
            fa.rcv_wscale,
            fb.snd_wscale,
            fb.rcv_wscale
        );
        self.seen = [entries[0].1.seen, entries[1].1.seen];
        p.spliced(&[entries[0].0, entries[1].0], self.seen);
        self.phase = Phase::Spliced {
            frozen: [fa, fb],
            fin_before: eof,
        };
        self.want = None;
        self.user.release();
        #[cfg(feature = "test-hooks")]
        if let Some(d) = crate::test_hooks::late() {
            let _ = p
                .kernel
                .set_state(&entries[0].0, super::map::State::Observe);
            let until = Instant::now() + d;
            (self.late_until, self.want) = (Some(until), Some(until));
        }
        None
    }

    /// Undoes a freeze: both sockets thawed as they were read, then [`Relay::abandon`].
    fn undo(
        &mut self,
        p: &mut Plane,
        (a, b): (BorrowedFd, BorrowedFd),
        windows: &[Thaw; 2],
        held: Option<[Held; 2]>,
        why: Refusal,
    ) -> Option<End> {
        handoff::thaw(a, &windows[0]);
        handoff::thaw(b, &windows[1]);
        self.abandon(p, Some((a, b)), held, why);
        None
    }

    /// A spliced flow: ends at a RST, or once both FINs passed and it was quiet a while.
    pub(super) fn watch(&mut self, p: &mut Plane, now: Instant) -> Option<End> {
        if let Some(seen) = self.keys().and_then(|ks| p.scanned(&ks)) {
            self.seen = seen;
        }
        #[cfg(feature = "test-hooks")]
        if let (Some(t), Some([k, _])) = (self.late_until, self.keys()) {
            if now >= t {
                let _ = p.kernel.set_state(&k, super::map::State::Splice);
                self.late_until = None;
            }
        }
        let end = self.ended(now);
        #[cfg(feature = "test-hooks")]
        if let Some(t) = self.late_until {
            self.want = Some(self.want.map_or(t, |w| w.min(t)));
        }
        if end.is_some() {
            // The close line's bytes: read the entries now rather than at the last scan.
            if let Some(seen) = self.keys().and_then(|ks| p.fresh(&ks)) {
                self.seen = seen;
            }
        }
        end
    }

    fn ended(&mut self, now: Instant) -> Option<End> {
        let [c, s] = self.seen;
        // A RST after both FINs is how a closed end answers a repeated FIN whose ACK was
        // lost (both applications saw a clean end): still `done`.
        if c.fin && s.fin && (c.rst || s.rst) {
            return Some(End::Done);
        }
        if c.rst {
            return Some(End::ClientReset);
        }
        if s.rst {
            return Some(End::UpstreamReset);
        }
        let now_ns = sys::monotonic_ns();
        let last = c.last_ns.max(s.last_ns);
        if now_ns.saturating_sub(last) >= SPLICED_IDLE.as_nanos() as u64 {
            return Some(End::Idle);
        }
        if !(c.fin && s.fin) {
            self.want = Some(now + SPLICED_IDLE);
            return None;
        }
        // Each FIN acknowledged by the other peer, in the sender's numbering: the flow is
        // over the moment the last one is (an ACK the sender misses makes it repeat the
        // FIN, which the stack then answers with a RST: the end it wanted anyway).
        if let Phase::Spliced {
            frozen: [a, b],
            fin_before,
        } = &self.phase
        {
            let acked = |fin: &Seen, ack: &Seen, shift: u32, before: bool| {
                before || (ack.ack_last.wrapping_sub(shift).wrapping_sub(fin.seq_hi) as i32) >= 1
            };
            let c2s = b.snd_nxt.wrapping_sub(a.rcv_nxt);
            let s2c = a.snd_nxt.wrapping_sub(b.rcv_nxt);
            if acked(&c, &s, c2s, fin_before[0]) && acked(&s, &c, s2c, fin_before[1]) {
                return Some(End::Done);
            }
        }
        // Failing that, after a quiet while.
        let quiet_at = last + FIN_QUIET.as_nanos() as u64;
        if now_ns >= quiet_at {
            return Some(End::Done);
        }
        self.want = Some(now + Duration::from_nanos(quiet_at - now_ns));
        None
    }

    /// Leaves the plane, just before the loop closes both sockets: the entries go; a spliced
    /// flow's conntrack entries go (its packets bypassed conntrack), and its peers get a RST
    /// unless the flow ended by itself. Returns the fallback to count for a connection that
    /// never was spliced and had none counted.
    pub fn stop(
        &mut self,
        p: &mut Plane,
        end: End,
        (a, b): (BorrowedFd, BorrowedFd),
    ) -> Option<Refusal> {
        let keys = self.keys();
        let fresh = keys.as_ref().and_then(|ks| p.fresh(ks));
        if self.is_spliced() && end != End::Done {
            // How a spliced flow that did not end by itself looked last (for debugging).
            for k in keys.iter().flatten() {
                if let Some(Ok(f)) = k.encode().map(|key| p.kernel.read(&key, k.src.is_ipv6())) {
                    crate::debug!(
                        "#{} tcsplice: {} -> {} at the end: {f:?}",
                        self.id,
                        k.src,
                        k.dst
                    );
                }
            }
        }
        for k in keys.iter().flatten() {
            if let Some(key) = k.encode() {
                let _ = p.kernel.delete(&key);
            }
        }
        self.installed = false;
        match (&self.phase, self.legs) {
            (Phase::Spliced { .. }, Some(l)) => {
                if let Some(seen) = fresh {
                    self.seen = seen;
                }
                p.ct_delete(l.client, l.client_dst);
                p.ct_delete(l.local, l.server);
                if !matches!(end, End::Done | End::ClientReset | End::UpstreamReset) {
                    let [c, s] = &self.seen;
                    let r1 = handoff::reset(a, l.client_dst, l.client, c);
                    let r2 = handoff::reset(b, l.local, l.server, s);
                    if let Err(e) = r1.and(r2) {
                        crate::debug!(
                            "tcsplice: resetting the peers of {} -> {}: {e}",
                            l.client,
                            l.server
                        );
                    }
                }
                None
            }
            _ if self.fell_back => None,
            _ => {
                self.fell_back = true;
                let detail = format!("closed while waiting for {}", self.waiting);
                Some((Fallback::Early, detail))
            }
        }
    }
}
