//! Running the OpenWrt init script off a router: a scratch router directory (UCI config,
//! run directory, /etc/init.d/ksocks), `sh rc.common ksocks ACTION` against the stand-ins in
//! packaging/openwrt/test/shim, and the record they leave: what procd would be given for each
//! instance, and what was logged. Also the init script's option table, parsed.
//!
//! Invariant: a run without a namespace touches nothing outside its directory (the recording
//! `ip`, `nft` and `fw4` run the real ones only with SHIM_REAL=1, set only for runs inside a
//! test namespace).
use crate::common::peers::TempDir;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

pub const OPENWRT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/openwrt");

pub fn init_script() -> String {
    format!("{OPENWRT}/net/ksocks/files/ksocks.init")
}

/// True when the stand-ins can run (they need `sh` and `python3`).
pub fn require_shim() -> bool {
    crate::common::peers::require_tools(&["sh", "python3"])
}

/// The option table of the init script: (UCI option, validate_data type, ksocks flag, how).
/// With `future`, the commented lines for flags ksocks does not have yet.
pub fn option_table(future: bool) -> Vec<[String; 4]> {
    let text = std::fs::read_to_string(init_script()).expect("read ksocks.init");
    let body = text
        .split("options() {\n\tcat <<'EOF'\n")
        .nth(1)
        .expect("ksocks.init has options() with a heredoc");
    let (table, rest) = body.split_once("\nEOF\n").expect("options() heredoc ends");
    let commented = rest.split("\n}\n").next().unwrap_or("");
    let mut lines: Vec<&str> = table.lines().collect();
    if future {
        lines = commented
            .lines()
            .filter_map(|l| l.trim().strip_prefix("# "))
            .filter(|l| l.split_whitespace().count() == 4)
            .collect();
    }
    lines
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "option table line needs 4 columns: {l}");
            // type[:default], split where validate_data splits: at a ':' not after '\\'.
            let b = f[1].as_bytes();
            let end = (0..b.len())
                .find(|&i| b[i] == b':' && (i == 0 || b[i - 1] != b'\\'))
                .unwrap_or(b.len());
            let ty = f[1][..end].to_string();
            [f[0].into(), ty, f[2].into(), f[3].into()]
        })
        .collect()
}

/// One service run's record: `KEY\tVALUE` lines in the order the script produced them.
#[derive(Debug, Default)]
pub struct Record {
    pub lines: Vec<(String, String)>,
}

/// What procd would get for one instance: each parameter's values in order.
#[derive(Debug, Default, Clone)]
pub struct Instance {
    pub params: BTreeMap<String, Vec<String>>,
}

impl Instance {
    pub fn command(&self) -> &[String] {
        self.params.get("command").map_or(&[], |v| v.as_slice())
    }
    pub fn param(&self, name: &str) -> Vec<&str> {
        self.params
            .get(name)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

impl Record {
    pub fn values(&self, key: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn instances(&self) -> BTreeMap<String, Instance> {
        let mut all = BTreeMap::new();
        let mut cur: Option<(String, Instance)> = None;
        for (k, v) in &self.lines {
            if k == "instance" {
                cur = Some((v.clone(), Instance::default()));
            } else if k == "close_instance" {
                let (name, inst) = cur.take().expect("close_instance without instance");
                all.insert(name, inst);
            } else if let (Some(p), Some((_, inst))) = (k.strip_prefix("param "), cur.as_mut()) {
                let vals = inst.params.entry(p.to_string()).or_default();
                if !v.is_empty() {
                    vals.push(v.clone());
                }
            }
        }
        all
    }

    /// Everything that was logged (logger lines and validate_data's diagnostics).
    pub fn log(&self) -> String {
        self.lines
            .iter()
            .filter(|(k, _)| k == "logger" || k == "validate_log")
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect()
    }
}

/// A scratch router: /etc/config (UCI_CONFIG_DIR), /var/run/ksocks (KSOCKS_RUNDIR) and
/// /etc/init.d/ksocks in a temporary directory.
pub struct Router {
    pub dir: TempDir,
}

impl Router {
    pub fn new(config: &str) -> Router {
        let dir = TempDir::new("openwrt");
        std::fs::create_dir_all(dir.0.join("config")).unwrap();
        std::fs::create_dir_all(dir.0.join("init.d")).unwrap();
        std::fs::copy(init_script(), dir.0.join("init.d/ksocks")).unwrap();
        let r = Router { dir };
        r.set_config(config);
        r
    }

    pub fn set_config(&self, config: &str) {
        std::fs::write(self.dir.0.join("config/ksocks"), config).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.0.join(rel)
    }

    /// The fw4 include the script wrote, if any.
    pub fn fw_include(&self) -> Option<String> {
        std::fs::read_to_string(self.path("run/fw4.nft")).ok()
    }

    /// `/etc/init.d/ksocks ACTION`, recorded; in namespace `ns` with the real ip, nft and a
    /// fw4 that loads packaging/openwrt/test/fw4-skeleton.nft, when given.
    pub fn run(&self, action: &str, ns: Option<&str>) -> Record {
        let out = self.path("record");
        let _ = std::fs::remove_file(&out);
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "sh"]);
                c.env("SHIM_REAL", "1")
                    .env(
                        "SHIM_FW4_SKELETON",
                        format!("{OPENWRT}/test/fw4-skeleton.nft"),
                    )
                    .env("SHIM_FW4_INCLUDE", self.path("run/fw4.nft"));
                c
            }
            None => {
                let mut c = Command::new("sh");
                c.env_remove("SHIM_REAL");
                c
            }
        };
        cmd.arg(format!("{OPENWRT}/test/shim/rc.common"))
            .arg(self.path("init.d/ksocks"))
            .arg(action)
            .env("SHIM_OUT", &out)
            .env("UCI_CONFIG_DIR", self.path("config"))
            .env("KSOCKS_RUNDIR", self.path("run"));
        let res = cmd.output().expect("run the init script");
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        assert!(
            res.status.success(),
            "init script {action} failed: {}\n{}\nrecord:\n{text}",
            res.status,
            String::from_utf8_lossy(&res.stderr)
        );
        let lines = text
            .lines()
            .map(|l| match l.split_once('\t') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (l.to_string(), String::new()),
            })
            .collect();
        Record { lines }
    }
}
