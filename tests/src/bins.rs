//! The workspace's programs (`petal`, `lockserver`, `frangipani`, `gfs`), as built beside
//! the running test.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The packages whose programs the clusters run.
const PACKAGES: [&str; 4] = ["petal", "lockserver", "mount", "gfs"];

/// The path of program `name`, built beside this test executable (`target/<profile>/`).
///
/// Under `cargo test` the first call brings every program up to date with
/// `cargo build --profile test` (a no-op when `cargo test --workspace` built them
/// already), so a test of this package alone never runs a stale server.
pub fn bin(name: &str) -> PathBuf {
    let dir = dir();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's programs first (cargo build --bins)",
        path.display()
    );
    path
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("own executable");
        let mut dir = exe.parent().expect("executable directory").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        match std::env::var("CARGO") {
            Ok(cargo) if std::env::var_os("CLUSTER_TESTS_PREBUILT").is_none() => build(&cargo),
            _ => {}
        }
        dir
    })
}

fn build(cargo: &str) {
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "--profile", "test", "--bins"]);
    for p in PACKAGES {
        cmd.args(["-p", p]);
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build of the cluster programs failed");
}
