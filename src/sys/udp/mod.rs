//! UDP socket calls for the UDP plane: sockets, the TPROXY options (a transparent bind to a
//! foreign address, the original destination of each datagram), sends and receives that never
//! block, and the ICMP errors the kernel reports on a socket.
//!
//! Invariants: nothing here allocates (callers pass the buffers; control messages are parsed
//! from a fixed buffer on the stack), and every address handed back is canonical: an IPv4
//! peer seen through a dual-stack IPv6 socket (`::ffff:a.b.c.d`) comes back as IPv4, so one
//! client has one key whichever socket its datagrams arrived on.
//!
//! ICMP errors, two ways (`__udp4_lib_err`/`__udp6_lib_err` in the kernel): a *connected*
//! socket gets hard errors (port, host or network unreachable) in `sk_err`, which the next
//! `recv` or `send` returns once (ECONNREFUSED...) and which raises `EPOLLERR` until read; an
//! *unconnected* socket hears of them only with `IP_RECVERR`/`IPV6_RECVERR`, and then the
//! error also waits in the error queue ([`recv_error`]) with the destination that failed.
//! `EPOLLERR` stays raised while either is pending, so a level-triggered loop must drain both.

use super::socket::{bind, family, set_int_opt, RawAddr};
use super::{owned, syscall};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// The largest UDP payload (IPv6 without jumbograms: 65535 - 8); IPv4 allows 65507.
pub const MAX_DATAGRAM: usize = 65527;

/// A non-blocking, close-on-exec UDP socket of `addr`'s family. An IPv6 socket is made
/// IPv6-only, as the TCP listeners are: `[::]:P` and `0.0.0.0:P` are separate sockets.
pub fn socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let ty = libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain integer arguments.
    let fd = owned(unsafe { syscall!(socket(family(addr), ty, libc::IPPROTO_UDP))? });
    if addr.is_ipv6() {
        set_int_opt(borrow(&fd), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    Ok(fd)
}

fn borrow(fd: &OwnedFd) -> BorrowedFd<'_> {
    std::os::fd::AsFd::as_fd(fd)
}

/// `IP_TRANSPARENT`/`IPV6_TRANSPARENT` (both set the same socket flag): the socket may bind to
/// an address that is not local and receives what a TPROXY rule diverts to it. Needs
/// `CAP_NET_ADMIN` or `CAP_NET_RAW`.
pub fn set_transparent(fd: BorrowedFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_opt(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)
    } else {
        set_int_opt(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1)
    }
}

/// Ask for each datagram's original destination as a control message (`IP_ORIGDSTADDR` or
/// `IPV6_ORIGDSTADDR`; [`recv_orig_dst`] reads it). On an IPv6 socket the IPv4 option is set
/// too: a dual-stack socket reports IPv4 datagrams through the IPv4 option only
/// (`udpv6_recvmsg` calls `ip_cmsg_recv_offset` for them).
pub fn set_recv_orig_dst(fd: BorrowedFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_opt(fd, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1)?;
        set_v4_opt_on_v6(fd, libc::IP_RECVORIGDSTADDR)
    } else {
        set_int_opt(fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1)
    }
}

/// Queue ICMP errors on the socket (`IP_RECVERR`/`IPV6_RECVERR`): the only way an unconnected
/// socket learns that a destination refused; read them with [`recv_error`].
pub fn set_recv_err(fd: BorrowedFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_opt(fd, libc::SOL_IPV6, libc::IPV6_RECVERR, 1)?;
        set_v4_opt_on_v6(fd, libc::IP_RECVERR)
    } else {
        set_int_opt(fd, libc::SOL_IP, libc::IP_RECVERR, 1)
    }
}

/// Report with each datagram how many the kernel dropped on this socket for want of room in
/// its receive queue (`SO_RXQ_OVFL`; [`Received::kernel_drops`]).
pub fn set_rxq_ovfl(fd: BorrowedFd) -> io::Result<()> {
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)
}

/// A receive buffer of `bytes`: `SO_RCVBUFFORCE` (root, above `net.core.rmem_max`) or else
/// `SO_RCVBUF` (capped at `rmem_max`). A burst of 64 KiB datagrams needs more than the default
/// 208 KiB, which holds about two of them once fragmented and reassembled.
pub fn set_rcvbuf(fd: BorrowedFd, bytes: usize) -> io::Result<()> {
    let bytes = bytes.min(i32::MAX as usize) as libc::c_int;
    match set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes)
        }
        other => other,
    }
}

