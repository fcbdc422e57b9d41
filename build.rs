//! Builds the sockmap programs: `bpf/ksocks.bpf.c` compiled by clang for the target's
//! byte order, or the committed object of that byte order when clang is absent.
//! The result, `$OUT_DIR/ksocks.bpf.o`, is embedded by `src/offload.rs`.
//! `KSOCKS_CLANG` names the compiler (default `clang`); `KSOCKS_CLANG=none` forces the
//! committed object. Regenerate the committed objects with `scripts/bpf-objects`.

use std::path::PathBuf;
use std::process::Command;
use std::{env, fs};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let bpf_dir = manifest.join("bpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("ksocks.bpf.o");
    let suffix = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "eb",
        _ => "el",
    };
    let committed = bpf_dir.join(format!("ksocks.bpf{suffix}.o"));
    println!("cargo:rerun-if-changed=bpf/ksocks.bpf.c");
    println!("cargo:rerun-if-changed={}", committed.display());
    println!("cargo:rerun-if-env-changed=KSOCKS_CLANG");

    let clang = env::var("KSOCKS_CLANG").unwrap_or_else(|_| "clang".into());
    if clang != "none" {
        // Same command line as scripts/bpf-objects, run in bpf/, so that the output is
        // byte-identical to the committed object when the clang version is the same.
        let target = format!("bpf{suffix}");
        let run = Command::new(&clang)
            .current_dir(&bpf_dir)
            .args(["-O2", "-g0", "-target", &target, "-c", "ksocks.bpf.c", "-o"])
            .arg(&out)
            .output();
        match run {
            Ok(o) if o.status.success() => return,
            Ok(o) => panic!(
                "{clang} failed to compile bpf/ksocks.bpf.c (set KSOCKS_CLANG=none to use {}):\n{}",
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
