//! Crash at random points: client A runs a random metadata workload and stops at a random
//! disk write (keeping only what reached the disk); client B recovers A's log; fsck is
//! clean and everything A synced before the crash is there.
//! `FRANGIPANI_CRASH_POINTS` sets how many crash points (default 200).

mod common;

use common::Cluster;
use frangipani::{Caller, FsError, RenameFlags, ROOT_INO};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

const ME: Caller = Caller { uid: 0, gid: 0 };

/// What A believes the tree holds: path -> file content (directories: None).
type Tree = BTreeMap<String, Option<Vec<u8>>>;

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn resolve(c: &common::Client, path: &str) -> Result<u64, FsError> {
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = c.fs.lookup(ino, part.as_bytes())?.ino;
    }
    Ok(ino)
}

/// One random operation on A, mirrored in `tree`; Err when A's disk is cut.
fn step(
    rng: &mut SmallRng,
    a: &common::Client,
    tree: &mut Tree,
    touched: &mut BTreeSet<String>,
) -> Result<(), FsError> {
    let r = step_inner(rng, a, tree, touched);
    if std::env::var_os("CRASH_DEBUG").is_some() {
        eprintln!("step -> {r:?}; touched {touched:?}");
    }
    r
}

fn step_inner(
    rng: &mut SmallRng,
    a: &common::Client,
    tree: &mut Tree,
    touched: &mut BTreeSet<String>,
) -> Result<(), FsError> {
    let dirs: Vec<String> = std::iter::once(String::new())
        .chain(tree.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| k.clone()))
        .collect();
    let files: Vec<String> = tree.iter().filter(|(_, v)| v.is_some()).map(|(k, _)| k.clone()).collect();
    let dir = dirs[rng.gen_range(0..dirs.len())].clone();
    let name = format!("n{}", rng.gen_range(0..12));
    let path = if dir.is_empty() { name.clone() } else { format!("{dir}/{name}") };
    match rng.gen_range(0..10) {
        0 | 1 if !tree.contains_key(&path) => {
            // An operation cut short by the crash may still have happened: mark what it
            // touches first.
            touched.insert(path.clone());
            let parent = resolve(a, &dir)?;
            let f = a.fs.create(parent, name.as_bytes(), 0o644, 0, ME)?.ino;
            let data: Vec<u8> = (0..rng.gen_range(0..9000)).map(|_| rng.gen()).collect();
            a.fs.write(f, 0, &data)?;
            tree.insert(path.clone(), Some(data));
            touched.insert(path);
        }
        2 if !tree.contains_key(&path) && path.matches('/').count() < 3 => {
            touched.insert(path.clone());
            let parent = resolve(a, &dir)?;
            a.fs.mkdir(parent, name.as_bytes(), 0o755, ME)?;
            tree.insert(path.clone(), None);
            touched.insert(path);
        }
        3 if !files.is_empty() => {
            let p = files[rng.gen_range(0..files.len())].clone();
            touched.insert(p.clone());
            let (d, n) = split(&p);
            a.fs.unlink(resolve(a, d)?, n.as_bytes())?;
            tree.remove(&p);
            touched.insert(p);
        }
        4 if !files.is_empty() => {
            // Rename a file to a new name in some directory.
            let p = files[rng.gen_range(0..files.len())].clone();
            if tree.contains_key(&path) {
                return Ok(());
            }
            touched.insert(p.clone());
            touched.insert(path.clone());
            let (d, n) = split(&p);
            a.fs.rename(
                resolve(a, d)?,
                n.as_bytes(),
                resolve(a, &dir)?,
                name.as_bytes(),
                RenameFlags::default(),
            )?;
            let data = tree.remove(&p).unwrap();
            tree.insert(path.clone(), data);
            touched.insert(p);
            touched.insert(path);
        }
        5 if !files.is_empty() => {
            let p = files[rng.gen_range(0..files.len())].clone();
            touched.insert(p.clone());
            let f = resolve(a, &p)?;
            let off = rng.gen_range(0..100_000u64);
            let data: Vec<u8> = (0..rng.gen_range(1..5000)).map(|_| rng.gen()).collect();
            if std::env::var_os("CRASH_DEBUG").is_some() {
                eprintln!("write {p} at {off} len {}", data.len());
            }
            a.fs.write(f, off, &data)?;
            let content = tree.get_mut(&p).unwrap().as_mut().unwrap();
            if content.len() < off as usize + data.len() {
                content.resize(off as usize + data.len(), 0);
            }
            content[off as usize..off as usize + data.len()].copy_from_slice(&data);
            touched.insert(p);
        }
        6 => {
            // An empty directory goes away.
            let empty: Vec<String> = dirs
                .iter()
                .filter(|d| !d.is_empty() && !tree.keys().any(|k| k.starts_with(&format!("{d}/"))))
                .cloned()
                .collect();
            if let Some(d) = empty.first() {
                touched.insert(d.clone());
                let (parent, n) = split(d);
                a.fs.rmdir(resolve(a, parent)?, n.as_bytes())?;
                tree.remove(d);
                touched.insert(d.clone());
            }
        }
        _ => {}
    }
    Ok(())
}

