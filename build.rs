//! Builds the BPF programs: each `bpf/<name>.bpf.c` of `PROGRAMS` compiled by clang for the
//! target's byte order, or the committed object of that byte order when clang is absent.
//! The results, `$OUT_DIR/<name>.bpf.o`, are embedded by the modules that load them.
//! `KSOCKS_CLANG` names the compiler (default `clang`); `KSOCKS_CLANG=none` forces the
//! committed objects. Regenerate the committed objects with `scripts/bpf-objects`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

/// Must agree with `bpf::PROGRAMS` (src/bpf/mod.rs) and scripts/bpf-objects.
const PROGRAMS: [&str; 2] = ["ksocks", "tcsplice"];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let suffix = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "eb",
        _ => "el",
    };
    println!("cargo:rerun-if-env-changed=KSOCKS_CLANG");
    let clang = env::var("KSOCKS_CLANG").unwrap_or_else(|_| "clang".into());
    for name in PROGRAMS {
        build(&manifest.join("bpf"), &out_dir, name, suffix, &clang);
    }
}

fn build(bpf_dir: &Path, out_dir: &Path, name: &str, suffix: &str, clang: &str) {
    let source = format!("{name}.bpf.c");
    let out = out_dir.join(format!("{name}.bpf.o"));
    let committed = bpf_dir.join(format!("{name}.bpf{suffix}.o"));
    println!("cargo:rerun-if-changed=bpf/{source}");
    println!("cargo:rerun-if-changed={}", committed.display());
    if clang != "none" {
        // Same command line as scripts/bpf-objects, run in bpf/, so that the output is
        // byte-identical to the committed object when the clang version is the same.
        let target = format!("bpf{suffix}");
        let run = Command::new(clang)
            .current_dir(bpf_dir)
            .args(["-O2", "-g0", "-target", &target, "-c", &source, "-o"])
            .arg(&out)
            .output();
        match run {
            Ok(o) if o.status.success() => return,
            Ok(o) => panic!(
                "{clang} failed to compile bpf/{source} (set KSOCKS_CLANG=none to use {}):\n{}",
                committed.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => println!(
                "cargo:warning={clang} not runnable ({e}): using committed {}",
                committed.display()
            ),
        }
    }
    fs::copy(&committed, &out)
        .unwrap_or_else(|e| panic!("copy {} to OUT_DIR: {e}", committed.display()));
}
