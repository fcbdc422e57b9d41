//! The BPF loader, plane-independent: creates maps, relocates an embedded object's program
//! sections against them (`elf`) and loads the programs with raw `bpf()` commands
//! (`sys::bpf`). Each kernel data plane owns its object, its map table and what it attaches
//! where; this layer knows no plane.
//!
//! Objects follow one convention (bpf/*.bpf.c): maps are `struct map_def` symbols in section
//! `maps`, created by the plane from its own `MapSpec` table with the size it chooses (a unit
//! test per plane checks the table against the object); programs are named sections.
//!
//! Invariant: nothing is half-loaded. Maps and programs are `OwnedFd`s; an error drops
//! whatever was made before it, which the kernel then frees.

pub mod elf;

use crate::sys::bpf;
use std::fmt;
use std::os::fd::OwnedFd;

/// The programs in bpf/, each `bpf/<name>.bpf.c` with committed `<name>.bpfel.o` and
/// `<name>.bpfeb.o`. Must agree with build.rs and scripts/bpf-objects.
pub const PROGRAMS: [&str; 2] = ["ksocks", "tcsplice"];

/// Why a kernel data plane cannot be used.
#[derive(Debug)]
pub enum Error {
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
    /// Everything loaded, but the kernel did not behave as the plane needs.
    SelfTest(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Error::Object(why) => write!(f, "embedded BPF object: {why}"),
            Error::Unsupported(why) => f.write_str(why),
            Error::Syscall(e) => {
                let hint = match e.err.raw_os_error() {
                    Some(libc::EPERM) => " (needs CAP_BPF/CAP_NET_ADMIN)",
                    Some(libc::ENOSYS) => " (kernel built without CONFIG_BPF_SYSCALL)",
                    _ => "",
                };
                write!(f, "{e}{hint}")
            }
            Error::Verifier { prog, err, log } if f.alternate() => {
                write!(f, "{err}: verifier refused {prog}:\n{log}")
            }
            Error::Verifier { prog, err, log } => {
                // The reason is at the end of the log.
                let tail: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
                let tail = tail[tail.len().saturating_sub(2)..].join(" / ");
                write!(f, "{err}: verifier refused {prog}: {tail}")
            }
            Error::SelfTest(why) => write!(f, "self-test: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// A map an object refers to by symbol name; its size is chosen at load time.
pub struct MapSpec {
    pub name: &'static str,
    pub kind: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// `map_flags`, e.g. `BPF_F_NO_PREALLOC`.
    pub flags: u32,
}

/// Creates the map `spec` with room for `max_entries`, named `ksocks_<name>` in the kernel.
/// `unsupported` is the message for a kernel that does not know the map type (EINVAL).
pub fn create_map(
    spec: &MapSpec,
    max_entries: u32,
    unsupported: Option<&'static str>,
) -> Result<bpf::Map, Error> {
    let name = format!("ksocks_{}", spec.name);
    let create = || {
        bpf::Map::create_with_flags(
            spec.kind,
            spec.key_size,
            spec.value_size,
            max_entries,
            spec.flags,
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
    result.map_err(|e| match (e.err.raw_os_error(), unsupported) {
        (Some(libc::EINVAL), Some(why)) => Error::Unsupported(why),
        _ => Error::Syscall(e),
    })
}

/// An embedded object, parsed and checked against the target's byte order.
pub struct Object<'a> {
    elf: elf::Elf<'a>,
}

/// A program to load: its ELF section, its name in the kernel, and its types.
pub struct ProgSpec {
    pub section: &'static str,
    pub name: &'static str,
    pub prog_type: u32,
    pub expected_attach_type: u32,
}

impl<'a> Object<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Object<'a>, Error> {
        let elf = elf::Elf::parse(data).map_err(Error::Object)?;
        if elf.big != cfg!(target_endian = "big") {
            return Err(Error::Object("byte order differs from the target's".into()));
        }
        Ok(Object { elf })
    }

    /// Relocates `spec.section` against the maps `map_fd` names and loads it. A verifier
    /// refusal carries the verifier's log.
    pub fn load(
        &self,
        spec: &ProgSpec,
        map_fd: &dyn Fn(&str) -> Option<i32>,
    ) -> Result<OwnedFd, Error> {
        let license = self.elf.license().map_err(Error::Object)?;
        let insns = elf::relocate(&self.elf, spec.section, map_fd).map_err(Error::Object)?;
        bpf::prog_load(
            spec.prog_type,
            spec.expected_attach_type,
            &insns,
            &license,
            spec.name,
        )
        .map_err(|e| match e.log.is_empty() {
            true => Error::Syscall(e.err), // refused before the verifier ran
            false => Error::Verifier {
                prog: spec.name,
                err: e.err,
                log: e.log,
            },
        })
    }

    /// The object's map definitions: (symbol name, [type, key size, value size, flags]).
    pub fn map_defs(&self) -> Result<Vec<(&'a str, [u32; 4])>, String> {
        let elf = &self.elf;
        let (maps, sec) = elf.section("maps")?;
        let (symtab, tab) = elf.section(".symtab")?;
        let mut out = Vec::new();
        for i in 0..tab.size / 24 {
            let (name, value) = elf.symbol(symtab, i)?;
            if usize::from(elf.u16(tab.offset + i * 24 + 6)?) != maps {
                continue;
            }
            let def = sec.offset + value as usize;
            let field = |n: usize| elf.u32(def + 4 * n);
            out.push((name, [field(0)?, field(1)?, field(2)?, field(4)?]));
        }
        Ok(out)
    }
}

/// Checks a plane's map table against the definitions in its object (a unit test per plane).
pub fn check_map_table(object: &[u8], specs: &[MapSpec]) -> Result<(), String> {
    let elf = elf::Elf::parse(object)?;
    let defs = Object { elf }.map_defs()?;
    if defs.len() != specs.len() {
        return Err(format!(
            "{} maps in the object, {} in the table",
            defs.len(),
            specs.len()
        ));
    }
    for (name, def) in defs {
        let spec = specs
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| format!("map `{name}` is not in the table"))?;
        if def != [spec.kind, spec.key_size, spec.value_size, spec.flags] {
            return Err(format!("map `{name}`: object says {def:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::path::Path;
    use std::process::Command;

    /// A verifier refusal prints as one line ending in the log's last lines; `{:#}` all.
    #[test]
    fn verifier_error_display() {
        let err = bpf::SyscallError {
            call: "BPF_PROG_LOAD",
            err: io::Error::from_raw_os_error(libc::EACCES),
        };
        let e = Error::Verifier {
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

    fn manifest() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    fn committed(name: &str, e: &str) -> Vec<u8> {
        std::fs::read(manifest().join(format!("bpf/{name}.bpf{e}.o"))).unwrap()
    }

    /// The committed objects were built from the current sources: `bpf/<name>.bpf.c.sha256`
    /// (written by scripts/bpf-objects) holds each source's sha256.
    #[test]
    fn committed_objects_match_source() {
        for name in PROGRAMS {
            let recorded =
                std::fs::read_to_string(manifest().join(format!("bpf/{name}.bpf.c.sha256")))
                    .unwrap();
            let out = Command::new("sha256sum")
                .arg(format!("bpf/{name}.bpf.c"))
                .current_dir(manifest())
                .output()
                .unwrap();
            let actual = String::from_utf8(out.stdout).unwrap();
            assert_eq!(
                recorded.split_whitespace().next(),
                actual.split_whitespace().next(),
                "bpf/{name}.bpf.c changed: run scripts/bpf-objects and commit the objects"
            );
        }
    }

    /// With the clang that built the committed objects, recompiling gives the same bytes
    /// (clang output is deterministic; other clang versions may differ, so they skip), and
    /// the build embeds the committed object of the target's byte order.
    #[test]
    fn committed_objects_rebuild_identically() {
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
        let dir = std::env::temp_dir().join(format!("ksocks-bpf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in PROGRAMS {
            let recorded =
                std::fs::read_to_string(manifest().join(format!("bpf/{name}.bpf.c.sha256")))
                    .unwrap();
            let built_with = recorded
                .lines()
                .find_map(|l| l.strip_prefix("# built with: "))
                .unwrap();
            if version != built_with {
                eprintln!("skipped {name}: objects built with `{built_with}`, here `{version}`");
                continue;
            }
            for e in ["el", "eb"] {
                let out = dir.join(format!("{name}.{e}.o"));
                // Same command line as build.rs and scripts/bpf-objects.
                let status = Command::new(&clang)
                    .current_dir(manifest().join("bpf"))
                    .args(["-O2", "-g0", "-target", &format!("bpf{e}"), "-c"])
                    .arg(format!("{name}.bpf.c"))
                    .arg("-o")
                    .arg(&out)
                    .status()
                    .unwrap();
                assert!(status.success());
                assert!(
                    std::fs::read(&out).unwrap() == committed(name, e),
                    "{name} bpf{e} object is stale: run scripts/bpf-objects"
                );
            }
            let native = committed(
                name,
                if cfg!(target_endian = "big") {
                    "eb"
                } else {
                    "el"
                },
            );
            let embedded =
                std::fs::read(Path::new(env!("OUT_DIR")).join(format!("{name}.bpf.o"))).unwrap();
            assert!(
                embedded == native,
                "embedded {name} object differs from the committed one"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
