//! `TCP_REPAIR` and the socket options the tcsplice handoff reads and sets (Linux 6.18
//! net/ipv4/tcp.c: setsockopt 3925-4124, getsockopt 4442-4640).
//!
//! Facts these wrappers rely on (docs/TCSPLICE.md has the list with lines):
//! - `TCP_REPAIR` needs CAP_NET_ADMIN in the socket's netns and any state but LISTEN
//!   (tcp.c:3493); a socket in repair mode still receives segments and sends ACKs.
//! - `close()` in repair mode is `tcp_disconnect` without RST or FIN (tcp.c:3163, 3361).
//! - `TCP_QUEUE_SEQ` reads `write_seq` (send queue) or `rcv_nxt` (receive queue) (tcp.c:4605).
//! - `TCP_REPAIR_OFF_NO_WP` leaves repair without the window probe of `TCP_REPAIR_OFF`.

use super::{socket, syscall};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

// include/uapi/linux/tcp.h
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF: libc::c_int = 0;
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;
pub const TCPI_OPT_ECN: u8 = 8;
pub const TCPI_OPT_USEC_TS: u8 = 64;

fn set(fd: BorrowedFd, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option value is one int, passed by pointer with its size.
    unsafe {
        syscall!(setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (&value as *const libc::c_int).cast(),
            len
        ))?
    };
    Ok(())
}

