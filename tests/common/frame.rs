//! Hand-made TCP segments in Ethernet frames, for the tcsplice tests: built with correct
//! checksums (`Seg::frame`), run through the program with `BPF_PROG_TEST_RUN`
//! (tests/tcsplice_golden.rs) or sent onto a veth with an `AF_PACKET` socket (`inject`), as a
//! forged packet arrives from the wire.

use super::Topology;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

/// One's-complement sum of `data` (big-endian 16-bit words) added to `sum`.
pub fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment to build: header fields, raw option bytes, payload.
#[derive(Clone)]
pub struct Seg {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub win: u16,
    pub opts: Vec<u8>,
    pub payload: Vec<u8>,
}

pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const PSH: u8 = 0x08;
pub const RST: u8 = 0x04;

impl Seg {
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Seg {
        Seg {
            src,
            dst,
            seq: 1000,
            ack: 2000,
            flags: ACK,
            win: 512,
            opts: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// Ethernet + IP + TCP with correct checksums.
    pub fn frame(&self, eth_dst: [u8; 6], eth_src: [u8; 6]) -> Vec<u8> {
        assert_eq!(self.opts.len() % 4, 0);
        let mut t = Vec::new();
        t.extend(self.src.port().to_be_bytes());
        t.extend(self.dst.port().to_be_bytes());
        t.extend(self.seq.to_be_bytes());
        t.extend(self.ack.to_be_bytes());
        t.push((((20 + self.opts.len()) / 4) << 4) as u8);
        t.push(self.flags);
        t.extend(self.win.to_be_bytes());
        t.extend([0, 0, 0, 0]);
        t.extend(&self.opts);
        t.extend(&self.payload);
        let mut f = Vec::new();
        f.extend(eth_dst);
        f.extend(eth_src);
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend([0x08, 0x00, 0x45, 0]);
                f.extend(((20 + t.len()) as u16).to_be_bytes());
                f.extend([0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
                f.extend(s.octets());
                f.extend(d.octets());
                let c = fold(sum16(0, &f[14..34]));
                f[24..26].copy_from_slice(&c.to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
                f.extend((t.len() as u16).to_be_bytes());
                f.extend([6, 64]);
                f.extend(s.octets());
                f.extend(d.octets());
            }
            _ => unreachable!(),
        }
        let l4 = f.len();
        f.extend(t);
        let c = tcp_sum(&f, l4);
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        f
    }
}

/// The TCP checksum of the segment at `l4` in `frame`, with its check field taken as zero.
pub fn tcp_sum(frame: &[u8], l4: usize) -> u16 {
    let v6 = frame[12] == 0x86;
    let seg = &frame[l4..];
    let mut s = if v6 {
        sum16(0, &frame[22..54])
    } else {
        sum16(0, &frame[26..34])
    };
    s += 6 + seg.len() as u32;
    s = sum16(s, &seg[..16]);
    s = sum16(s, &seg[18..]);
    fold(s)
}

/// The MAC address of `dev` in namespace `ns` (`ip -o link show`).
pub fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", dev])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC address for {dev} in {ns}: {text}"));
    let mut mac = [0u8; 6];
    for (m, h) in mac.iter_mut().zip(hex.split(':')) {
        *m = u8::from_str_radix(h, 16).expect("MAC address");
    }
    mac
}

/// Sends `frame` (its Ethernet header included) out of `dev` in namespace `ns`, as if a host
/// on that link had sent it.
pub fn inject(ns: &str, dev: &str, frame: Vec<u8>) {
    let dev = std::ffi::CString::new(dev).unwrap();
    Topology::in_ns(ns, move || -> io::Result<()> {
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain integer arguments.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `to` are live for the call, of the lengths given.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        match n == frame.len() as isize {
            true => Ok(()),
            false => Err(io::Error::last_os_error()),
        }
    })
    .join()
    .unwrap()
    .unwrap_or_else(|e| panic!("inject a frame: {e}"));
}
