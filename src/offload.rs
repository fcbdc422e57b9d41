//! Sockmap data plane: loads the programs of `bpf/ksocks.bpf.c` (embedded at build time)
//! and manages their three maps, keyed by socket cookie:
//! `redirect` (cookie -> peer socket), `hook` (cookie -> socket, carries the programs) and
//! `counters` (cookie -> bytes the verdict program redirected from that socket).
//!
//! Invariant: a socket is in `hook` only while its own and its peer's `redirect` entries
//! exist — [`Offload::pair`] before [`Offload::hook`] (KERNEL-NOTES s.4) — so the verdict
//! program always has a target. Sockets leave both SOCKHASHes on their last `close()`;
//! `counters` entries stay until [`Offload::unpair`].
//!
//! The embedded object is a relocatable ELF64 file in the target's byte order. The loader
//! reads only what it needs: section headers, the symbol table, the `license` section and
//! the `SHT_REL` sections of the two program sections, whose `R_BPF_64_64` entries name
//! the map each `ld_imm64` loads; those become `BPF_PSEUDO_MAP_FD` loads of our map fds.
#![deny(unsafe_code)]

use std::ffi::CString;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::thread;
use std::time::{Duration, Instant};

use crate::sys::{bpf, socket};

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ksocks.bpf.o"));

/// A map the object refers to by symbol name; its `max_entries` is set at load time.
struct MapSpec {
    name: &'static str,
    kind: u32,
    key_size: u32,
    value_size: u32,
}

const REDIRECT: usize = 0;
const HOOK: usize = 1;
const COUNTERS: usize = 2;
/// Must agree with the `MAP(...)` lines of the C source (checked by a unit test).
const MAPS: [MapSpec; 3] = [
    MapSpec {
        name: "redirect",
        kind: bpf::BPF_MAP_TYPE_SOCKHASH,
        key_size: 8,
        value_size: 4,
    },
    MapSpec {
        name: "hook",
        kind: bpf::BPF_MAP_TYPE_SOCKHASH,
        key_size: 8,
        value_size: 4,
    },
    MapSpec {
        name: "counters",
        kind: bpf::BPF_MAP_TYPE_HASH,
        key_size: 8,
        value_size: 8,
    },
];
/// (ELF section, program name, attach type to `hook`).
const PROGS: [(&str, &str, u32); 2] = [
    (
        "sk_skb/stream_parser",
        "ksocks_parser",
        bpf::BPF_SK_SKB_STREAM_PARSER,
    ),
    (
        "sk_skb/stream_verdict",
        "ksocks_verdict",
        bpf::BPF_SK_SKB_STREAM_VERDICT,
    ),
];
/// How long the start-up self-test may take.
const SELF_TEST_TIME: Duration = Duration::from_secs(2);

/// The loaded programs and their maps; dropping it closes them, which empties the maps.
pub struct Offload {
    maps: [bpf::Map; 3],
    _progs: Vec<OwnedFd>,
    max_entries: u32,
}

/// Why the sockmap plane is unavailable.
#[derive(Debug)]
pub enum OffloadError {
    /// The embedded object is not what this loader expects (a build problem).
    Object(String),
    /// The kernel lacks a feature.
    Unsupported(&'static str),
    /// A `bpf()` command failed.
    Syscall(bpf::SyscallError),
    /// The verifier refused a program; `{:#}` shows its whole log.
    Verifier {
        prog: &'static str,
        err: bpf::SyscallError,
        log: String,
    },
    /// Everything loaded, but the kernel did not move bytes exactly.
    SelfTest(String),
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            OffloadError::Object(why) => write!(f, "embedded BPF object: {why}"),
            OffloadError::Unsupported(why) => f.write_str(why),
            OffloadError::Syscall(e) => {
                let hint = match e.err.raw_os_error() {
                    Some(libc::EPERM) => " (needs CAP_BPF/CAP_NET_ADMIN)",
                    Some(libc::ENOSYS) => " (kernel built without CONFIG_BPF_SYSCALL)",
                    _ => "",
                };
                write!(f, "{e}{hint}")
            }
            OffloadError::Verifier { prog, err, log } if f.alternate() => {
                write!(f, "{err}: verifier refused {prog}:\n{log}")
            }
            OffloadError::Verifier { prog, err, log } => {
                // The reason is at the end of the log.
                let tail: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
                let tail = tail[tail.len().saturating_sub(2)..].join(" / ");
                write!(f, "{err}: verifier refused {prog}: {tail}")
            }
            OffloadError::SelfTest(why) => write!(f, "self-test: {why}"),
        }
    }
}

impl std::error::Error for OffloadError {}

