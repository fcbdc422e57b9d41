//! The kernel data plane for one connection: both sockets in the BPF sockmap, bytes moved by the
//! `sk_skb` programs, userspace only watching for the end and keeping the books.
//!
//! Each direction (src -> dst) is in one of these states:
//! - `User`: src is not hooked; userspace copies src -> dst through a small buffer (data that
//!   arrived before insertion, a kick, a paused source, or a socket the kernel refused).
//! - `Kernel`: src is in the hook map; the verdict program redirects its bytes to dst.
//! - `Paused`: src was taken out of the hook map because more than `--inflight-max` bytes
//!   wait in dst's psock queue; src's receive queue fills and TCP flow control holds the
//!   sender. Once the queue is below half the budget, src is hooked again and kicked.
//! - `Unhooking`: src was taken out of the hook map for userspace to finish (bytes stranded,
//!   or the kernel refused re-insertion); waiting until the bytes the kernel already took
//!   from src have all entered dst's send queue, because only then may userspace write to
//!   dst without reordering.
//! - `UserOnly`: like `User`, for good (re-insertion failed, e.g. src's FIN already arrived).
//!
//! The books (KERNEL-NOTES s.1, s.3, s.6), all from counters the kernel keeps:
//! - `kern` = bytes the verdict program redirected from src (BPF `counters` map);
//! - `pending` = `tcpi_bytes_received(src)` (minus 1 for a FIN) - bytes userspace read - `kern`:
//!   bytes in src's receive queue nobody has processed yet;
//! - `entered` = `tcpi_bytes_acked(dst)` + `SIOCOUTQ(dst)` - base: bytes that reached dst's
//!   send queue since pairing; `queued` = userspace-written + `kern` - `entered`: bytes still in
//!   dst's psock queue, which has no backpressure of its own.
//!
//! A FIN is passed on only when `pending == 0 && queued == 0`; `entered` above its maximum means
//! the kernel duplicated bytes, which is reported loudly and the connection reset.

use crate::conn::{broken_end, reset_of, Conn, End, Phase, Side};
use crate::debug;
use crate::offload::Offload;
use crate::relay::Flow;
use crate::sys::{epoll, socket};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Why a connection or one direction stayed in userspace, for the stats line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// `E2BIG`: the maps are full.
    MapFull,
    /// `EOPNOTSUPP`: the socket is no longer ESTABLISHED (its FIN arrived first), or MPTCP.
    Unsupported,
    /// Anything else.
    Error,
}

impl Fallback {
    pub const ALL: [Fallback; 3] = [Fallback::MapFull, Fallback::Unsupported, Fallback::Error];