/// An `SOL_IP` option on an IPv6 socket, for the IPv4 datagrams of a dual-stack socket. An
/// IPv6-only socket has none; a kernel that refuses the option there loses nothing.
fn set_v4_opt_on_v6(fd: BorrowedFd, name: libc::c_int) -> io::Result<()> {
    match set_int_opt(fd, libc::SOL_IP, name, 1) {
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(()),
        other => other,
    }
}

/// A socket bound transparently to `local`, a foreign address (the original destination of a
/// diverted datagram), from which replies reach the client as if the server had sent them.
/// `SO_REUSEADDR` lets it share the port with a local service bound to the wildcard address
/// that set it too. Unconnected, it is never chosen by TPROXY's lookup of established sockets
/// (`nf_tproxy_get_sock_v4` skips unconnected UDP sockets), so it receives nothing.
pub fn bind_transparent(local: &SocketAddr) -> io::Result<OwnedFd> {
    let fd = socket(local)?;
    set_transparent(borrow(&fd), local.is_ipv6())?;
    set_int_opt(borrow(&fd), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    bind(borrow(&fd), local)?;
    Ok(fd)
}

/// `sendto(2)` without blocking; a datagram is sent whole or not at all. An error may belong
/// to an earlier datagram (a pending ICMP error is reported by the next call, see the header).
pub fn send_to(fd: BorrowedFd, buf: &[u8], to: &SocketAddr) -> io::Result<usize> {
    let raw = RawAddr::from(to);
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    let (ptr, len) = (buf.as_ptr().cast(), buf.len());
    // SAFETY: `buf` is readable for `len` bytes and `raw` holds a sockaddr of `raw.len` bytes.
    let n = unsafe { syscall!(sendto(fd.as_raw_fd(), ptr, len, flags, raw.ptr(), raw.len))? };
    Ok(n as usize)
}

/// `recvfrom(2)` without blocking. The length returned is the datagram's full length
/// (`MSG_TRUNC`): more than `buf.len()` means the tail was cut and the datagram is unusable.
pub fn recv_from(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    let mut raw = RawAddr::empty();
    let flags = libc::MSG_DONTWAIT | libc::MSG_TRUNC;
    let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
    // SAFETY: `buf` is writable for `len` bytes; `raw` is a writable sockaddr_storage of `raw.len`.
    let n = unsafe {
        syscall!(recvfrom(
            fd.as_raw_fd(),
            ptr,
            len,
            flags,
            raw.mut_ptr(),
            &mut raw.len
        ))?
    };
    Ok((n as usize, canonical(raw.to_socket_addr()?)))
}

/// Room for one control message carrying a `sockaddr_in6` or a `sock_extended_err` and its
/// offender address, with margin; aligned like `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; 256]);

/// One datagram received on a TPROXY socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The datagram's full length; more than the buffer means it was cut (see [`recv_from`]).
    pub len: usize,
    pub from: SocketAddr,
    /// Where the client sent it, before TPROXY diverted it; `None` if the option is off.
    pub orig_dst: Option<SocketAddr>,
    /// Datagrams the kernel dropped on this socket so far, its receive queue being full
    /// (`SO_RXQ_OVFL`, a running count); `None` if the option is off.
    pub kernel_drops: Option<u32>,
}