fn crash_point(seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let cl = Cluster::new();
    let a = cl.client(1);
    let mut tree = Tree::new();
    let mut touched = BTreeSet::new();
    // Warm up with the disk intact, sync, then cut A off after a random number of writes.
    let warmup = rng.gen_range(0..30);
    let mut ops = 0;
    for _ in 0..warmup {
        step(&mut rng, &a, &mut tree, &mut touched).unwrap();
        ops += 1;
    }
    a.fs.sync().unwrap();
    let mut synced = tree.clone();
    touched.clear();
    a.disk.budget.store(rng.gen_range(0..120), Ordering::SeqCst);
    'work: for _ in 0..200 {
        for _ in 0..rng.gen_range(1..6) {
            if step(&mut rng, &a, &mut tree, &mut touched).is_err() {
                break 'work;
            }
            ops += 1;
        }
        if a.fs.sync().is_err() {
            break;
        }
        synced = tree.clone();
        touched.clear();
    }
    // A is gone: only what reached the disk is left. B recovers A's log.
    cl.locks.crash(&a.locks);
    let params = a.fs.params().clone();
    let a_id = a.locks.id();
    a.fs.crash();
    frangipani::recovery::recover_slot(cl.disk.as_ref(), &params, 1, None).unwrap();
    cl.locks.free_dead(a_id);
    let b = cl.client(2);
    let report = b.fs.fsck(false).unwrap();
    assert!(report.is_clean(), "seed {seed} after {ops} ops: fsck\n{report}");
    for (path, content) in &synced {
        if touched.contains(path) || touched.iter().any(|t| path.starts_with(&format!("{t}/"))) {
            continue;
        }
        let ino = resolve(&b, path).unwrap_or_else(|e| panic!("seed {seed}: synced {path} lost: {e}"));
        if let Some(data) = content {
            let got = b.fs.read(ino, 0, data.len() + 10).unwrap();
            let diff = got.iter().zip(data.iter()).position(|(x, y)| x != y);
            assert!(
                got == *data,
                "seed {seed}: synced {path} has other content: len {} vs {}, first difference at {diff:?}: {:?} vs {:?}, zeros: {}",
                got.len(),
                data.len(),
                &got[..8.min(got.len())],
                &data[..8.min(data.len())],
                got.iter().all(|b| *b == 0)
            );
        }
    }
}

#[test]
fn crash_at_random_points_then_recover() {
    let points: u64 =
        std::env::var("FRANGIPANI_CRASH_POINTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let only: Option<u64> = std::env::var("CRASH_SEED").ok().and_then(|v| v.parse().ok());
    for seed in 0..points {
        if only.is_some_and(|o| o != seed) {
            continue;
        }
        crash_point(seed);
    }
    eprintln!("{points} crash points recovered, fsck clean, synced data intact");
}