    pub fn of(e: &io::Error) -> Fallback {
        match e.raw_os_error() {
            Some(libc::E2BIG) => Fallback::MapFull,
            Some(libc::EOPNOTSUPP) => Fallback::Unsupported,
            _ => Fallback::Error,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fallback::MapFull => "map_full",
            Fallback::Unsupported => "unsupported",
            Fallback::Error => "error",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    User,
    Kernel,
    Paused,
    Unhooking,
    UserOnly,
}

/// Polls of an active direction happen at least this often...
const POLL_MIN: Duration = Duration::from_millis(1);
/// ...and of a slowly moving one at most this rarely: a source's rate can jump at any time,
/// and everything it sends between two polls may queue behind a slow reader.
const POLL_MAX: Duration = Duration::from_millis(5);
/// While bytes wait in dst's psock queue (dst is slower than src, the case the budget is
/// for) a direction polls at least this often, moving or not.
const POLL_QUEUED: Duration = Duration::from_millis(2);
/// A direction idle for this long stops polling when the event loop scans the counters.
const QUIET_AFTER: Duration = Duration::from_millis(4);
/// A direction whose pending bytes have not moved for this many polls is stranded (the kernel
/// only looks at its receive queue when a new packet arrives, KERNEL-NOTES s.3): kick it.
const STUCK_POLLS: u8 = 2;

struct Dir {
    state: State,
    /// The userspace path, also the byte counts of what userspace read and wrote.
    flow: Flow,
    /// `acked + outq` of dst at pairing, less what userspace had written to it by then.
    base: u64,
    /// Bytes src received that a handshake consumed before pairing (not the flow's).
    rx_base: u64,
    /// src's FIN was seen (EPOLLRDHUP) while the kernel was moving its bytes.
    fin: bool,
    /// The kernel refused src; once in userspace it stays there.
    refused: bool,
    /// Last poll's `kern` and `pending`, to see progress.
    last_kern: u64,
    last_pending: u64,
    last_poll: Instant,
    stuck: u8,
    interval: Duration,
    next_poll: Option<Instant>,
}

pub struct Spliced {
    cookies: [u64; 2],
    /// [client -> upstream, upstream -> client].
    dirs: [Dir; 2],
    inflight_max: u64,
    /// The poll the event loop has queued for this connection.
    scheduled: Option<Instant>,
    /// A direction the kernel refused, not yet counted in the stats.
    pub fallback: Option<Fallback>,
    stopped: bool,
    /// The event loop scans the counters map for activity (`Offload::counters`), so a quiet
    /// direction needs no timer of its own.
    pub scanned: bool,
}

/// Sides in direction order: index 0 is client -> upstream.
fn src_of(dir: usize) -> Side {
    if dir == 0 {
        Side::Client
    } else {
        Side::Upstream
    }
}

fn dir_from(side: Side) -> usize {
    side as usize
}

impl Spliced {
    /// Pairs the two sockets in the redirect map; the directions start in userspace and move
    /// to the kernel once each source is drained. `Err` is the reason this connection falls
    /// back to the copy plane.
    /// `rx_base` is what a handshake read from [client, upstream] before the plane started.
    pub fn start(
        off: &Offload,
        client: BorrowedFd,
        upstream: BorrowedFd,
        buffer: usize,
        inflight_max: u64,
        rx_base: [u64; 2],
        sndbuf: usize,
    ) -> Result<Spliced, (Fallback, String)> {
        let cookie = |fd| {
            socket::socket_cookie(fd).map_err(|e| (Fallback::Error, format!("SO_COOKIE: {e}")))
        };
        let cookies = [cookie(client)?, cookie(upstream)?];
        if sndbuf > 0 {
            // The psock worker that sends redirected bytes retries a full socket one jiffy
            // later (4 ms at HZ=250, net/core/skmsg.c sk_psock_backlog), not when space frees:
            // a larger send buffer makes those stalls rarer. FORCE (CAP_NET_ADMIN) may exceed
            // net.core.wmem_max; without the capability the plain option caps at it.
            let size = sndbuf.min(i32::MAX as usize) as i32;
            for fd in [client, upstream] {
                if socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size).is_err() {
                    let _ = socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, size);
                }
            }
        }
        let base = |dst| -> Result<u64, (Fallback, String)> {
            let b =
                socket::tcp_bytes(dst).map_err(|e| (Fallback::Error, format!("TCP_INFO: {e}")))?;
            Ok(b.acked
                + socket::outq(dst).map_err(|e| (Fallback::Error, format!("SIOCOUTQ: {e}")))?
                    as u64)
        };
        let bases = [base(upstream)?, base(client)?];
        off.pair(client, cookies[0], upstream, cookies[1])
            .map_err(|e| (Fallback::of(&e), format!("sockmap insert: {e}")))?;
        let dir = |base, rx_base| Dir {
            state: State::User,
            flow: Flow::copy(buffer),
            base,
            rx_base,
            fin: false,
            refused: false,
            last_kern: 0,
            last_pending: 0,
            last_poll: Instant::now(),
            stuck: 0,
            interval: POLL_MIN,
            next_poll: None,
        };
        Ok(Spliced {
            cookies,
            dirs: [dir(bases[0], rx_base[0]), dir(bases[1], rx_base[1])],
            inflight_max,
            scheduled: None,
            fallback: None,
            stopped: false,
            scanned: false,
        })
    }

    pub fn cookies(&self) -> [u64; 2] {
        self.cookies
    }

    pub fn bytes(&self, off: Option<&Offload>) -> (u64, u64) {
        let kern = |i: usize| {
            if self.stopped {
                0
            } else {
                off.map_or(0, |o| o.forwarded(self.cookies[i]))
            }
        };
        (
            self.dirs[0].flow.written + kern(0),
            self.dirs[1].flow.written + kern(1),
        )
    }

