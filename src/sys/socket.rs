//! TCP socket calls: create, bind, listen, accept, connect, read/write, socket options, and the
//! address conversions between `std::net::SocketAddr` and the kernel's `sockaddr` structs.

use super::{owned, syscall};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// A `sockaddr_storage` with the length the kernel should read or did write.
pub(super) struct RawAddr {
    pub(super) storage: libc::sockaddr_storage,
    pub(super) len: libc::socklen_t,
}

impl RawAddr {
    pub(super) fn empty() -> RawAddr {
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
        let storage = unsafe { zeroed() };
        RawAddr {
            storage,
            len: size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    pub(super) fn from(addr: &SocketAddr) -> RawAddr {
        let mut raw = RawAddr::empty();
        match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
                unsafe {
                    std::ptr::write(
                        (&mut raw.storage as *mut libc::sockaddr_storage).cast(),
                        sin,
                    )
                };
                raw.len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
                unsafe {
                    std::ptr::write(
                        (&mut raw.storage as *mut libc::sockaddr_storage).cast(),
                        sin6,
                    )
                };
                raw.len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        raw
    }

    pub(super) fn ptr(&self) -> *const libc::sockaddr {
        (&self.storage as *const libc::sockaddr_storage).cast()
    }

    pub(super) fn mut_ptr(&mut self) -> *mut libc::sockaddr {
        (&mut self.storage as *mut libc::sockaddr_storage).cast()
    }

    pub(super) fn to_socket_addr(&self) -> io::Result<SocketAddr> {
        match self.storage.ss_family as libc::c_int {
            libc::AF_INET if self.len as usize >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: the family says the storage holds a sockaddr_in of sufficient length.
                let sin: libc::sockaddr_in = unsafe { std::ptr::read(self.ptr().cast()) };
                let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                Ok(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 if self.len as usize >= size_of::<libc::sockaddr_in6>() => {
                // SAFETY: the family says the storage holds a sockaddr_in6 of sufficient length.
                let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read(self.ptr().cast()) };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let port = u16::from_be(sin6.sin6_port);
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected address family",
            )),
        }
    }
}

pub(super) fn family(addr: &SocketAddr) -> libc::c_int {
    match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    }
}

/// A non-blocking, close-on-exec TCP socket of `addr`'s family.
pub fn tcp_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain integer arguments.
    let fd = unsafe { syscall!(socket(family(addr), ty, libc::IPPROTO_TCP))? };
    Ok(owned(fd))
}

/// Whether `ip` is an address of this host (in this network namespace): binding to it
/// without `IP_TRANSPARENT` succeeds only then.
pub fn is_local_ip(ip: std::net::IpAddr) -> bool {
    let addr = SocketAddr::new(ip, 0);
    tcp_socket(&addr)
        .and_then(|fd| bind(std::os::fd::AsFd::as_fd(&fd), &addr))
        .is_ok()
}

pub fn bind(fd: BorrowedFd, addr: &SocketAddr) -> io::Result<()> {
    let raw = RawAddr::from(addr);
    // SAFETY: `raw` holds a valid sockaddr of `raw.len` bytes.
    unsafe { syscall!(bind(fd.as_raw_fd(), raw.ptr(), raw.len))? };
    Ok(())
}

pub fn listen(fd: BorrowedFd, backlog: i32) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    unsafe { syscall!(listen(fd.as_raw_fd(), backlog))? };
    Ok(())
}