impl Offload {
    /// Creates the maps sized for `max_sockets` sockets, loads and relocates the
    /// programs, and attaches parser and verdict to `hook`.
    pub fn load(max_sockets: u32) -> Result<Offload, OffloadError> {
        let elf = Elf::parse(OBJECT).map_err(OffloadError::Object)?;
        if elf.big != cfg!(target_endian = "big") {
            return Err(OffloadError::Object(
                "byte order differs from the target's".into(),
            ));
        }
        let max_entries = max_sockets.max(1);
        let maps = [
            create_map(&MAPS[REDIRECT], max_entries)?,
            create_map(&MAPS[HOOK], max_entries)?,
            create_map(&MAPS[COUNTERS], max_entries)?,
        ];
        let fd_of = |name: &str| {
            let i = MAPS.iter().position(|m| m.name == name)?;
            Some(maps[i].as_fd().as_raw_fd())
        };
        let license = elf.license().map_err(OffloadError::Object)?;
        let mut progs = Vec::new();
        for (section, prog, attach_type) in PROGS {
            let insns = relocate(&elf, section, &fd_of).map_err(OffloadError::Object)?;
            let fd =
                bpf::prog_load(bpf::BPF_PROG_TYPE_SK_SKB, &insns, &license, prog).map_err(|e| {
                    match e.log.is_empty() {
                        true => OffloadError::Syscall(e.err), // refused before the verifier ran
                        false => OffloadError::Verifier {
                            prog,
                            err: e.err,
                            log: e.log,
                        },
                    }
                })?;
            bpf::prog_attach(maps[HOOK].as_fd(), fd.as_fd(), attach_type)
                .map_err(OffloadError::Syscall)?;
            progs.push(fd);
        }
        Ok(Offload {
            maps,
            _progs: progs,
            max_entries,
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
        let steps: [(&bpf::Map, u64, &[u8], u64); 4] = [
            (&self.maps[COUNTERS], a_cookie, &zero, bpf::BPF_NOEXIST),
            (&self.maps[COUNTERS], b_cookie, &zero, bpf::BPF_NOEXIST),
            (&self.maps[REDIRECT], a_cookie, &b_fd, bpf::BPF_NOEXIST),
            (&self.maps[REDIRECT], b_cookie, &a_fd, bpf::BPF_NOEXIST),
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
            .update(&cookie.to_ne_bytes(), &fd_value(fd), bpf::BPF_NOEXIST)
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
    /// Still readable after the socket closed, until [`Offload::unpair`].
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

    fn read_counters(&self, out: &mut Vec<(u64, u64)>, chunk: usize) -> io::Result<()> {
        let (mut keys, mut values) = (vec![0u8; 8 * chunk], vec![0u8; 8 * chunk]);
        let mut token = None;
        // Bounded: a concurrent insert may make the walk see a few more entries.
        for _ in 0..=(self.max_entries as usize / chunk + 1) {
            let (n, next, done) = self.maps[COUNTERS]
                .lookup_batch(token.as_ref(), &mut keys, &mut values)
                .map_err(|e| e.err)?;
            let word = |b: &[u8], i: usize| {
                u64::from_ne_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"))
            };
            out.extend((0..n).map(|i| (word(&keys, i), word(&values, i))));
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

    /// Start-up probe: splices a loopback pair of TCP connections through the kernel, checks
    /// bytes both ways, a FIN passed on by byte accounting (KERNEL-NOTES s.1) while the
    /// other direction keeps flowing, and that no map entry is left afterwards. Run it
    /// before any connection uses the maps (the entry check counts them all).
    pub fn self_test(&self) -> Result<(), OffloadError> {
        let result = self.run_self_test(Instant::now() + SELF_TEST_TIME);
        let left = self.entries();
        result.map_err(OffloadError::SelfTest)?;
        match left {
            0 => Ok(()),
            n => Err(OffloadError::SelfTest(format!(
                "{n} map entries left behind"
            ))),
        }
    }

    fn run_self_test(&self, deadline: Instant) -> Result<(), String> {
        // c1 -> [p1 | p2] -> c2, like client -> ksocks -> server.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ctx("bind"))?;
        let addr = listener.local_addr().map_err(ctx("bind"))?;
        let mut c1 = TcpStream::connect(addr).map_err(ctx("connect"))?;
        let (p1, _) = listener.accept().map_err(ctx("accept"))?;
        let p2 = TcpStream::connect(addr).map_err(ctx("connect"))?;
        let (mut c2, _) = listener.accept().map_err(ctx("accept"))?;
        let k1 = socket::socket_cookie(p1.as_fd()).map_err(ctx("SO_COOKIE"))?;
        let k2 = socket::socket_cookie(p2.as_fd()).map_err(ctx("SO_COOKIE"))?;
        let base1 = send_path(&p1).map_err(ctx("TCP_INFO"))?;
        let base2 = send_path(&p2).map_err(ctx("TCP_INFO"))?;
        self.pair(p1.as_fd(), k1, p2.as_fd(), k2)
            .map_err(ctx("pair"))?;
        let result = (|| {
            self.hook(p1.as_fd(), k1).map_err(ctx("hook"))?;
            self.hook(p2.as_fd(), k2).map_err(ctx("hook"))?;
            let (up, down) = (pattern(10_000, 3), pattern(20_000, 7));
            transfer(&mut c1, &mut c2, &up, deadline)?;
            transfer(&mut c2, &mut c1, &down[..15_000], deadline)?;
            c1.shutdown(Shutdown::Write).map_err(ctx("shutdown"))?;
            self.pass_fin(&p1, k1, 10_000, &p2, base2, deadline)?;
            expect_eof(&mut c2, deadline)?;
            // The other direction keeps flowing after the half-close.
            transfer(&mut c2, &mut c1, &down[15_000..], deadline)?;
            c2.shutdown(Shutdown::Write).map_err(ctx("shutdown"))?;
            self.pass_fin(&p2, k2, 20_000, &p1, base1, deadline)?;
            expect_eof(&mut c1, deadline)?;
            match (self.forwarded(k1), self.forwarded(k2)) {
                (10_000, 20_000) => Ok(()),
                (a, b) => Err(format!("counters {a}/{b}, expected 10000/20000")),
            }
        })();
        let _ = self.unhook(k1);
        let _ = self.unhook(k2);
        self.unpair(k1, k2);
        result
    }

    /// Passes on the FIN that follows `expected` bytes from `src`'s peer: waits until it
    /// arrived and everything before it has entered `dst`'s send path — the byte accounting
    /// of KERNEL-NOTES s.1, `bytes_received(src) - 1 == bytes_acked(dst) + outq(dst) -
    /// dst_base` — then shuts `dst` for writing. Polls every millisecond. (The event loop
    /// learns of the FIN from `EPOLLRDHUP` instead of knowing `expected`.)
    fn pass_fin(
        &self,
        src: &TcpStream,
        src_cookie: u64,
        expected: u64,
        dst: &TcpStream,
        dst_base: u64,
        deadline: Instant,
    ) -> Result<(), String> {
        loop {
            let received = socket::tcp_bytes(src.as_fd())
                .map_err(ctx("TCP_INFO"))?
                .received;
            let sent = send_path(dst)
                .map_err(ctx("TCP_INFO"))?
                .saturating_sub(dst_base);
            let forwarded = self.forwarded(src_cookie);
            if sent > forwarded || forwarded > expected {
                return Err(format!("kernel duplicated bytes: {expected} sent, {forwarded} forwarded, {sent} queued"));
            }
            if received == expected + 1 && forwarded == expected && sent == expected {
                return dst.shutdown(Shutdown::Write).map_err(ctx("shutdown"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "FIN not passed on in time: {expected} sent, {received} received (with FIN), {forwarded} forwarded, {sent} queued"
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

fn create_map(spec: &MapSpec, max_entries: u32) -> Result<bpf::Map, OffloadError> {
    let name = format!("ksocks_{}", spec.name);
    let create = || {
        bpf::Map::create(
            spec.kind,
            spec.key_size,
            spec.value_size,
            max_entries,
            &name,
        )
    };
    let result = match create() {
        // Kernels before 5.11 charge maps to RLIMIT_MEMLOCK and report EPERM.
        Err(e) if e.err.raw_os_error() == Some(libc::EPERM) => {
            bpf::raise_memlock();
            create()
        }
        other => other,
    };
    result.map_err(|e| match e.err.raw_os_error() {
        Some(libc::EINVAL) if spec.kind == bpf::BPF_MAP_TYPE_SOCKHASH => {
            OffloadError::Unsupported("kernel lacks BPF_MAP_TYPE_SOCKHASH (needs Linux >= 4.18 with CONFIG_BPF_STREAM_PARSER)")
        }
        _ => OffloadError::Syscall(e),
    })
}

/// A SOCKHASH value: the socket's descriptor as a `u32`.
fn fd_value(fd: BorrowedFd) -> [u8; 4] {
    (fd.as_raw_fd() as u32).to_ne_bytes()
}

/// Deletes `cookie` from `map`; an absent key is fine.
fn remove(map: &bpf::Map, cookie: u64) -> io::Result<()> {
    match map.delete(&cookie.to_ne_bytes()) {
        Err(e) if e.err.raw_os_error() != Some(libc::ENOENT) => Err(e.err),
        _ => Ok(()),
    }
}

/// `bytes_acked + SIOCOUTQ`: everything that entered the socket's send path so far.
fn send_path(s: &TcpStream) -> io::Result<u64> {
    let acked = socket::tcp_bytes(s.as_fd())?.acked;
    Ok(acked + u64::from(socket::outq(s.as_fd())?))
}

fn ctx(what: &'static str) -> impl Fn(io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// `len` bytes that reveal loss, duplication and reordering.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul((i / 251) as u8))
        .collect()
}

/// Bounds blocking reads and writes on `s` by what is left until `deadline`.
fn timeout(s: &TcpStream, deadline: Instant) -> Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".into());
    }
    s.set_read_timeout(Some(left)).map_err(ctx("SO_RCVTIMEO"))?;
    s.set_write_timeout(Some(left)).map_err(ctx("SO_SNDTIMEO"))
}

/// Writes `data` into `from` and checks `to` reads exactly it.
fn transfer(
    from: &mut TcpStream,
    to: &mut TcpStream,
    data: &[u8],
    deadline: Instant,
) -> Result<(), String> {
    timeout(from, deadline)?;
    from.write_all(data).map_err(ctx("send"))?;
    timeout(to, deadline)?;
    let mut got = vec![0; data.len()];
    to.read_exact(&mut got).map_err(ctx("receive"))?;
    match got == data {
        true => Ok(()),
        false => Err(format!("{} bytes arrived altered", data.len())),
    }
}

fn expect_eof(s: &mut TcpStream, deadline: Instant) -> Result<(), String> {
    timeout(s, deadline)?;
    match s.read(&mut [0; 1]).map_err(ctx("waiting for EOF"))? {
        0 => Ok(()),
        _ => Err("bytes after the FIN".into()),
    }
}

// --- ELF64 (elf(5); values from include/uapi/linux/elf.h and elf-em.h) ---
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELFDATA2MSB: u8 = 2;
const EM_BPF: u16 = 247;
const SHT_RELA: u32 = 4;
const SHT_NOBITS: u32 = 8;
const SHT_REL: u32 = 9;
const R_BPF_64_64: u32 = 1;
/// `BPF_LD | BPF_IMM | BPF_DW`: the two-slot 64-bit immediate load.
const BPF_LD_IMM64: u8 = 0x18;

struct Elf<'a> {
    data: &'a [u8],
    big: bool,
    sections: Vec<Section>,
    shstrndx: usize,
}

#[derive(Clone, Copy)]
struct Section {
    name: u32,
    kind: u32,
    offset: usize,
    size: usize,
    link: usize,
    info: usize,
}

impl<'a> Elf<'a> {
    fn parse(data: &'a [u8]) -> Result<Elf<'a>, String> {
        if data.len() < 64 || data[..4] != *b"\x7fELF" || data[4] != ELFCLASS64 {
            return Err("not an ELF64 file".into());
        }
        let big = match data[5] {
            ELFDATA2LSB => false,
            ELFDATA2MSB => true,
            _ => return Err("unknown byte order".into()),
        };
        let mut elf = Elf {
            data,
            big,
            sections: Vec::new(),
            shstrndx: 0,
        };
        if elf.u16(18)? != EM_BPF {
            return Err("not a BPF object".into());
        }
        let (shoff, shentsize, shnum) = (elf.usize(0x28)?, elf.u16(0x3a)?, elf.u16(0x3c)?);
        if shentsize != 64 {
            return Err("unexpected section header size".into());
        }
        for i in 0..usize::from(shnum) {
            let h = shoff
                .checked_add(i * 64)
                .ok_or("bad section header offset")?;
            elf.bytes(h, 64)?;
            let s = Section {
                name: elf.u32(h)?,
                kind: elf.u32(h + 4)?,
                offset: elf.usize(h + 24)?,
                size: elf.usize(h + 32)?,
                link: elf.u32(h + 40)? as usize,
                info: elf.u32(h + 44)? as usize,
            };
            if s.kind != SHT_NOBITS {
                elf.bytes(s.offset, s.size)?;
            }
            elf.sections.push(s);
        }
        elf.shstrndx = usize::from(elf.u16(0x3e)?);
        elf.section_at(elf.shstrndx)?;
        Ok(elf)
    }

    fn bytes(&self, offset: usize, len: usize) -> Result<&'a [u8], String> {
        let end = offset.checked_add(len).ok_or("offset overflow")?;
        self.data
            .get(offset..end)
            .ok_or_else(|| "truncated".to_string())
    }

    fn array<const N: usize>(&self, offset: usize) -> Result<[u8; N], String> {
        let mut out = [0; N];
        out.copy_from_slice(self.bytes(offset, N)?);
        if self.big == cfg!(target_endian = "little") {
            out.reverse(); // now in host order
        }
        Ok(out)
    }

    fn u16(&self, offset: usize) -> Result<u16, String> {
        self.array(offset).map(u16::from_ne_bytes)
    }

    fn u32(&self, offset: usize) -> Result<u32, String> {
        self.array(offset).map(u32::from_ne_bytes)
    }

    fn u64(&self, offset: usize) -> Result<u64, String> {
        self.array(offset).map(u64::from_ne_bytes)
    }

    fn usize(&self, offset: usize) -> Result<usize, String> {
        usize::try_from(self.u64(offset)?).map_err(|_| "offset too large".to_string())
    }

    /// The NUL-terminated string at `offset` in string table `strtab`.
    fn str(&self, strtab: usize, offset: u32) -> Result<&'a str, String> {
        let s = self.section_at(strtab)?;
        let rest = self
            .bytes(s.offset, s.size)?
            .get(offset as usize..)
            .ok_or("bad string offset")?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or("unterminated string")?;
        std::str::from_utf8(&rest[..end]).map_err(|_| "string not UTF-8".to_string())
    }

    fn section_at(&self, index: usize) -> Result<Section, String> {
        self.sections
            .get(index)
            .copied()
            .ok_or_else(|| format!("no section {index}"))
    }

    /// Index and header of the section called `name`.
    fn section(&self, name: &str) -> Result<(usize, Section), String> {
        for (i, s) in self.sections.iter().enumerate() {
            if self.str(self.shstrndx, s.name)? == name {
                return Ok((i, *s));
            }
        }
        Err(format!("no section `{name}`"))
    }

    /// Name and value of symbol `index` of symbol table `symtab`.
    fn symbol(&self, symtab: usize, index: usize) -> Result<(&'a str, u64), String> {
        let s = self.section_at(symtab)?;
        let at = index
            .checked_mul(24)
            .filter(|&o| o + 24 <= s.size)
            .ok_or(format!("no symbol {index}"))?;
        let at = s.offset + at;
        Ok((self.str(s.link, self.u32(at)?)?, self.u64(at + 8)?))
    }

    fn license(&self) -> Result<CString, String> {
        let (_, s) = self.section("license")?;
        let text = self.bytes(s.offset, s.size)?;
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        CString::new(&text[..end]).map_err(|_| "bad license".to_string())
    }
}

/// Copies program section `section` and points each map reference (an `R_BPF_64_64`
/// relocation on a `ld_imm64`) at `map_fd(symbol name)`. Instructions keep the object's
/// byte order.
fn relocate(
    elf: &Elf,
    section: &str,
    map_fd: &dyn Fn(&str) -> Option<i32>,
) -> Result<Vec<u8>, String> {
    let (index, prog) = elf.section(section)?;
    let mut insns = elf.bytes(prog.offset, prog.size)?.to_vec();
    if insns.len() % 8 != 0 {
        return Err(format!("`{section}` is not a whole number of instructions"));
    }
    for rel in elf.sections.iter().filter(|s| s.info == index) {
        match rel.kind {
            SHT_REL => {}
            SHT_RELA => return Err(format!("RELA relocations in `{section}`")),
            _ => continue,
        }
        for i in 0..rel.size / 16 {
            let at = rel.offset + i * 16;
            let (offset, info) = (elf.usize(at)?, elf.u64(at + 8)?);
            let (name, _) = elf.symbol(rel.link, (info >> 32) as usize)?;
            if info as u32 != R_BPF_64_64 {
                return Err(format!("relocation type {} against `{name}`", info as u32));
            }
            let fd = map_fd(name).ok_or_else(|| format!("`{name}` is not a known map"))?;
            let insn = offset
                .checked_add(16)
                .and_then(|end| insns.get_mut(offset..end))
                .filter(|insn| insn[0] == BPF_LD_IMM64)
                .ok_or_else(|| format!("reference to `{name}` is not a ld_imm64"))?;
            let (dst, _) = regs(insn[1], elf.big);
            insn[1] = with_regs(dst, bpf::BPF_PSEUDO_MAP_FD, elf.big);
            let imm = if elf.big {
                fd.to_be_bytes()
            } else {
                fd.to_le_bytes()
            };
            insn[4..8].copy_from_slice(&imm); // low half: the map fd
            insn[12..16].fill(0); // high half of the 64-bit immediate
        }
    }
    Ok(insns)
}

/// `(dst_reg, src_reg)` of an instruction's register byte. `struct bpf_insn` declares
/// `dst_reg:4, src_reg:4`, and C bit-fields fill from the low bits on little-endian
/// targets, from the high bits on big-endian ones.
fn regs(byte: u8, big: bool) -> (u8, u8) {
    match big {
        false => (byte & 0xf, byte >> 4),
        true => (byte >> 4, byte & 0xf),
    }
}

fn with_regs(dst: u8, src: u8, big: bool) -> u8 {
    match big {
        false => src << 4 | dst,
        true => dst << 4 | src,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    static EL: &[u8] = include_bytes!("../bpf/ksocks.bpfel.o");
    static EB: &[u8] = include_bytes!("../bpf/ksocks.bpfeb.o");
    const FAKE_FDS: [(&str, i32); 3] = [("redirect", 100), ("hook", 101), ("counters", 102)];

    fn fake_fd(name: &str) -> Option<i32> {
        FAKE_FDS.iter().find(|(n, _)| *n == name).map(|(_, fd)| *fd)
    }

    /// (code, dst, src, off, imm) of each instruction.
    fn decode(insns: &[u8], big: bool) -> Vec<(u8, u8, u8, i16, i32)> {
        let off = |b: [u8; 2]| {
            if big {
                i16::from_be_bytes(b)
            } else {
                i16::from_le_bytes(b)
            }
        };
        let imm = |b: [u8; 4]| {
            if big {
                i32::from_be_bytes(b)
            } else {
                i32::from_le_bytes(b)
            }
        };
        insns
            .chunks(8)
            .map(|i| {
                let (dst, src) = regs(i[1], big);
                (
                    i[0],
                    dst,
                    src,
                    off([i[2], i[3]]),
                    imm([i[4], i[5], i[6], i[7]]),
                )
            })
            .collect()
    }

    /// Both committed objects parse, in their byte order, with the sections we need.
    #[test]
    fn parses_both_objects() {
        for (data, big) in [(EL, false), (EB, true)] {
            let elf = Elf::parse(data).unwrap();
            assert_eq!(elf.big, big);
            assert_eq!(elf.license().unwrap().to_str().unwrap(), "Dual MIT/GPL");
            for (section, ..) in PROGS {
                elf.section(section).unwrap();
            }
        }
        assert!(Elf::parse(&EL[..40]).is_err());
        assert!(Elf::parse(&EL[..EL.len() - 100]).is_err());
    }

    /// The C map definitions agree with the loader's `MAPS` table.
    #[test]
    fn map_definitions_match_the_loader() {
        for data in [EL, EB] {
            let elf = Elf::parse(data).unwrap();
            let (maps, sec) = elf.section("maps").unwrap();
            let (symtab, _) = elf.section(".symtab").unwrap();
            let mut found = 0;
            for i in 0..elf.section_at(symtab).unwrap().size / 24 {
                let (name, value) = elf.symbol(symtab, i).unwrap();
                let shndx = elf
                    .u16(elf.section_at(symtab).unwrap().offset + i * 24 + 6)
                    .unwrap();
                if usize::from(shndx) != maps {
                    continue;
                }
                let spec = MAPS
                    .iter()
                    .find(|m| m.name == name)
                    .expect("unknown map in object");
                let def = sec.offset + value as usize;
                let field = |n: usize| elf.u32(def + 4 * n).unwrap();
                assert_eq!(
                    (field(0), field(1), field(2)),
                    (spec.kind, spec.key_size, spec.value_size),
                    "{name}"
                );
                found += 1;
            }
            assert_eq!(found, MAPS.len());
        }
    }

    /// Relocation turns exactly the two map loads into BPF_PSEUDO_MAP_FD loads of the right
    /// fds, and decodes identically from the little- and big-endian objects.
    #[test]
    fn relocation_against_both_objects() {
        let mut decoded = Vec::new();
        for (data, big) in [(EL, false), (EB, true)] {
            let elf = Elf::parse(data).unwrap();
            let parser = relocate(&elf, PROGS[0].0, &fake_fd).unwrap();
            assert_eq!(
                parser,
                elf.bytes(elf.section(PROGS[0].0).unwrap().1.offset, parser.len())
                    .unwrap()
            );
            let verdict = decode(&relocate(&elf, PROGS[1].0, &fake_fd).unwrap(), big);
            // The first instruction saves the context: r7 = r1 (BPF_ALU64|BPF_MOV|BPF_X).
            assert_eq!(verdict[0], (0xbf, 7, 1, 0, 0));
            let loads: Vec<_> = verdict.iter().filter(|i| i.0 == BPF_LD_IMM64).collect();
            assert_eq!(loads.len(), 2);
            // bpf_sk_redirect_hash(skb, &redirect, ..) loads into r2, the lookup into r1.
            assert_eq!(*loads[0], (BPF_LD_IMM64, 2, bpf::BPF_PSEUDO_MAP_FD, 0, 100));
            assert_eq!(*loads[1], (BPF_LD_IMM64, 1, bpf::BPF_PSEUDO_MAP_FD, 0, 102));
            decoded.push((parser.len(), verdict));
        }
        assert_eq!(decoded[0], decoded[1]);
        let elf = Elf::parse(EL).unwrap();
        assert!(relocate(&elf, PROGS[1].0, &|_| None).is_err());
    }

    /// A verifier refusal prints as one line ending in the log's last lines; `{:#}` all.
    #[test]
    fn verifier_error_display() {
        let err = bpf::SyscallError {
            call: "BPF_PROG_LOAD",
            err: io::Error::from_raw_os_error(libc::EACCES),
        };
        let e = OffloadError::Verifier {
            prog: "ksocks_verdict",
            err,
            log: "0: (95) exit\nR0 !read_ok\nprocessed 1 insns\n\n".into(),
        };
        assert_eq!(
            e.to_string(),
            "bpf(BPF_PROG_LOAD): Permission denied (os error 13): verifier refused ksocks_verdict: R0 !read_ok / processed 1 insns"
        );
        assert!(format!("{e:#}").contains("0: (95) exit"));
    }

    /// The register nibbles swap with the byte order.
    #[test]
    fn register_nibbles() {
        assert_eq!(regs(0x17, false), (7, 1));
        assert_eq!(regs(0x71, true), (7, 1));
        for big in [false, true] {
            assert_eq!(regs(with_regs(3, 1, big), big), (3, 1));
        }
    }

    fn manifest() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    /// The committed objects were built from the current source: `bpf/ksocks.bpf.c.sha256`
    /// (written by scripts/bpf-objects) holds the source's sha256.
    #[test]
    fn committed_objects_match_source() {
        let recorded = std::fs::read_to_string(manifest().join("bpf/ksocks.bpf.c.sha256")).unwrap();
        let out = Command::new("sha256sum")
            .arg("bpf/ksocks.bpf.c")
            .current_dir(manifest())
            .output()
            .unwrap();
        let actual = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            recorded.split_whitespace().next(),
            actual.split_whitespace().next(),
            "bpf/ksocks.bpf.c changed: run scripts/bpf-objects and commit the objects"
        );
    }

    /// With the clang that built the committed objects, recompiling gives the same bytes
    /// (clang output is deterministic; other clang versions may differ, so they skip).
    #[test]
    fn committed_objects_rebuild_identically() {
        let recorded = std::fs::read_to_string(manifest().join("bpf/ksocks.bpf.c.sha256")).unwrap();
        let built_with = recorded
            .lines()
            .find_map(|l| l.strip_prefix("# built with: "))
            .unwrap();
        let clang = std::env::var("KSOCKS_CLANG").unwrap_or_else(|_| "clang".into());
        let version = match Command::new(&clang).arg("--version").output() {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                return eprintln!("skipped: {clang}: {e}")
            }
            Err(e) => panic!("{clang}: {e}"),
        };
        if version != built_with {
            return eprintln!("skipped: objects built with `{built_with}`, here `{version}`");
        }
        let dir = std::env::temp_dir().join(format!("ksocks-bpf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (target, committed) in [("bpfel", EL), ("bpfeb", EB)] {
            let out = dir.join(format!("{target}.o"));
            // Same command line as build.rs and scripts/bpf-objects.
            let status = Command::new(&clang)
                .current_dir(manifest().join("bpf"))
                .args(["-O2", "-g0", "-target", target, "-c", "ksocks.bpf.c", "-o"])
                .arg(&out)
                .status()
                .unwrap();
            assert!(status.success());
            assert!(
                std::fs::read(&out).unwrap() == committed,
                "{target} object is stale: run scripts/bpf-objects"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let native = if cfg!(target_endian = "big") { EB } else { EL };
        assert!(
            OBJECT == native,
            "embedded object differs from the committed one"
        );
    }

    /// Loads, or skips when not permitted (never under CI=true).
    fn load_or_skip(max: u32) -> Option<Offload> {
        match Offload::load(max) {
            Ok(o) => Some(o),
            Err(OffloadError::Syscall(ref e))
                if e.err.raw_os_error() == Some(libc::EPERM)
                    && std::env::var("CI").as_deref() != Ok("true") =>
            {
                eprintln!("skipped: {e} (run as root)");
                None
            }
            Err(e) => panic!("{e:#}"),
        }
    }

    /// A connected loopback pair (client, accepted).
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (client, listener.accept().unwrap().0)
    }

    /// The start-up probe passes on this kernel and leaves the maps empty.
    #[test]
    fn load_and_self_test() {
        let Some(offload) = load_or_skip(64) else {
            return;
        };
        offload.self_test().unwrap();
        assert_eq!(offload.entries(), 0);
        offload.self_test().unwrap(); // repeatable
    }

    /// pair/hook/unhook/unpair add and remove exactly their entries; errors keep errno.
    #[test]
    fn map_entry_round_trips() {
        let Some(offload) = load_or_skip(64) else {
            return;
        };
        let ((_c1, p1), (_c2, p2)) = (tcp_pair(), tcp_pair());
        let (k1, k2) = (
            socket::socket_cookie(p1.as_fd()).unwrap(),
            socket::socket_cookie(p2.as_fd()).unwrap(),
        );
        offload.pair(p1.as_fd(), k1, p2.as_fd(), k2).unwrap();
        assert_eq!(offload.entries(), 4);
        let again = offload.pair(p1.as_fd(), k1, p2.as_fd(), k2).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(
            offload.entries(),
            4,
            "a failed pair must not disturb the existing one"
        );
        offload.hook(p1.as_fd(), k1).unwrap();
        offload.hook(p2.as_fd(), k2).unwrap();
        assert_eq!(offload.entries(), 6);
        // 6.18 says EBUSY (the socket already has a verdict program) before EEXIST.
        let twice = offload.hook(p1.as_fd(), k1).unwrap_err().raw_os_error();
        assert!(
            matches!(twice, Some(libc::EBUSY | libc::EEXIST)),
            "{twice:?}"
        );
        offload.unhook(k1).unwrap();
        offload.unhook(k1).unwrap(); // absent is fine
        assert_eq!(offload.entries(), 5);
        offload.unpair(k1, k2);
        offload.unpair(k1, k2);
        assert_eq!(offload.entries(), 1, "p2 is still hooked");
        drop(p2); // the last close() removes a socket from every SOCKHASH
        assert_eq!(offload.entries(), 0);
    }

    /// The batch read of `counters` returns every paired socket, across several batches.
    #[test]
    fn counters_batch_read() {
        let Some(offload) = load_or_skip(2048) else {
            return;
        };
        crate::sys::raise_nofile().unwrap(); // 2,400 sockets
        let pairs: Vec<_> = (0..600).map(|_| (tcp_pair(), tcp_pair())).collect();
        let mut cookies = Vec::new();
        for ((_, p1), (_, p2)) in &pairs {
            let (k1, k2) = (
                socket::socket_cookie(p1.as_fd()).unwrap(),
                socket::socket_cookie(p2.as_fd()).unwrap(),
            );
            offload.pair(p1.as_fd(), k1, p2.as_fd(), k2).unwrap();
            cookies.extend([k1, k2]);
        }
        let mut seen = Vec::new();
        offload.read_counters(&mut seen, 512).unwrap();
        let mut keys: Vec<u64> = seen
            .iter()
            .map(|(k, v)| {
                assert_eq!(*v, 0);
                *k
            })
            .collect();
        keys.sort_unstable();
        cookies.sort_unstable();
        assert_eq!(
            keys, cookies,
            "1200 counters in three batches of at most 512"
        );
        for w in cookies.chunks(2) {
            offload.unpair(w[0], w[1]);
        }
        assert_eq!(offload.entries(), 0);
    }

    /// A pair that fails half way leaves nothing behind.
    #[test]
    fn failed_pair_is_undone() {
        let Some(offload) = load_or_skip(64) else {
            return;
        };
        let (_c1, p1) = tcp_pair();
        let k1 = socket::socket_cookie(p1.as_fd()).unwrap();
        let not_a_socket = std::fs::File::open("/dev/null").unwrap();
        assert!(offload
            .pair(p1.as_fd(), k1, not_a_socket.as_fd(), 1)
            .is_err());
        assert_eq!(offload.entries(), 0);
    }

    /// A full map refuses with E2BIG.
    #[test]
    fn full_map_says_e2big() {
        let Some(offload) = load_or_skip(2) else {
            return;
        };
        let ((_c1, p1), (_c2, p2)) = (tcp_pair(), tcp_pair());
        let ((_c3, p3), (_c4, p4)) = (tcp_pair(), tcp_pair());
        let k: Vec<u64> = [&p1, &p2, &p3, &p4]
            .iter()
            .map(|s| socket::socket_cookie(s.as_fd()).unwrap())
            .collect();
        offload.pair(p1.as_fd(), k[0], p2.as_fd(), k[1]).unwrap();
        let full = offload
            .pair(p3.as_fd(), k[2], p4.as_fd(), k[3])
            .unwrap_err();
        assert_eq!(full.raw_os_error(), Some(libc::E2BIG));
        offload.unpair(k[0], k[1]);
        assert_eq!(offload.entries(), 0);
    }

    /// Period of the bulk test's byte stream (not a power of two, so a misplaced skb shows).
    const PERIOD: usize = (1 << 20) + 7;

    /// Two copies of a pseudo-random block: stream byte `p` is `block[p % PERIOD]`, and any
    /// run of up to PERIOD bytes from position p is `block[p % PERIOD..][..len]`.
    fn block() -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut b: Vec<u8> = (0..PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        b.extend_from_within(..);
        b
    }

    /// Writes `total` stream bytes, then shuts down for writing.
    fn source(
        mut s: TcpStream,
        total: u64,
        block: std::sync::Arc<Vec<u8>>,
    ) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let mut pos = 0u64;
            while pos < total {
                let n = (total - pos).min(1 << 20) as usize;
                let start = (pos % PERIOD as u64) as usize;
                s.write_all(&block[start..start + n]).unwrap();
                pos += n as u64;
            }
            s.shutdown(Shutdown::Write).unwrap();
        })
    }

    /// Reads until EOF, checking every byte against its position in the stream.
    fn sink(mut s: TcpStream, block: std::sync::Arc<Vec<u8>>) -> thread::JoinHandle<u64> {
        thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = vec![0; 1 << 20];
            let mut pos = 0u64;
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    return pos;
                }
                let start = (pos % PERIOD as u64) as usize;
                assert!(
                    buf[..n] == block[start..start + n],
                    "wrong bytes at offset {pos}"
                );
                pos += n as u64;
            }
        })
    }

    /// Moves `up` bytes c1 -> c2 and `down` bytes c2 -> c1 at once through a hooked pair,
    /// passes both FINs by byte accounting, and returns the elapsed time.
    fn bulk(offload: &Offload, up: u64, down: u64) -> Duration {
        let ((c1, p1), (p2, c2)) = (tcp_pair(), tcp_pair()); // p2 connect()ed, like upstream
        let (k1, k2) = (
            socket::socket_cookie(p1.as_fd()).unwrap(),
            socket::socket_cookie(p2.as_fd()).unwrap(),
        );
        let (base1, base2) = (send_path(&p1).unwrap(), send_path(&p2).unwrap());
        offload.pair(p1.as_fd(), k1, p2.as_fd(), k2).unwrap();
        offload.hook(p1.as_fd(), k1).unwrap();
        offload.hook(p2.as_fd(), k2).unwrap();
        let block = std::sync::Arc::new(block());
        let start = Instant::now();
        let threads = [
            source(c1.try_clone().unwrap(), up, block.clone()),
            source(c2.try_clone().unwrap(), down, block.clone()),
        ];
        let (to_c2, to_c1) = (sink(c2, block.clone()), sink(c1, block));
        for t in threads {
            t.join().unwrap(); // each source wrote everything and sent its FIN
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        offload.pass_fin(&p1, k1, up, &p2, base2, deadline).unwrap();
        offload
            .pass_fin(&p2, k2, down, &p1, base1, deadline)
            .unwrap();
        assert_eq!(to_c2.join().unwrap(), up);
        assert_eq!(to_c1.join().unwrap(), down);
        let elapsed = start.elapsed();
        assert_eq!((offload.forwarded(k1), offload.forwarded(k2)), (up, down));
        offload.unhook(k1).unwrap();
        offload.unhook(k2).unwrap();
        offload.unpair(k1, k2);
        assert_eq!(offload.entries(), 0);
        elapsed
    }

    /// 64 MiB each way at once, every byte checked, both FINs passed on exactly.
    #[test]
    fn bulk_both_ways_is_exact() {
        let Some(offload) = load_or_skip(64) else {
            return;
        };
        bulk(&offload, 64 << 20, 64 << 20);
        bulk(&offload, 1, 0);
        bulk(&offload, 0, 3);
    }

    /// 1 GiB one way, every byte checked; prints the throughput. `cargo test --release --
    /// --ignored --nocapture one_gib`.
    #[test]
    #[ignore]
    fn one_gib() {
        let Some(offload) = load_or_skip(64) else {
            return;
        };
        let size = 1u64 << 30;
        let t = bulk(&offload, size, 0);
        eprintln!(
            "1 GiB in {:.3} s: {:.1} Gbit/s",
            t.as_secs_f64(),
            size as f64 * 8.0 / t.as_secs_f64() / 1e9
        );
    }

    /// Baseline for `one_gib`: the same harness over one plain loopback connection.
    #[test]
    #[ignore]
    fn one_gib_direct() {
        let (c, s) = tcp_pair();
        let block = std::sync::Arc::new(block());
        let start = Instant::now();
        let src = source(c, 1 << 30, block.clone());
        assert_eq!(sink(s, block).join().unwrap(), 1 << 30);
        src.join().unwrap();
        let t = start.elapsed();
        eprintln!(
            "direct: 1 GiB in {:.3} s: {:.1} Gbit/s",
            t.as_secs_f64(),
            8.0 * (1u64 << 30) as f64 / t.as_secs_f64() / 1e9
        );
    }
}