    pub fn finished(&self) -> bool {
        self.dirs.iter().all(|d| d.flow.shut)
    }

    /// Epoll masks (client, upstream): a hooked source is watched for RDHUP only (EPOLLIN stays
    /// set for ever on hooked sockets, KERNEL-NOTES s.3); userspace directions as usual.
    pub fn masks(&self) -> (u32, u32) {
        let mut m = [0u32; 2];
        for (i, d) in self.dirs.iter().enumerate() {
            let (src, dst) = (i, 1 - i);
            match d.state {
                State::Kernel | State::Paused if !d.fin && !d.flow.shut => m[src] |= epoll::RDHUP,
                State::User | State::UserOnly => {
                    if d.flow.wants_read() {
                        m[src] |= epoll::IN;
                    }
                    if d.flow.wants_write() {
                        m[dst] |= epoll::OUT;
                    }
                }
                _ => {}
            }
        }
        (m[0], m[1])
    }

    /// Takes both sockets out of the maps; called once, just before they are closed.
    pub fn stop(&mut self, off: &Offload) {
        for c in self.cookies {
            let _ = off.unhook(c);
        }
        off.unpair(self.cookies[0], self.cookies[1]);
        self.stopped = true;
    }

    /// Whether the queued poll at `t` is the current one (the heap keeps stale entries).
    pub fn due(&mut self, t: Instant) -> bool {
        if self.scheduled == Some(t) {
            self.scheduled = None;
            true
        } else {
            false
        }
    }

    /// The next poll to queue, if it is earlier than the one already queued.
    pub fn next_poll(&mut self) -> Option<Instant> {
        let want = self.dirs.iter().filter_map(|d| d.next_poll).min()?;
        match self.scheduled {
            Some(s) if s <= want => None,
            _ => {
                self.scheduled = Some(want);
                Some(want)
            }
        }
    }
}

/// Readiness on one socket of a sockmap connection.
pub fn on_event(conn: &mut Conn, off: &Offload, side: Side, events: u32) -> Option<End> {
    if events & epoll::ERR != 0 {
        let fd = conn.sock(side).fd();
        if let Ok(Some(_)) = socket::take_error(fd) {
            return Some(reset_of(side));
        }
    }
    if events & epoll::HUP != 0 {
        conn.sock(side).hup = true;
    }
    let d = dir_from(side);
    if let Phase::Sockmap(s) = &mut conn.phase {
        if events & epoll::RDHUP != 0 && matches!(s.dirs[d].state, State::Kernel | State::Paused) {
            s.dirs[d].fin = true;
        }
    }
    // Userspace directions move on readability of their source or writability of their dest.
    progress(conn, off, Instant::now())
}

/// A timer poll: check the books of every direction.
pub fn poll(conn: &mut Conn, off: &Offload, now: Instant) -> Option<End> {
    progress(conn, off, now)
}

/// Advances both directions as far as they can go now.
fn progress(conn: &mut Conn, off: &Offload, now: Instant) -> Option<End> {
    let (c, u) = (
        conn.client.fd.as_fd(),
        conn.upstream
            .as_ref()
            .expect("spliced connections have an upstream")
            .fd
            .as_fd(),
    );
    let Phase::Sockmap(s) = &mut conn.phase else {
        return None;
    };
    for d in 0..2 {
        let (src, dst) = if d == 0 { (c, u) } else { (u, c) };
        if let Err(end) = advance(conn.id, s, off, d, src, dst, now) {
            return Some(end);
        }
    }
    None
}

/// The kernel's view of one direction.
struct Books {
    /// Data bytes src received (its FIN not counted).
    received: u64,
    src_fin: bool,
    kern: u64,
    entered: u64,
}

