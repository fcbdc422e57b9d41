//! The tcsplice plane's kernel objects: the classifier of `bpf/tcsplice.bpf.c` (embedded at
//! build time, loaded by `crate::bpf`), its `flows` and `errors` maps, and where it is
//! attached — a tcx link per device (Linux >= 6.6), or a clsact qdisc with a direct-action
//! `bpf` filter named `ksocks_tcsplice` (older kernels).
//!
//! Invariant: everything attached is detached when the `Kernel` is dropped (a tcx link by
//! closing it, a filter by deleting it), and filters of that name that a crashed ksocks left
//! behind are removed before anything is attached ([`Kernel::remove_stale`]); entries are
//! written only in the encodings of [`super::map`].

use super::map::{Flow, FlowKey, Seen, State, KEY_SIZE, VALUE_SIZE};
use crate::bpf::{self, MapSpec, ProgSpec};
use crate::sys::bpf as sys_bpf;
use crate::sys::netlink::{Link, Netlink};
use crate::sys::tc;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tcsplice.bpf.o"));

/// Must agree with the `MAP(...)` lines of the C source (checked by a unit test).
const MAPS: [MapSpec; 2] = [
    MapSpec {
        name: "flows",
        kind: sys_bpf::BPF_MAP_TYPE_HASH,
        key_size: KEY_SIZE as u32,
        value_size: VALUE_SIZE as u32,
        flags: sys_bpf::BPF_F_NO_PREALLOC,
    },
    MapSpec {
        name: "errors",
        kind: sys_bpf::BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 8,
        flags: 0,
    },
];
/// `ERR_MAX` of the C source: the size of `errors`.
pub const ERRORS: u32 = 8;
const PROG: ProgSpec = ProgSpec {
    section: "tc",
    name: "ksocks_tcsplice",
    prog_type: sys_bpf::BPF_PROG_TYPE_SCHED_CLS,
    expected_attach_type: 0,
};
/// The clsact filter: its name (found again by a later start), priority and handle.
pub const FILTER_NAME: &str = "ksocks_tcsplice";
const FILTER_PRIO: u16 = 0xC5;
const FILTER_HANDLE: u32 = 1;

/// How the program is attached to one device.
enum Attachment {
    /// The tcx link: detached when this descriptor closes (also when the process dies).
    Tcx { _link: OwnedFd },
    /// A clsact filter on this interface: deleted by `Drop`, or by the next start.
    Clsact(u32),
}

/// The loaded program and its maps; dropping it detaches the program everywhere.
pub struct Kernel {
    pub prog: OwnedFd,
    pub flows: sys_bpf::Map,
    pub errors: sys_bpf::Map,
    attached: Vec<Attachment>,
    max_entries: u32,
}

impl Kernel {
    /// Creates the maps (`flows` with room for `max_entries`) and loads the program.
    pub fn load(max_entries: u32) -> Result<Kernel, bpf::Error> {
        let object = bpf::Object::parse(OBJECT)?;
        let max_entries = max_entries.max(2);
        let flows = bpf::create_map(&MAPS[0], max_entries, None)?;
        let errors = bpf::create_map(&MAPS[1], ERRORS, None)?;
        let fd_of = |name: &str| match name {
            "flows" => Some(flows.as_fd().as_raw_fd()),
            "errors" => Some(errors.as_fd().as_raw_fd()),
            _ => None,
        };
        let prog = object.load(&PROG, &fd_of)?;
        Ok(Kernel {
            prog,
            flows,
            errors,
            attached: Vec::new(),
            max_entries,
        })
    }