/// Starts a non-blocking connect; `Ok(false)` means "in progress, wait for writability".
pub fn connect(fd: BorrowedFd, addr: &SocketAddr) -> io::Result<bool> {
    let raw = RawAddr::from(addr);
    // SAFETY: `raw` holds a valid sockaddr of `raw.len` bytes.
    match unsafe { syscall!(connect(fd.as_raw_fd(), raw.ptr(), raw.len)) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Accepts one connection as a non-blocking, close-on-exec socket.
pub fn accept(fd: BorrowedFd) -> io::Result<(OwnedFd, SocketAddr)> {
    let mut raw = RawAddr::empty();
    let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: `raw` is a writable sockaddr_storage and `raw.len` its size.
    let conn = unsafe { syscall!(accept4(fd.as_raw_fd(), raw.mut_ptr(), &mut raw.len, flags))? };
    let conn = owned(conn);
    Ok((conn, raw.to_socket_addr()?))
}

pub fn local_addr(fd: BorrowedFd) -> io::Result<SocketAddr> {
    let mut raw = RawAddr::empty();
    // SAFETY: `raw` is a writable sockaddr_storage and `raw.len` its size.
    unsafe { syscall!(getsockname(fd.as_raw_fd(), raw.mut_ptr(), &mut raw.len))? };
    raw.to_socket_addr()
}

pub fn peer_addr(fd: BorrowedFd) -> io::Result<SocketAddr> {
    let mut raw = RawAddr::empty();
    // SAFETY: `raw` is a writable sockaddr_storage and `raw.len` its size.
    unsafe { syscall!(getpeername(fd.as_raw_fd(), raw.mut_ptr(), &mut raw.len))? };
    raw.to_socket_addr()
}

/// `connect()` to `AF_UNSPEC`: the kernel's `disconnect` — the socket goes to CLOSE and
/// leaves the connection table (a socket in `TCP_REPAIR` mode sends nothing doing so).
pub fn disconnect(fd: BorrowedFd) -> io::Result<()> {
    let raw = RawAddr::empty(); // all zero: AF_UNSPEC
    let len = size_of::<libc::sa_family_t>() as libc::socklen_t;
    // SAFETY: `raw` holds at least `len` readable bytes.
    unsafe { syscall!(connect(fd.as_raw_fd(), raw.ptr(), len))? };
    Ok(())
}

/// The destination a connection had before nftables/iptables REDIRECT rewrote it.
pub fn original_dst(fd: BorrowedFd, ipv6: bool) -> io::Result<SocketAddr> {
    let (level, name) = if ipv6 {
        (libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)
    } else {
        (libc::SOL_IP, libc::SO_ORIGINAL_DST)
    };
    let mut raw = RawAddr::empty();
    // SAFETY: `raw` is a writable buffer of `raw.len` bytes; the kernel writes a sockaddr_in(6).
    unsafe {
        syscall!(getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            raw.mut_ptr().cast(),
            &mut raw.len
        ))?
    };
    raw.to_socket_addr()
}

pub fn set_int_opt(
    fd: BorrowedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option value is one int, passed by pointer with its size.
    unsafe {
        syscall!(setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            len
        ))?
    };
    Ok(())
}

fn get_opt<T: Copy>(fd: BorrowedFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    // SAFETY: only used with plain-old-data option types for which all-zero is valid.
    let mut value: T = unsafe { zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a writable buffer of `len` bytes.
    unsafe {
        syscall!(getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut T).cast(),
            &mut len
        ))?
    };
    Ok(value)
}

/// An integer socket option.
pub fn get_int_opt(
    fd: BorrowedFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    get_opt(fd, level, name)
}

/// The pending socket error (`SO_ERROR`), cleared by reading it.
pub fn take_error(fd: BorrowedFd) -> io::Result<Option<io::Error>> {
    let err: libc::c_int = get_opt(fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

/// `SO_LINGER` with a zero timeout: the next `close()` sends a RST instead of a FIN.
pub fn set_linger_zero(fd: BorrowedFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let len = size_of::<libc::linger>() as libc::socklen_t;
    let ptr = (&linger as *const libc::linger).cast();
    // SAFETY: the option value is one `linger` struct, passed by pointer with its size.
    unsafe {
        syscall!(setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            ptr,
            len
        ))?
    };
    Ok(())
}

pub fn shutdown_write(fd: BorrowedFd) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    unsafe { syscall!(shutdown(fd.as_raw_fd(), libc::SHUT_WR))? };
    Ok(())
}

/// Non-blocking read; `Ok(0)` is end of stream.
pub fn recv(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a writable buffer of `buf.len()` bytes.
    let n = unsafe {
        syscall!(recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT
        ))?
    };
    Ok(n as usize)
}

/// Non-blocking write that reports `EPIPE` instead of raising `SIGPIPE`.
pub fn send(fd: BorrowedFd, buf: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: `buf` is a readable buffer of `buf.len()` bytes.
    let n = unsafe { syscall!(send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags))? };
    Ok(n as usize)
}