fn books(
    off: &Offload,
    src: BorrowedFd,
    dst: BorrowedFd,
    cookie: u64,
    dir: &Dir,
) -> io::Result<Books> {
    // The order matters, as every counter only grows while we read them: what entered dst
    // was redirected before, and what was redirected was received before. Reading in this
    // order, `entered <= given` and `kern <= received` hold unless the kernel misbehaved.
    let d = socket::tcp_bytes(dst)?;
    let outq = socket::outq(dst)? as u64;
    let kern = off.forwarded(cookie);
    let s = socket::tcp_bytes(src)?;
    // A received FIN counts one in bytes_received. CLOSE is a FIN after our own (the timewait
    // socket took over) unless a reset left an error, which is the peer's reset.
    let closed = s.state == socket::tcp_state::CLOSE;
    if closed && socket::take_error(src)?.is_some() {
        return Err(io::ErrorKind::ConnectionReset.into());
    }
    let src_fin = closed || socket::tcp_state::fin_received(s.state);
    Ok(Books {
        received: s.received.wrapping_sub(src_fin as u64 + dir.rx_base),
        src_fin,
        kern,
        entered: (d.acked + outq).wrapping_sub(dir.base),
    })
}

/// Hands src to the kernel, then makes its stream parser look at the receive queue at once:
/// bytes that arrived between the last userspace read (or the pause) and the insertion
/// would otherwise wait for the next packet, which may never come (KERNEL-NOTES s.3).
/// Setting `SO_RCVLOWAT` calls `tcp_data_ready()` (net/ipv4/tcp.c, `tcp_set_rcvlowat`,
/// Linux >= 4.19), which runs the psock's data-ready hook; on older kernels the stranded-bytes
/// check below still catches them. 1 is the default low-water mark, so nothing else changes.
fn hook_and_kick(off: &Offload, src: BorrowedFd, cookie: u64) -> io::Result<()> {
    off.hook(src, cookie)?;
    let _ = socket::set_int_opt(src, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1);
    Ok(())
}

