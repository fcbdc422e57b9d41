//! Parse, set up, run. Fatal errors print `error: ...` and exit non-zero.

use ksocks::accept;
use ksocks::cli::{self, Command, Config, ListenerKind};
use ksocks::event_loop::Server;
use ksocks::plane::Plane;
use ksocks::sys;
use ksocks::udp::Udp;
use ksocks::upstream::Upstream;
use ksocks::{error, info};
use std::os::fd::AsFd;
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
        let l = accept::bind_listener(kind, addr)
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
    let udp = Udp::bind(&cfg)?;
    for addr in udp.addrs() {
        error!("listening udp-tproxy {addr}");
    }
    if cfg.upstream != Upstream::Direct {
        error!("upstream: {}", cfg.upstream);
    }
    let plane = Plane::choose(&cfg)?;
    error!("data plane: {}", plane.name());
    for l in &listeners {
        plane
            .prepare_listener(l.fd.as_fd(), &l.addr)
            .map_err(|e| format!("listener {}: {e}", l.addr))?;
    }
    if let Some(name) = &cfg.user {
        let account = sys::lookup_user(name)
            .map_err(|e| format!("--user {name}: {e}"))?
            .ok_or_else(|| format!("--user {name}: no such user"))?;
        // SO_MARK on every upstream socket needs CAP_NET_ADMIN.
        let mark: &[u32] = match cfg.mark {
            Some(_) => &[sys::cap::NET_ADMIN],
            None => &[],
        };
        let mut keep = [plane.capabilities(), udp.capabilities(), mark].concat();
        keep.sort_unstable();
        keep.dedup();
        sys::drop_privileges(&account, &keep)
            .map_err(|e| format!("--user {name}: cannot drop privileges: {e}"))?;
        info!(
            "running as {name} (uid {}, gid {}), keeping capabilities {keep:?}",
            account.uid, account.gid
        );
    }
    let mut server = Server::new(cfg, listeners, plane, udp)
        .map_err(|e| format!("cannot start the event loop: {e}"))?;
    error!("ready");
    server.run().map_err(|e| format!("event loop: {e}"))?;
    info!("stopped");
    Ok(())
}