    /// Deletes the clsact filters named [`FILTER_NAME`] from every interface in `links`:
    /// what a ksocks that did not exit cleanly left attached. Returns how many.
    pub fn remove_stale(nl: &mut Netlink, links: &[Link]) -> usize {
        let mut removed = 0;
        for l in links {
            // No clsact qdisc answers EINVAL or ENOENT: nothing of ours there.
            let Ok(filters) = nl.bpf_filters(l.index, true) else {
                continue;
            };
            for f in filters.iter().filter(|f| f.name == FILTER_NAME) {
                if nl.del_bpf_filter(l.index, true, f.prio, f.handle).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Attaches the program at ingress of interface `ifindex`: tcx, or where the kernel has
    /// no tcx (`EINVAL`), a clsact qdisc and filter. Returns which.
    pub fn attach(&mut self, nl: &mut Netlink, ifindex: u32) -> io::Result<&'static str> {
        #[cfg(feature = "test-hooks")]
        let tcx = match crate::test_hooks::force_clsact() {
            true => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            false => tc::tcx_attach(self.prog.as_fd(), ifindex, tc::BPF_TCX_INGRESS),
        };
        #[cfg(not(feature = "test-hooks"))]
        let tcx = tc::tcx_attach(self.prog.as_fd(), ifindex, tc::BPF_TCX_INGRESS);
        match tcx {
            Ok(link) => {
                self.attached.push(Attachment::Tcx { _link: link });
                return Ok("tcx");
            }
            Err(e) if e.raw_os_error() != Some(libc::EINVAL) => return Err(e),
            Err(_) => {}
        }
        match nl.add_clsact(ifindex) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
            _ => {}
        }
        let prog = self.prog.as_fd();
        nl.add_bpf_filter(ifindex, true, FILTER_PRIO, FILTER_HANDLE, prog, FILTER_NAME)?;
        self.attached.push(Attachment::Clsact(ifindex));
        Ok("clsact")
    }

    /// Inserts a new entry; `EEXIST` if the key has one, `E2BIG` when the map is full.
    pub fn insert(&self, key: &[u8; KEY_SIZE], flow: &Flow) -> io::Result<()> {
        self.flows
            .update(key, &flow.encode(), sys_bpf::BPF_NOEXIST)
            .map_err(|e| e.err)
    }

    /// Replaces an existing entry (`ENOENT` if there is none).
    pub fn replace(&self, key: &[u8; KEY_SIZE], flow: &Flow) -> io::Result<()> {
        self.flows
            .update(key, &flow.encode(), sys_bpf::BPF_EXIST)
            .map_err(|e| e.err)
    }

    /// Reads an entry (`ENOENT` if there is none).
    pub fn read(&self, key: &[u8; KEY_SIZE], v6: bool) -> io::Result<Flow> {
        let mut v = [0u8; VALUE_SIZE];
        self.flows.lookup(key, &mut v).map_err(|e| e.err)?;
        Ok(Flow::decode(&v, v6))
    }

    /// Changes only the state of an entry, keeping what the program observed so far.
    pub fn set_state(&self, key: &FlowKey, state: State) -> io::Result<Seen> {
        let k = key.encode().ok_or(io::ErrorKind::InvalidInput)?;
        let flow = Flow {
            state,
            ..self.read(&k, key.src.is_ipv6())?
        };
        self.replace(&k, &flow)?;
        Ok(flow.seen)
    }

    /// Deletes an entry; an absent one is fine.
    pub fn delete(&self, key: &[u8; KEY_SIZE]) -> io::Result<()> {
        match self.flows.delete(key) {
            Err(e) if e.err.raw_os_error() != Some(libc::ENOENT) => Err(e.err),
            _ => Ok(()),
        }
    }

    /// Appends every (key, value) of `flows` to `out`, in batches (Linux >= 5.6; `Err`
    /// means the caller reads the entries it wants one by one).
    pub fn scan(&self, out: &mut Vec<([u8; KEY_SIZE], [u8; VALUE_SIZE])>) -> io::Result<()> {
        const CHUNK: usize = 1024;
        let (mut keys, mut values) = (vec![0u8; KEY_SIZE * CHUNK], vec![0u8; VALUE_SIZE * CHUNK]);
        let mut token = None;
        // Bounded: a concurrent insert may make the walk see a few more entries.
        for _ in 0..=(self.max_entries as usize / CHUNK + 1) {
            let (n, next, done) = self
                .flows
                .lookup_batch(token.as_ref(), &mut keys, &mut values)
                .map_err(|e| e.err)?;
            let pairs = keys
                .chunks_exact(KEY_SIZE)
                .zip(values.chunks_exact(VALUE_SIZE));
            for (k, v) in pairs.take(n) {
                let (mut key, mut value) = ([0u8; KEY_SIZE], [0u8; VALUE_SIZE]);
                key.copy_from_slice(k);
                value.copy_from_slice(v);
                out.push((key, value));
            }
            if done {
                break;
            }
            token = Some(next);
        }
        Ok(())
    }

    /// Entries in `flows`, counted by walking the keys.
    pub fn entries(&self) -> usize {
        let (mut total, mut key, mut next) = (0, None::<[u8; KEY_SIZE]>, [0u8; KEY_SIZE]);
        // Bounded, as a concurrent delete may restart the walk from the first key.
        while total <= 2 * self.max_entries as usize
            && self
                .flows
                .next_key(key.as_ref().map(|k| &k[..]), &mut next)
                .is_ok()
        {
            total += 1;
            key = Some(next);
        }
        total
    }

    /// Packets the program dropped for each reason of its `errors` map.
    pub fn errors(&self) -> [u64; ERRORS as usize] {
        let mut out = [0; ERRORS as usize];
        for (i, n) in out.iter_mut().enumerate() {
            let mut v = [0u8; 8];
            if self
                .errors
                .lookup(&(i as u32).to_ne_bytes(), &mut v)
                .is_ok()
            {
                *n = u64::from_ne_bytes(v);
            }
        }
        out
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let clsact = self.attached.iter().filter_map(|a| match a {
            Attachment::Clsact(ifindex) => Some(*ifindex),
            Attachment::Tcx { .. } => None,
        });
        let clsact: Vec<u32> = clsact.collect();
        if clsact.is_empty() {
            return; // tcx links detach as their descriptors close
        }
        if let Ok(mut nl) = Netlink::open(libc::NETLINK_ROUTE) {
            for ifindex in clsact {
                let _ = nl.del_bpf_filter(ifindex, true, FILTER_PRIO, FILTER_HANDLE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C map definitions agree with the loader's `MAPS` table, in both objects.
    #[test]
    fn map_definitions_match_the_loader() {
        for e in ["el", "eb"] {
            let path = format!("{}/bpf/tcsplice.bpf{e}.o", env!("CARGO_MANIFEST_DIR"));
            bpf::check_map_table(&std::fs::read(path).unwrap(), &MAPS).unwrap();
        }
    }

    /// The verifier accepts the program and both maps are created (needs root).
    #[test]
    fn verifier_accepts_the_program() {
        match Kernel::load(16) {
            Ok(k) => assert_eq!(k.entries(), 0),
            Err(bpf::Error::Syscall(e))
                if e.err.raw_os_error() == Some(libc::EPERM)
                    && std::env::var("CI").as_deref() != Ok("true") =>
            {
                eprintln!("skipped: needs CAP_BPF/CAP_NET_ADMIN")
            }
            Err(e) => panic!("{e:#}"),
        }
    }
}