/// Byte counters of a TCP socket from `TCP_INFO`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpBytes {
    /// `tcpi_bytes_received`: data bytes received in order, plus one once a FIN arrived.
    pub received: u64,
    /// `tcpi_bytes_acked`: bytes the peer acknowledged (one more for the SYN of a connect()).
    pub acked: u64,
    /// `tcpi_state`, e.g. `libc::TCP_ESTABLISHED as u8`.
    pub state: u8,
}

/// TCP states as reported in `tcpi_state` (include/net/tcp_states.h; the same on every
/// architecture, and not exported by `libc`). These are the ones in which the peer's FIN has
/// been received.
pub mod tcp_state {
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const CLOSING: u8 = 11;
    pub const TIME_WAIT: u8 = 6;
    /// Also where a socket in FIN_WAIT2 goes when the FIN arrives (`tcp_time_wait` hands
    /// the connection to a timewait socket and closes this one), and where a reset leaves it.
    pub const CLOSE: u8 = 7;

    pub fn fin_received(state: u8) -> bool {
        matches!(state, CLOSE_WAIT | LAST_ACK | CLOSING | TIME_WAIT)
    }
}

pub fn tcp_bytes(fd: BorrowedFd) -> io::Result<TcpBytes> {
    // SAFETY: tcp_info is plain integers; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let ptr = (&mut info as *mut libc::tcp_info).cast();
    // SAFETY: `info` is a writable buffer of `len` bytes.
    unsafe {
        syscall!(getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            ptr,
            &mut len
        ))?
    };
    // Older kernels fill a shorter prefix of the struct.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + size_of::<u64>();
    if (len as usize) < needed {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TCP_INFO lacks tcpi_bytes_received (needs Linux >= 4.6)",
        ));
    }
    Ok(TcpBytes {
        received: info.tcpi_bytes_received,
        acked: info.tcpi_bytes_acked,
        state: info.tcpi_state,
    })
}

/// Bytes in the send queue not yet acknowledged by the peer (`SIOCOUTQ`).
pub fn outq(fd: BorrowedFd) -> io::Result<u32> {
    let mut n: libc::c_int = 0;
    // SIOCOUTQ is defined as TIOCOUTQ on every architecture (asm/sockios.h).
    // SAFETY: SIOCOUTQ writes one int to the pointer given.
    unsafe { syscall!(ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n))? };
    #[cfg(feature = "test-hooks")]
    if let (true, Some(wait)) = (n > 0, crate::test_hooks::outq_wait()) {
        let (first, end) = (n, std::time::Instant::now() + wait);
        while n == first && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_micros(20));
            // SAFETY: as above.
            unsafe { syscall!(ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n))? };
        }
    }
    Ok(n.max(0) as u32)
}

/// The kernel's unique, never reused identifier of a socket (`SO_COOKIE`, Linux >= 4.12).
pub fn socket_cookie(fd: BorrowedFd) -> io::Result<u64> {
    get_opt(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_round_trip_through_sockaddr() {
        let addrs: [SocketAddr; 4] = [
            "198.18.1.2:40000".parse().unwrap(),
            "0.0.0.0:1".parse().unwrap(),
            "[2001:db8:1:1::2]:443".parse().unwrap(),
            "[::1]:65535".parse().unwrap(),
        ];
        for addr in addrs {
            assert_eq!(RawAddr::from(&addr).to_socket_addr().unwrap(), addr);
        }
    }

    #[test]
    fn port_is_stored_in_network_byte_order() {
        let raw = RawAddr::from(&"1.2.3.4:258".parse().unwrap());
        // SAFETY (test): the storage holds a sockaddr_in.
        let sin: libc::sockaddr_in = unsafe { std::ptr::read(raw.ptr().cast()) };
        assert_eq!(sin.sin_port.to_ne_bytes(), [1, 2]);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [1, 2, 3, 4]);
    }

    #[test]
    fn unknown_family_is_an_error() {
        assert!(RawAddr::empty().to_socket_addr().is_err());
    }
}
