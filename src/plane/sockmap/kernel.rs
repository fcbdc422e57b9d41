//! The sockmap plane's kernel objects: the programs of `bpf/ksocks.bpf.c` (embedded at build
//! time, loaded by `crate::bpf`) and their three maps, keyed by socket cookie:
//! `redirect` (cookie -> peer socket), `hook` (cookie -> socket, carries the programs) and
//! `counters` (cookie -> bytes the verdict program redirected from that socket).
//!
//! Invariant: a socket is in `hook` only while its own and its peer's `redirect` entries
//! exist — [`Kernel::pair`] before [`Kernel::hook`] (KERNEL-NOTES s.4) — so the verdict
//! program always has a target. Sockets leave both SOCKHASHes on their last `close()`;
//! `counters` entries stay until [`Kernel::unpair`].

use super::wake::Wakeup;
use crate::bpf::{self, MapSpec, ProgSpec};
use crate::sys::bpf as sys_bpf;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ksocks.bpf.o"));

const REDIRECT: usize = 0;
const HOOK: usize = 1;
const COUNTERS: usize = 2;
/// Must agree with the `MAP(...)` lines of the C source (checked by a unit test).
const MAPS: [MapSpec; 3] = [
    MapSpec {
        name: "redirect",
        kind: sys_bpf::BPF_MAP_TYPE_SOCKHASH,
        key_size: 8,
        value_size: 4,
        flags: 0,
    },
    MapSpec {
        name: "hook",
        kind: sys_bpf::BPF_MAP_TYPE_SOCKHASH,
        key_size: 8,
        value_size: 4,
        flags: 0,
    },
    MapSpec {
        name: "counters",
        kind: sys_bpf::BPF_MAP_TYPE_HASH,
        key_size: 8,
        value_size: 8,
        flags: 0,
    },
];
/// Both programs attach to `hook`, parser first.
const PROGS: [(ProgSpec, u32); 2] = [
    (
        ProgSpec {
            section: "sk_skb/stream_parser",
            name: "ksocks_parser",
            prog_type: sys_bpf::BPF_PROG_TYPE_SK_SKB,
            expected_attach_type: 0,
        },
        sys_bpf::BPF_SK_SKB_STREAM_PARSER,
    ),
    (
        ProgSpec {
            section: "sk_skb/stream_verdict",
            name: "ksocks_verdict",
            prog_type: sys_bpf::BPF_PROG_TYPE_SK_SKB,
            expected_attach_type: 0,
        },
        sys_bpf::BPF_SK_SKB_STREAM_VERDICT,
    ),
];
const NO_SOCKHASH: &str =
    "kernel lacks BPF_MAP_TYPE_SOCKHASH (needs Linux >= 4.18 with CONFIG_BPF_STREAM_PARSER)";

/// The loaded programs and their maps; dropping it closes them, which empties the maps.
pub struct Kernel {
    maps: [sys_bpf::Map; 3],
    _progs: Vec<OwnedFd>,
    pub(super) max_entries: u32,
    /// Which redirect targets this kernel wakes on write space: the self-test's finding,
    /// the cautious answer until it ran.
    pub(super) wakeup: Wakeup,
}

impl Kernel {
    /// Creates the maps sized for `max_sockets` sockets, loads and relocates the
    /// programs, and attaches parser and verdict to `hook`.
    pub fn load(max_sockets: u32) -> Result<Kernel, bpf::Error> {
        let object = bpf::Object::parse(OBJECT)?;
        let max_entries = max_sockets.max(1);
        let maps = [
            bpf::create_map(&MAPS[REDIRECT], max_entries, Some(NO_SOCKHASH))?,
            bpf::create_map(&MAPS[HOOK], max_entries, Some(NO_SOCKHASH))?,
            bpf::create_map(&MAPS[COUNTERS], max_entries, None)?,
        ];
        let fd_of = |name: &str| {
            let i = MAPS.iter().position(|m| m.name == name)?;
            Some(maps[i].as_fd().as_raw_fd())
        };
        let mut progs = Vec::new();
        for (spec, attach_type) in &PROGS {
            let fd = object.load(spec, &fd_of)?;
            sys_bpf::prog_attach(maps[HOOK].as_fd(), fd.as_fd(), *attach_type)
                .map_err(bpf::Error::Syscall)?;
            progs.push(fd);
        }
        Ok(Kernel {
            maps,
            _progs: progs,
            max_entries,
            wakeup: Wakeup::HookedOnly,
        })
    }

    /// Makes `a` and `b` each other's redirect target and zeroes their counters. Either
    /// all four entries are added or, on error, none: each must be new (`EEXIST`
    /// otherwise), so an undo never removes an entry someone else made.
    pub fn pair(
        &self,
        a: BorrowedFd,
        a_cookie: u64,
        b: BorrowedFd,
        b_cookie: u64,
    ) -> io::Result<()> {
        let zero = 0u64.to_ne_bytes();
        let (a_fd, b_fd) = (fd_value(a), fd_value(b));
        let steps: [(&sys_bpf::Map, u64, &[u8], u64); 4] = [
            (&self.maps[COUNTERS], a_cookie, &zero, sys_bpf::BPF_NOEXIST),
            (&self.maps[COUNTERS], b_cookie, &zero, sys_bpf::BPF_NOEXIST),
            (&self.maps[REDIRECT], a_cookie, &b_fd, sys_bpf::BPF_NOEXIST),
            (&self.maps[REDIRECT], b_cookie, &a_fd, sys_bpf::BPF_NOEXIST),
        ];
        for (i, (map, key, value, flags)) in steps.iter().enumerate() {
            if let Err(e) = map.update(&key.to_ne_bytes(), value, *flags) {
                for (map, key, ..) in &steps[..i] {
                    let _ = map.delete(&key.to_ne_bytes());
                }
                return Err(e.err);
            }
        }
        Ok(())
    }

