//! Parse, set up, run. Fatal errors print `error: ...` and exit non-zero.

use ksocks::cli::{self, Command, Config, Dataplane, ListenerKind};
use ksocks::event_loop::{self, Plane, Server};
use ksocks::offload::Offload;
use ksocks::sys;
use ksocks::upstream::Upstream;
use ksocks::{error, info};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cfg = match cli::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(cfg)) => cfg,
        Ok(Command::Help) => {
            print!("{}", cli::HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("ksocks {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: Config) -> Result<(), String> {
    ksocks::log::set_level(cfg.verbosity);
    sys::ignore_sigpipe();
    match sys::raise_nofile() {
        Ok(n) => info!("file descriptor limit: {n}"),
        Err(e) => error!("cannot raise the file descriptor limit: {e}"),
    }
    let mut listeners = Vec::new();
    for &(kind, addr) in &cfg.listeners {
        let l = event_loop::bind_listener(kind, addr)
            .map_err(|e| format!("cannot listen ({kind}) on {addr}: {e}"))?;
        error!("listening {kind} {}", l.addr);
        if kind == ListenerKind::Socks && cfg.socks_auth.is_empty() && !l.addr.ip().is_loopback() {
            error!(
                "warning: the SOCKS5 server on {} asks for no password (give --socks-auth)",
                l.addr
            );
        }
        listeners.push(l);
    }
    if cfg.upstream != Upstream::Direct {
        error!("upstream: {}", cfg.upstream);
    }
    let plane = choose_plane(&cfg)?;
    if let Some(name) = &cfg.user {
        let account = sys::lookup_user(name)
            .map_err(|e| format!("--user {name}: {e}"))?
            .ok_or_else(|| format!("--user {name}: no such user"))?;
        sys::drop_privileges(&account)
            .map_err(|e| format!("--user {name}: cannot drop privileges: {e}"))?;
        info!(
            "running as {name} (uid {}, gid {})",
            account.uid, account.gid
        );
    }
    let mut server = Server::new(cfg, listeners, plane)
        .map_err(|e| format!("cannot start the event loop: {e}"))?;
    error!("ready");
    server.run().map_err(|e| format!("event loop: {e}"))?;
    info!("stopped");
    Ok(())
}

/// Picks the data plane. `auto` tries sockmap (loaded and self-tested), then splice, then
/// copy, and says why it fell back; an explicit `sockmap` that fails is fatal.
fn choose_plane(cfg: &Config) -> Result<Plane, String> {
    let sockmap = || -> Result<Offload, String> {
        let max_sockets = u32::try_from(cfg.max_conns * 2).unwrap_or(u32::MAX);
        let off = Offload::load(max_sockets).map_err(|e| e.to_string())?;
        off.self_test()
            .map_err(|e| format!("self-test failed: {e}"))?;
        Ok(off)
    };
    let plane = match cfg.dataplane {
        Dataplane::Copy => Plane::Copy,
        Dataplane::Splice => Plane::Splice,
        Dataplane::Sockmap => Plane::Sockmap(
            sockmap().map_err(|why| format!("sockmap data plane unavailable: {why}"))?,
        ),
        // Measured (README, bench/): on this kind of machine splice moved bulk data faster
        // than sockmap at the same latency and whole-system CPU, with exact backpressure of
        // its own; sockmap's one advantage was near-zero CPU in the proxy process. So `auto`
        // is splice, and sockmap is there for whoever wants the kernel to do all of it.
        // splice(2) exists on every kernel a router runs; a socket it refuses is copied.
        Dataplane::Auto => Plane::Splice,
    };
    let name = match plane {
        Plane::Copy => "copy",
        Plane::Splice => "splice",
        Plane::Sockmap(_) => "sockmap",
    };
    error!("data plane: {name}");
    Ok(plane)
}