fn advance(
    id: u64,
    s: &mut Spliced,
    off: &Offload,
    d: usize,
    src: BorrowedFd,
    dst: BorrowedFd,
    now: Instant,
) -> Result<(), End> {
    let cookie = s.cookies[d];
    let inflight_max = s.inflight_max;
    let s_scanned = s.scanned;
    let dir = &mut s.dirs[d];
    dir.next_poll = None;
    if dir.flow.shut {
        return Ok(());
    }
    let (from, to) = (src_of(d).name(), src_of(d).other().name());
    let src_side = src_of(d);
    loop {
        if let State::User | State::UserOnly = dir.state {
            dir.flow
                .pump(src, dst)
                .map_err(|b| broken_end(src_side, b))?;
            let idle = dir.flow.pending() == 0 && dir.flow.drained && !dir.flow.eof;
            if dir.state == State::UserOnly || !idle {
                return Ok(());
            }
            // Drained to EAGAIN with nothing held: hand src to the kernel (reading part of an
            // skb and then inserting duplicates it, KERNEL-NOTES s.3).
            match hook_and_kick(off, src, cookie) {
                Ok(()) => dir.enter_kernel(now),
                Err(e) => {
                    debug!("#{id}: {from} -> {to}: kernel refused the socket ({e}); finishing in userspace");
                    dir.state = State::UserOnly;
                    s.fallback = Some(Fallback::of(&e));
                }
            }
            return Ok(());
        }
        let b = books(off, src, dst, cookie, dir).map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionReset => reset_of(src_side),
            _ => End::Error,
        })?;
        let given = dir.flow.written + b.kern;
        if b.entered > given || dir.flow.read + b.kern > b.received {
            crate::error!(
                "#{id}: kernel byte accounting broken ({from} -> {to}: received {} read {} redirected {} entered {} of {}); resetting",
                b.received, dir.flow.read, b.kern, b.entered, given
            );
            return Err(End::Error);
        }
        let pending = b.received - dir.flow.read - b.kern;
        let queued = given - b.entered;
        let fin = dir.fin || b.src_fin;
        match dir.state {
            State::Unhooking if queued > 0 => {
                dir.backoff(now);
                return Ok(());
            }
            State::Unhooking => {
                // dst's psock queue is empty: userspace may write to dst without reordering.
                dir.state = if dir.refused {
                    State::UserOnly
                } else {
                    State::User
                };
                continue;
            }
            State::Paused if queued > inflight_max / 2 => {
                dir.backoff(now);
                return Ok(());
            }
            State::Paused if pending > inflight_max / 2 => {
                // What src's receive buffer gathered meanwhile would land in dst's queue at
                // once on re-insertion (the buffer grew to line rate while the kernel drained
                // it): move that backlog in userspace at dst's pace instead, then re-insert.
                debug!("#{id}: {from} -> {to}: {pending} bytes waiting in the source, draining them in userspace");
                dir.state = State::Unhooking;
                continue;
            }
            State::Paused => match hook_and_kick(off, src, cookie) {
                Ok(()) => {
                    debug!("#{id}: {from} -> {to}: {queued} bytes in flight, resuming the source");
                    dir.enter_kernel(now);
                    return Ok(());
                }
                Err(e) => {
                    // Usually EOPNOTSUPP: src's FIN arrived while it was paused. Finish this
                    // direction in userspace, once the kernel's queue has drained.
                    debug!("#{id}: {from} -> {to}: cannot resume the source ({e}); finishing in userspace");
                    dir.refused = true;
                    dir.state = State::Unhooking;
                    s.fallback = Some(Fallback::of(&e));
                    continue;
                }
            },
            _ => {}
        }
        // State::Kernel.
        if fin && pending == 0 && queued == 0 {
            dir.flow.shut = true;
            if let Err(e) = socket::shutdown_write(dst) {
                if e.raw_os_error() != Some(libc::ENOTCONN) {
                    return Err(reset_of(src_side.other()));
                }
            }
            return Ok(());
        }
        let moved = b.kern != dir.last_kern;
        dir.stuck = if pending > 0 && !moved && pending == dir.last_pending {
            dir.stuck + 1
        } else {
            0
        };
        let rate_interval = if moved {
            // Poll often enough that the source cannot overfill half the budget.
            let dt = now.duration_since(dir.last_poll).as_secs_f64().max(1e-4);
            let rate = (b.kern - dir.last_kern) as f64 / dt;
            Duration::from_secs_f64(
                (inflight_max as f64 / 2.0 / rate).clamp(1e-3, POLL_MAX.as_secs_f64()),
            )
        } else {
            (dir.interval * 2).min(POLL_MAX)
        };
        let rate_interval = if queued > 0 {
            rate_interval.min(POLL_QUEUED)
        } else {
            rate_interval
        };
        dir.last_kern = b.kern;
        dir.last_pending = pending;
        dir.last_poll = now;
        if dir.stuck == STUCK_POLLS {
            let _ = socket::set_int_opt(src, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1);
        }
        if dir.stuck > STUCK_POLLS + 2 {
            // The kick did not help (an old kernel): let userspace read the stranded bytes.
            debug!("#{id}: {from} -> {to}: {pending} bytes stranded, reading them in userspace");
            let _ = off.unhook(cookie);
            dir.state = State::Unhooking;
            dir.interval = POLL_MIN;
            continue;
        }
        if queued > inflight_max {
            debug!("#{id}: {from} -> {to}: {queued} bytes in flight, pausing the source");
            let _ = off.unhook(cookie);
            dir.state = State::Paused;
            dir.interval = POLL_MIN;
            dir.next_poll = Some(now + POLL_MIN);
            return Ok(());
        }
        dir.interval = if pending > 0 || fin {
            POLL_MIN
        } else {
            rate_interval
        };
        // Quiet (nothing moved for a while, nothing pending or queued): no timer, the
        // counters scan wakes the connection when bytes move again. Stranded bytes can only
        // appear at insertion, which the polls since then have ruled out.
        let quiet = !moved && pending == 0 && queued == 0 && !fin && dir.interval >= QUIET_AFTER;
        dir.next_poll = if quiet && s_scanned {
            None
        } else {
            Some(now + dir.interval)
        };
        return Ok(());
    }
}

impl Dir {
    fn enter_kernel(&mut self, now: Instant) {
        self.state = State::Kernel;
        self.last_poll = now;
        self.stuck = 0;
        self.interval = POLL_MIN;
        self.next_poll = Some(now + POLL_MIN);
    }

    /// Waits for dst to drain: polls from 1 ms, backing off to 20 ms.
    fn backoff(&mut self, now: Instant) {
        self.next_poll = Some(now + self.interval);
        self.interval = (self.interval * 2).min(Duration::from_millis(20));
    }
}
