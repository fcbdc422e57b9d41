//! The start-up probe of the tcsplice plane: the kernel lets us use `TCP_REPAIR` (a loopback
//! pair frozen and thawed), and the loaded program reads our map entries the way this build
//! writes them (a packet of an OBSERVE flow through `BPF_PROG_TEST_RUN`: passed, counted, its
//! TSval recorded; a packet of no flow: not ours).
//!
//! Invariant: the probe leaves nothing behind — its map entry is deleted and its sockets
//! closed whether it passes or not.

use super::kernel::Kernel;
use super::map::{Flow, FlowKey};
use crate::sys::repair::{self, Leave};
use crate::sys::tc;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;

/// Runs both probes; the error says what failed.
pub fn run(kernel: &Kernel) -> Result<(), String> {
    repair_allowed()?;
    program_reads_entries(kernel)
}

fn repair_allowed() -> Result<(), String> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("loopback: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let c = TcpStream::connect(addr).map_err(|e| format!("loopback: {e}"))?;
    let (s, _) = l.accept().map_err(|e| format!("loopback: {e}"))?;
    match repair::repair_on(s.as_fd()) {
        Ok(()) => {
            let seqs = repair::queue_seqs(s.as_fd());
            let _ = repair::repair_off(s.as_fd(), Leave::Quiet);
            seqs.map_err(|e| format!("TCP_QUEUE_SEQ: {e}"))?;
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            return Err("TCP_REPAIR refused: needs CAP_NET_ADMIN".into());
        }
        Err(e) => return Err(format!("TCP_REPAIR: {e}")),
    }
    drop(c);
    Ok(())
}

/// An Ethernet frame: IPv4 `src -> dst`, a TCP ACK with the timestamp option `tsval`.
fn frame(src: SocketAddr, dst: SocketAddr, tsval: u32) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend([0x08, 0x00, 0x45, 0, 0, 72, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    for a in [src, dst] {
        if let std::net::IpAddr::V4(ip) = a.ip() {
            f.extend(ip.octets());
        }
    }
    f.extend(src.port().to_be_bytes());
    f.extend(dst.port().to_be_bytes());
    f.extend([0, 0, 0, 1, 0, 0, 0, 1, 0x80, 0x10, 0x01, 0x00, 0, 0, 0, 0]);
    f.extend([1, 1, 8, 10]);
    f.extend(tsval.to_be_bytes());
    f.extend([0u8; 4]);
    f.extend([0u8; 20]); // payload
    f
}

fn program_reads_entries(kernel: &Kernel) -> Result<(), String> {
    let key = FlowKey {
        src: "192.0.2.1:40000".parse().map_err(|_| "address")?,
        dst: "192.0.2.2:443".parse().map_err(|_| "address")?,
    };
    let Some(k) = key.encode() else {
        return Err("key".into());
    };
    let flow = Flow::observe(&key);
    kernel
        .insert(&k, &flow)
        .map_err(|e| format!("flows map: {e}"))?;
    let result = (|| {
        let run = |f: &[u8]| {
            tc::prog_test_run(kernel.prog.as_fd(), f, &[], 0)
                .map(|r| r.retval)
                .map_err(|e| e.to_string())
        };
        let ours = run(&frame(key.src, key.dst, 0x1234_5678))?;
        let other = run(&frame(key.dst, key.src, 1))?;
        let seen = kernel.read(&k, false).map_err(|e| e.to_string())?.seen;
        // Both pass on to the next filter (an OBSERVE entry's packet too: TC_ACT_OK would be
        // a final verdict that skips every later tcx program and clsact filter); the
        // counters below tell the entry's packet from the other.
        if ours != tc::TC_ACT_UNSPEC || other != tc::TC_ACT_UNSPEC {
            return Err(format!("verdicts {ours} and {other}, expected -1 and -1"));
        }
        if (seen.packets, seen.ts_last) != (1, Some(0x1234_5678)) {
            return Err(format!("the program recorded {seen:?}"));
        }
        Ok(())
    })();
    let _ = kernel.delete(&k);
    result.map_err(|e| format!("program test run: {e}"))
}
