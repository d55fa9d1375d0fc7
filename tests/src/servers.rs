//! A Raft group of server processes (`petal serve`, `lockserver serve`, `raft-kv serve`),
//! each killed, frozen and restarted by its own pid, on 127.0.0.1 or each on a simulated
//! host of its own.

use crate::process::{free_addrs, Proc};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One group: ids 1..=n on 127.0.0.1 ports the OS picked.
pub struct Group {
    /// The command that starts member `id` (the program, on its host).
    launch: Box<dyn Fn(u64) -> Command>,
    /// What the processes are called in logs and tables ("petal", "locks").
    kind: String,
    /// Each member's listen address.
    pub addrs: BTreeMap<u64, String>,
    /// Flags every member gets after `serve --id --peers --data`.
    extra: Vec<String>,
    dir: PathBuf,
    procs: BTreeMap<u64, Option<Proc>>,
    starts: u64,
}

impl Group {
    /// A group of `n` members of `program` with data and logs under `dir`; none started.
    pub fn new(program: PathBuf, kind: &str, n: u64, extra: Vec<String>, dir: &Path) -> Group {
        let addrs = (1..=n).zip(free_addrs(n as usize)).collect();
        Group::launched(Box::new(move |_| Command::new(&program)), kind, addrs, extra, dir)
    }

    /// A group whose member `id` listens at `addrs[id]` and is started by `launch(id)`
    /// (e.g. inside a network namespace); none started.
    pub fn launched(
        launch: Box<dyn Fn(u64) -> Command>,
        kind: &str,
        addrs: BTreeMap<u64, String>,
        extra: Vec<String>,
        dir: &Path,
    ) -> Group {
        Group {
            launch,
            kind: kind.into(),
            addrs,
            extra,
            dir: dir.to_path_buf(),
            procs: BTreeMap::new(),
            starts: 0,
        }
    }

    /// ID=HOST:PORT,... as the programs take it.
    pub fn cluster_arg(&self) -> String {
        format_cluster(&self.addrs)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.addrs.keys().copied().collect()
    }

    /// Member `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{}{id}", self.kind))
    }

    /// Starts every member that is not running.
    pub fn start_all(&mut self) {
        for id in self.ids() {
            if !self.running(id) {
                self.start(id);
            }
        }
    }

    /// Starts member `id` (again).
    pub fn start(&mut self, id: u64) {
        self.starts += 1;
        let mut cmd = (self.launch)(id);
        cmd.args(["serve", "--id", &id.to_string(), "--peers", &self.cluster_arg(), "--data"])
            .arg(self.data_dir(id))
            .args(&self.extra)
            .env("RUST_LOG", "info");
        let log = self.dir.join(format!("{}{id}.{}.log", self.kind, self.starts));
        let name = format!("{}{id}", self.kind);
        self.procs.insert(id, Some(Proc::spawn(name, cmd, &log)));
    }

    pub fn running(&self, id: u64) -> bool {
        self.procs.get(&id).is_some_and(|p| p.is_some())
    }

    /// SIGKILL.
    pub fn kill(&mut self, id: u64) {
        self.procs.insert(id, None);
    }

    /// SIGKILL every member at once.
    pub fn kill_all(&mut self) {
        for p in self.procs.values().flatten() {
            p.signal(libc::SIGKILL);
        }
        self.procs.clear();
    }

    /// The process of member `id`, if running.
    pub fn process(&mut self, id: u64) -> Option<&mut Proc> {
        self.procs.get_mut(&id).and_then(|p| p.as_mut())
    }
}

/// ID=HOST:PORT,...
pub fn format_cluster(addrs: &BTreeMap<u64, String>) -> String {
    addrs.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",")
}