fn get(fd: BorrowedFd, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` is a writable int and `len` its size.
    unsafe {
        syscall!(getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len
        ))?
    };
    Ok(value)
}

/// How to leave repair mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// `TCP_REPAIR_OFF`: the kernel sends a window probe (an ACK) at once.
    Probe,
    /// `TCP_REPAIR_OFF_NO_WP`: nothing is sent; to abort a handoff quietly.
    Quiet,
}

/// Puts the socket into repair mode (`EPERM` without CAP_NET_ADMIN or on a listener).
pub fn repair_on(fd: BorrowedFd) -> io::Result<()> {
    set(fd, libc::TCP_REPAIR, TCP_REPAIR_ON)
}

pub fn repair_off(fd: BorrowedFd, how: Leave) -> io::Result<()> {
    let v = match how {
        Leave::Probe => TCP_REPAIR_OFF,
        Leave::Quiet => TCP_REPAIR_OFF_NO_WP,
    };
    set(fd, libc::TCP_REPAIR, v)
}

/// Whether the socket is in repair mode.
pub fn in_repair(fd: BorrowedFd) -> io::Result<bool> {
    Ok(get(fd, libc::TCP_REPAIR)? != 0)
}

/// `(write_seq, rcv_nxt)` of a socket in repair mode, via `TCP_REPAIR_QUEUE` +
/// `TCP_QUEUE_SEQ`. `write_seq` is `snd_nxt` when the send queue is empty (SIOCOUTQ 0).
pub fn queue_seqs(fd: BorrowedFd) -> io::Result<(u32, u32)> {
    set(fd, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    let snd = get(fd, libc::TCP_QUEUE_SEQ)? as u32;
    set(fd, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    let rcv = get(fd, libc::TCP_QUEUE_SEQ)? as u32;
    Ok((snd, rcv))
}

/// Sets `write_seq` and `rcv_nxt` of a socket in repair mode and CLOSE state (before a
/// repair-mode `connect`, which then starts the connection there without a handshake).
pub fn set_queue_seqs(fd: BorrowedFd, snd: u32, rcv: u32) -> io::Result<()> {
    set(fd, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    set(fd, libc::TCP_QUEUE_SEQ, snd as libc::c_int)?;
    set(fd, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    set(fd, libc::TCP_QUEUE_SEQ, rcv as libc::c_int)
}

/// `TCP_QUICKACK`: sends a delayed ACK now, so no delayed-ACK timer is left to fire later.
pub fn quickack(fd: BorrowedFd) -> io::Result<()> {
    set(fd, libc::TCP_QUICKACK, 1)
}

/// Resets the connection `local <-> peer` as the peer knows it: a RST from `local` whose
/// sequence number is `seq` (the peer's next expected byte) and acknowledgement `ack`. The
/// RST comes from a fresh socket put in repair mode at those numbers (repair mode binds
/// past conflicts, `IP_TRANSPARENT` to an address that is not ours, connects without a
/// handshake) and then closed with `SO_LINGER` 0. Any socket still holding the same
/// 4-tuple must have been disconnected first. Needs CAP_NET_ADMIN.
pub fn send_reset(local: SocketAddr, peer: SocketAddr, seq: u32, ack: u32) -> io::Result<()> {
    let fd = socket::tcp_socket(&local)?;
    let s = fd.as_fd();
    let (level, opt) = match local {
        SocketAddr::V4(_) => (libc::SOL_IP, libc::IP_TRANSPARENT),
        SocketAddr::V6(_) => (libc::SOL_IPV6, libc::IPV6_TRANSPARENT),
    };
    socket::set_int_opt(s, level, opt, 1)?;
    repair_on(s)?;
    set_queue_seqs(s, seq, ack)?;
    socket::bind(s, &local)?;
    socket::connect(s, &peer)?;
    repair_off(s, Leave::Quiet)?;
    socket::set_linger_zero(s)?;
    drop(fd); // tcp_close -> tcp_disconnect -> RST at snd_nxt = seq
    Ok(())
}

/// `struct tcp_repair_window` (include/uapi/linux/tcp.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairWindow {
    pub snd_wl1: u32,
    /// The peer's window as last advertised, unscaled bytes.
    pub snd_wnd: u32,
    pub max_window: u32,
    /// Our window: the right edge we advertised is `rcv_wup + rcv_wnd`.
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// `TCP_REPAIR_WINDOW` get (repair mode only; the kernel insists on the exact size).
pub fn repair_window(fd: BorrowedFd) -> io::Result<RepairWindow> {
    let mut w = RepairWindow::default();
    let mut len = size_of::<RepairWindow>() as libc::socklen_t;
    // SAFETY: `w` is a writable tcp_repair_window and `len` its size.
    unsafe {
        syscall!(getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_WINDOW,
            (&mut w as *mut RepairWindow).cast(),
            &mut len
        ))?
    };
    Ok(w)
}

/// `TCP_REPAIR_WINDOW` set (repair mode only). The kernel refuses `snd_wl1` after
/// `rcv_nxt + rcv_wnd` and `rcv_wup` after `rcv_nxt` (tcp.c:3512-3519).
pub fn set_repair_window(fd: BorrowedFd, w: &RepairWindow) -> io::Result<()> {
    let len = size_of::<RepairWindow>() as libc::socklen_t;
    // SAFETY: `w` is a readable tcp_repair_window and `len` its size.
    unsafe {
        syscall!(setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_WINDOW,
            (w as *const RepairWindow).cast(),
            len
        ))?
    };
    Ok(())
}

/// `TCP_TIMESTAMP` get: the socket's TS clock now, offset included; bit 0 set when the
/// socket uses a microsecond clock (tcp.c:4634-4640). Works outside repair mode.
pub fn ts_clock(fd: BorrowedFd) -> io::Result<u32> {
    Ok(get(fd, libc::TCP_TIMESTAMP)? as u32)
}

/// `TCP_TIMESTAMP` set (repair mode only): the socket's TS clock reads `val` now, i.e. its
/// offset becomes `val` minus the raw clock (tcp.c, `case TCP_TIMESTAMP`).
pub fn set_ts_clock(fd: BorrowedFd, val: u32) -> io::Result<()> {
    set(fd, libc::TCP_TIMESTAMP, val as libc::c_int)
}

/// `TCP_MAXSEG`: before connect/listen it sets `user_mss`, which caps the MSS we advertise
/// in our SYN or SYN-ACK and the peer's (`tcp_mss_clamp`, include/linux/tcp.h:622); a
/// listener's value is inherited by the sockets it accepts.
pub fn set_maxseg(fd: BorrowedFd, mss: u16) -> io::Result<()> {
    set(fd, libc::TCP_MAXSEG, mss.into())
}

/// `TCP_MAXSEG` get: `mss_cache` normally, `rx_opt.mss_clamp` (the peer's SYN MSS capped
/// by ours) in repair mode (tcp.c:4442-4450).
pub fn maxseg(fd: BorrowedFd) -> io::Result<u32> {
    Ok(get(fd, libc::TCP_MAXSEG)? as u32)
}

/// `TCP_WINDOW_CLAMP`: bounds the window we advertise (the kernel raises values below
/// SOCK_MIN_RCVBUF / 2 to that; 0 is refused on a connected socket, tcp.c:3752-3784).
pub fn set_window_clamp(fd: BorrowedFd, bytes: u32) -> io::Result<()> {
    set(
        fd,
        libc::TCP_WINDOW_CLAMP,
        bytes.min(i32::MAX as u32) as libc::c_int,
    )
}

/// `TCP_WINDOW_CLAMP` get: the bound on the window we advertise.
pub fn window_clamp(fd: BorrowedFd) -> io::Result<u32> {
    Ok(get(fd, libc::TCP_WINDOW_CLAMP)? as u32)
}

/// Bytes queued for reading (`SIOCINQ`/`FIONREAD`).
pub fn inq(fd: BorrowedFd) -> io::Result<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given.
    unsafe { syscall!(ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n))? };
    Ok(n.max(0) as u32)
}

/// The negotiated options and segment sizes, from `TCP_INFO`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `TCPI_OPT_*` bits.
    pub options: u8,
    /// Scale applied to the peer's windows (`rx_opt.snd_wscale`) and to ours.
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// MSS we send with (`mss_cache`) and the MSS we advertised (`advmss`).
    pub snd_mss: u32,
    pub advmss: u32,
    pub state: u8,
}

pub fn options(fd: BorrowedFd) -> io::Result<Options> {
    // SAFETY: tcp_info is plain integers; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes.
    unsafe {
        syscall!(getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len
        ))?
    };
    let both = info.tcpi_snd_rcv_wscale;
    // `__u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4`: bit-fields fill from the low bits on
    // little-endian targets, from the high bits on big-endian ones.
    let (snd, rcv) = if cfg!(target_endian = "big") {
        (both >> 4, both & 15)
    } else {
        (both & 15, both >> 4)
    };
    Ok(Options {
        options: info.tcpi_options,
        snd_wscale: snd,
        rcv_wscale: rcv,
        snd_mss: info.tcpi_snd_mss,
        advmss: info.tcpi_advmss,
        state: info.tcpi_state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (c, l.accept().unwrap().0)
    }

    fn root_or_skip(e: &io::Error) -> bool {
        let skip =
            e.raw_os_error() == Some(libc::EPERM) && std::env::var("CI").as_deref() != Ok("true");
        if skip {
            eprintln!("skipped: TCP_REPAIR needs CAP_NET_ADMIN");
        }
        skip
    }

    /// Repair mode reads the sequence numbers both ends agree on, and the window.
    #[test]
    fn repair_reads_both_queues() {
        let (mut c, s) = pair();
        c.write_all(b"hello").unwrap();
        let mut buf = [0; 5];
        (&s).read_exact(&mut buf).unwrap();
        if let Err(e) = repair_on(s.as_fd()) {
            assert!(root_or_skip(&e), "{e}");
            return;
        }
        assert!(in_repair(s.as_fd()).unwrap());
        repair_on(c.as_fd()).unwrap();
        let (s_snd, s_rcv) = queue_seqs(s.as_fd()).unwrap();
        let (c_snd, c_rcv) = queue_seqs(c.as_fd()).unwrap();
        assert_eq!(s_rcv, c_snd, "server's rcv_nxt is the client's write_seq");
        assert_eq!(c_rcv, s_snd);
        let w = repair_window(s.as_fd()).unwrap();
        assert!(w.rcv_wnd > 0 && w.snd_wnd > 0, "{w:?}");
        assert!(maxseg(s.as_fd()).unwrap() > 0);
        // Safety net of the handoff: a zero receive window makes the socket drop data.
        let zero = RepairWindow {
            rcv_wnd: 0,
            rcv_wup: s_rcv,
            snd_wl1: s_rcv,
            ..w
        };
        set_repair_window(s.as_fd(), &zero).unwrap();
        assert_eq!(repair_window(s.as_fd()).unwrap().rcv_wnd, 0);
        repair_off(s.as_fd(), Leave::Quiet).unwrap();
        repair_off(c.as_fd(), Leave::Quiet).unwrap();
        assert!(!in_repair(s.as_fd()).unwrap());
    }

    /// close() in repair mode sends neither FIN nor RST: the peer hears nothing.
    #[test]
    fn close_in_repair_is_silent() {
        let (c, s) = pair();
        if let Err(e) = repair_on(s.as_fd()) {
            assert!(root_or_skip(&e), "{e}");
            return;
        }
        drop(s);
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let err = (&c).read(&mut [0; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }

    /// Options and clocks read outside repair mode; the TS clock moves forward.
    #[test]
    fn options_and_clock() {
        let (c, s) = pair();
        let o = options(s.as_fd()).unwrap();
        assert_eq!(o.state, 1, "ESTABLISHED");
        assert_ne!(o.options & TCPI_OPT_TIMESTAMPS, 0, "loopback negotiates TS");
        assert_ne!(o.options & TCPI_OPT_WSCALE, 0);
        assert!(o.rcv_wscale > 0 && o.snd_wscale > 0, "{o:?}");
        let t1 = ts_clock(c.as_fd()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let t2 = ts_clock(c.as_fd()).unwrap();
        assert!(t2.wrapping_sub(t1) >= 10, "{t1} {t2}");
        assert_eq!(inq(s.as_fd()).unwrap(), 0);
        set_window_clamp(s.as_fd(), 8192).unwrap();
    }

    /// A reset made at the peer's own sequence numbers tears its connection down: the
    /// peer's read fails with ECONNRESET, after the original socket left silently.
    #[test]
    fn reset_from_a_fresh_socket() {
        let (c, s) = pair();
        (&c).write_all(b"abc").unwrap();
        let mut buf = [0; 3];
        (&s).read_exact(&mut buf).unwrap();
        if let Err(e) = repair_on(s.as_fd()) {
            assert!(root_or_skip(&e), "{e}");
            return;
        }
        let (snd, rcv) = queue_seqs(s.as_fd()).unwrap();
        let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        socket::disconnect(s.as_fd()).unwrap();
        send_reset(local, peer, snd, rcv).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let err = (&c).read(&mut [0; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    /// A listener's TCP_MAXSEG caps the MSS its accepted sockets advertise.
    #[test]
    fn listener_maxseg_is_inherited() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        set_maxseg(l.as_fd(), 1000).unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = l.accept().unwrap().0;
        // tcpi_advmss leaves room for the 12-byte timestamp option; the SYN-ACK said 1000.
        assert_eq!(options(s.as_fd()).unwrap().advmss, 1000 - 12);
        assert!(options(c.as_fd()).unwrap().snd_mss <= 1000);
    }
}