/// `recvmsg(2)` without blocking, with the original destination from the control message
/// that [`set_recv_orig_dst`] asked for.
pub fn recv_orig_dst(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut name = RawAddr::empty();
    let mut control = Control([0; 256]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut msg = msghdr(&mut name, &mut iov, &mut control);
    let flags = libc::MSG_DONTWAIT | libc::MSG_TRUNC;
    // SAFETY: `msg` points at `name`, `iov` (over `buf`) and `control`, all live and writable
    // for the lengths given.
    let n = unsafe { syscall!(recvmsg(fd.as_raw_fd(), &mut msg, flags))? };
    name.len = msg.msg_namelen;
    let (mut orig_dst, mut kernel_drops) = (None, None);
    for_each_cmsg(&msg, |level, ty, data| {
        let ours = (level == libc::SOL_IP && ty == libc::IP_ORIGDSTADDR)
            || (level == libc::SOL_IPV6 && ty == libc::IPV6_ORIGDSTADDR);
        if ours {
            orig_dst = sockaddr_from_bytes(data).map(canonical);
        }
        if let (libc::SOL_SOCKET, libc::SO_RXQ_OVFL, [a, b, c, d, ..]) = (level, ty, data) {
            kernel_drops = Some(u32::from_ne_bytes([*a, *b, *c, *d]));
        }
    });
    Ok(Received {
        len: n as usize,
        from: canonical(name.to_socket_addr()?),
        orig_dst,
        kernel_drops,
    })
}

/// An ICMP error the kernel queued on a socket with [`set_recv_err`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    /// ECONNREFUSED for port unreachable, EHOSTUNREACH, ENETUNREACH, EMSGSIZE...
    pub errno: i32,
    /// `SO_EE_ORIGIN_ICMP`, `SO_EE_ORIGIN_ICMP6` or `SO_EE_ORIGIN_LOCAL`.
    pub origin: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The destination of the datagram that failed (ip(7): the error's `msg_name`).
    pub dest: Option<SocketAddr>,
}

/// Takes one error from the socket's error queue (`MSG_ERRQUEUE`), `None` when it is empty.
/// Reading the queue also clears the pending `sk_err` the same error set.
pub fn recv_error(fd: BorrowedFd) -> io::Result<Option<IcmpError>> {
    let mut name = RawAddr::empty();
    let mut control = Control([0; 256]);
    // The offending datagram's payload is not wanted: a zero-length iovec, truncated.
    let mut iov = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut msg = msghdr(&mut name, &mut iov, &mut control);
    let flags = libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT;
    // SAFETY: `msg` points at `name`, a zero-length `iov` and `control`, all live and writable.
    match unsafe { syscall!(recvmsg(fd.as_raw_fd(), &mut msg, flags)) } {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    }
    name.len = msg.msg_namelen;
    let mut err = None;
    for_each_cmsg(&msg, |level, ty, data| {
        let ours = (level == libc::SOL_IP && ty == libc::IP_RECVERR)
            || (level == libc::SOL_IPV6 && ty == libc::IPV6_RECVERR);
        if ours && data.len() >= size_of::<libc::sock_extended_err>() {
            // SAFETY: `data` holds at least one sock_extended_err (checked above); the read is
            // unaligned-safe and the struct is plain integers.
            let ee: libc::sock_extended_err =
                unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
            err = Some(IcmpError {
                errno: ee.ee_errno as i32,
                origin: ee.ee_origin,
                icmp_type: ee.ee_type,
                icmp_code: ee.ee_code,
                dest: None,
            });
        }
    });
    let dest = name.to_socket_addr().ok().map(canonical);
    Ok(err.map(|e| IcmpError { dest, ..e }))
}

/// A `msghdr` over the three buffers (zeroed first: musl adds padding fields).
fn msghdr(name: &mut RawAddr, iov: &mut libc::iovec, control: &mut Control) -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all-zero (null pointers, zero lengths) is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = name.mut_ptr().cast();
    msg.msg_namelen = name.len;
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    msg
}

/// Calls `f(level, type, data)` for each control message the kernel wrote into `msg`.
fn for_each_cmsg(msg: &libc::msghdr, mut f: impl FnMut(i32, i32, &[u8])) {
    #[allow(clippy::unnecessary_cast)] // msg_controllen is socklen_t on musl
    let end = msg.msg_control as usize + msg.msg_controllen as usize;
    // SAFETY: `msg` is the msghdr recvmsg filled; msg_controllen is what the kernel wrote.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return null or a header inside the control buffer.
        let hdr: libc::cmsghdr = unsafe { std::ptr::read_unaligned(cmsg) };
        // SAFETY: CMSG_DATA only offsets the pointer past the header.
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        // SAFETY: CMSG_LEN(0) is pure arithmetic on the header size.
        let header = unsafe { libc::CMSG_LEN(0) } as usize;
        let len = (hdr.cmsg_len as usize).saturating_sub(header);
        if (data as usize).saturating_add(len) <= end {
            // SAFETY: `data..data + len` lies inside the control buffer (checked above), which
            // the kernel initialised.
            let bytes = unsafe { std::slice::from_raw_parts(data, len) };
            f(hdr.cmsg_level, hdr.cmsg_type, bytes);
        }
        // SAFETY: `msg` and `cmsg` are as above; CMSG_NXTHDR checks against msg_controllen.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
}

/// A `sockaddr_in`/`sockaddr_in6` carried in a control message.
fn sockaddr_from_bytes(data: &[u8]) -> Option<SocketAddr> {
    let mut raw = RawAddr::empty();
    let len = data.len().min(size_of::<libc::sockaddr_storage>());
    // SAFETY: `raw.storage` is writable for its whole size, `data` readable for `len` bytes,
    // and the two do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            (&mut raw.storage as *mut libc::sockaddr_storage).cast::<u8>(),
            len,
        )
    };
    raw.len = len as libc::socklen_t;
    raw.to_socket_addr().ok()
}

/// `::ffff:a.b.c.d:p` becomes `a.b.c.d:p`; every other address is returned as is.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip().to_canonical() {
        ip @ IpAddr::V4(_) => SocketAddr::new(ip, addr.port()),
        IpAddr::V6(_) => addr,
    }
}

#[cfg(test)]
mod tests;