    /// Inserts a paired socket into `hook`: from now on the kernel moves its bytes.
    /// Errors keep the kernel's errno: `EOPNOTSUPP` (not ESTABLISHED, MPTCP), `E2BIG`
    /// (map full), `EBUSY` (already hooked, or in another sockmap with programs).
    pub fn hook(&self, fd: BorrowedFd, cookie: u64) -> io::Result<()> {
        self.maps[HOOK]
            .update(&cookie.to_ne_bytes(), &fd_value(fd), sys_bpf::BPF_NOEXIST)
            .map_err(|e| e.err)
    }

    /// Takes a socket out of `hook`; its bytes then stay in its receive queue.
    pub fn unhook(&self, cookie: u64) -> io::Result<()> {
        remove(&self.maps[HOOK], cookie)
    }

    /// Drops the pair's `redirect` and `counters` entries (absent ones are fine).
    pub fn unpair(&self, a_cookie: u64, b_cookie: u64) {
        for map in [&self.maps[REDIRECT], &self.maps[COUNTERS]] {
            for cookie in [a_cookie, b_cookie] {
                let _ = remove(map, cookie);
            }
        }
    }

    /// Bytes the kernel redirected from the socket `cookie` to its peer (0 if unknown).
    /// Still readable after the socket closed, until [`Kernel::unpair`].
    pub fn forwarded(&self, cookie: u64) -> u64 {
        let mut value = [0; 8];
        match self.maps[COUNTERS].lookup(&cookie.to_ne_bytes(), &mut value) {
            Ok(()) => u64::from_ne_bytes(value),
            Err(_) => 0,
        }
    }

    /// Appends every (cookie, bytes redirected) of the `counters` map to `out`, reading it in
    /// batches of 4096: one syscall per 4096 sockets instead of one per socket, which is what
    /// lets the event loop notice activity on thousands of idle spliced connections cheaply.
    /// `Err` (kernels before 5.6 lack BPF_MAP_LOOKUP_BATCH) means "poll each one".
    pub fn counters(&self, out: &mut Vec<(u64, u64)>) -> io::Result<()> {
        self.read_counters(out, 4096)
    }

    pub(super) fn read_counters(&self, out: &mut Vec<(u64, u64)>, chunk: usize) -> io::Result<()> {
        let (mut keys, mut values) = (vec![0u8; 8 * chunk], vec![0u8; 8 * chunk]);
        let mut token = None;
        // Bounded: a concurrent insert may make the walk see a few more entries.
        for _ in 0..=(self.max_entries as usize / chunk + 1) {
            let (n, next, done) = self.maps[COUNTERS]
                .lookup_batch(token.as_ref(), &mut keys, &mut values)
                .map_err(|e| e.err)?;
            let word = |w: &[u8]| {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                u64::from_ne_bytes(b)
            };
            let pairs = keys.chunks_exact(8).zip(values.chunks_exact(8)).take(n);
            out.extend(pairs.map(|(k, v)| (word(k), word(v))));
            if done {
                break;
            }
            token = Some(next);
        }
        Ok(())
    }

    /// Entries in all three maps, counted by walking their keys.
    pub fn entries(&self) -> usize {
        let mut total = 0;
        for map in &self.maps {
            let (mut key, mut next) = (None::<[u8; 8]>, [0u8; 8]);
            // Ends with ENOENT after the last key. Bounded, as a concurrent delete may
            // restart the walk from the first key.
            while total <= 3 * self.max_entries as usize
                && map
                    .next_key(key.as_ref().map(|k| &k[..]), &mut next)
                    .is_ok()
            {
                total += 1;
                key = Some(next);
            }
        }
        total
    }
}

/// A SOCKHASH value: the socket's descriptor as a `u32`.
fn fd_value(fd: BorrowedFd) -> [u8; 4] {
    (fd.as_raw_fd() as u32).to_ne_bytes()
}

/// Deletes `cookie` from `map`; an absent key is fine.
fn remove(map: &sys_bpf::Map, cookie: u64) -> io::Result<()> {
    match map.delete(&cookie.to_ne_bytes()) {
        Err(e) if e.err.raw_os_error() != Some(libc::ENOENT) => Err(e.err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C map definitions agree with the loader's `MAPS` table, in both objects.
    #[test]
    fn map_definitions_match_the_loader() {
        for e in ["el", "eb"] {
            let path = format!("{}/bpf/ksocks.bpf{e}.o", env!("CARGO_MANIFEST_DIR"));
            bpf::check_map_table(&std::fs::read(path).unwrap(), &MAPS).unwrap();
        }
    }
}
