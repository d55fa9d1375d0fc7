//! Random sequences of operations against an in-memory model file system, compared after
//! every step (names, kinds, link counts, contents, and the error of each operation).

mod common;

use common::Cluster;
use frangipani::{Caller, FsError, RenameFlags, SetAttr, ROOT_INO};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

const ME: Caller = Caller { uid: 0, gid: 0 };

#[derive(Clone, Debug)]
enum Node {
    File(Vec<u8>),
    Dir(BTreeMap<String, u64>),
}

/// The model: nodes by id (0 is the root), with link counts.
struct Model {
    nodes: HashMap<u64, Node>,
    links: HashMap<u64, u32>,
    next: u64,
}

impl Model {
    fn new() -> Model {
        Model {
            nodes: HashMap::from([(0, Node::Dir(BTreeMap::new()))]),
            links: HashMap::from([(0, 2)]),
            next: 1,
        }
    }

    fn dir(&self, id: u64) -> Result<&BTreeMap<String, u64>, FsError> {
        match self.nodes.get(&id) {
            Some(Node::Dir(d)) => Ok(d),
            Some(_) => Err(FsError::NotDir),
            None => Err(FsError::NotFound),
        }
    }

    fn dir_mut(&mut self, id: u64) -> &mut BTreeMap<String, u64> {
        match self.nodes.get_mut(&id) {
            Some(Node::Dir(d)) => d,
            _ => unreachable!("checked"),
        }
    }

    fn lookup(&self, dir: u64, name: &str) -> Result<u64, FsError> {
        self.dir(dir)?.get(name).copied().ok_or(FsError::NotFound)
    }

    fn is_dir(&self, id: u64) -> bool {
        matches!(self.nodes.get(&id), Some(Node::Dir(_)))
    }

    fn add(&mut self, dir: u64, name: &str, node: Node) -> Result<u64, FsError> {
        if self.dir(dir)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        let id = self.next;
        self.next += 1;
        let is_dir = matches!(node, Node::Dir(_));
        self.nodes.insert(id, node);
        self.links.insert(id, if is_dir { 2 } else { 1 });
        if is_dir {
            *self.links.get_mut(&dir).unwrap() += 1;
        }
        self.dir_mut(dir).insert(name.to_string(), id);
        Ok(id)
    }

    fn unlink_id(&mut self, id: u64) {
        let l = self.links.get_mut(&id).unwrap();
        *l -= 1;
        if *l == 0 || self.is_dir(id) {
            self.nodes.remove(&id);
            self.links.remove(&id);
        }
    }

    fn remove(&mut self, dir: u64, name: &str, want_dir: bool) -> Result<(), FsError> {
        let id = self.lookup(dir, name)?;
        match (want_dir, self.is_dir(id)) {
            (true, false) => return Err(FsError::NotDir),
            (false, true) => return Err(FsError::IsDir),
            (true, true) if !self.dir(id)?.is_empty() => return Err(FsError::NotEmpty),
            _ => {}
        }
        self.dir_mut(dir).remove(name);
        if want_dir {
            *self.links.get_mut(&dir).unwrap() -= 1;
        }
        self.unlink_id(id);
        Ok(())
    }

    fn is_ancestor(&self, anc: u64, mut id: u64, parents: &HashMap<u64, u64>) -> bool {
        loop {
            if id == anc {
                return true;
            }
            match parents.get(&id) {
                Some(p) => id = *p,
                None => return false,
            }
        }
    }

    fn parents(&self) -> HashMap<u64, u64> {
        let mut out = HashMap::new();
        for (id, n) in &self.nodes {
            if let Node::Dir(d) = n {
                for c in d.values() {
                    if self.is_dir(*c) {
                        out.insert(*c, *id);
                    }
                }
            }
        }
        out
    }

    fn rename(&mut self, sd: u64, sn: &str, dd: u64, dn: &str) -> Result<(), FsError> {
        let src = self.lookup(sd, sn)?;
        self.dir(dd)?;
        let dst = self.dir(dd)?.get(dn).copied();
        if self.is_dir(src) && self.is_ancestor(src, dd, &self.parents()) {
            return Err(FsError::Invalid(String::new()));
        }
        if let Some(d) = dst {
            if d == src {
                return Ok(());
            }
            match (self.is_dir(src), self.is_dir(d)) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if !self.dir(d)?.is_empty() => return Err(FsError::NotEmpty),
                _ => {}
            }
        }
        self.dir_mut(sd).remove(sn);
        if self.is_dir(src) {
            *self.links.get_mut(&sd).unwrap() -= 1;
            *self.links.get_mut(&dd).unwrap() += 1;
        }
        if let Some(d) = dst {
            if self.is_dir(d) {
                *self.links.get_mut(&dd).unwrap() -= 1;
            }
            self.unlink_id(d);
        }
        self.dir_mut(dd).insert(dn.to_string(), src);
        Ok(())
    }
}

fn same_error(a: &Result<(), FsError>, b: &Result<(), FsError>) -> bool {
    match (a, b) {
        (Ok(()), Ok(())) => true,
        (Err(x), Err(y)) => x.errno() == y.errno(),
        _ => false,
    }
}

/// Compares the whole tree: names, kinds, link counts, contents.
fn compare(m: &Model, c: &common::Client, id: u64, ino: u64, path: &str) {
    let attr = c.fs.getattr(ino).unwrap();
    assert_eq!(attr.nlink, m.links[&id], "link count of {path}");
    match &m.nodes[&id] {
        Node::File(data) => {
            assert_eq!(attr.size, data.len() as u64, "size of {path}");
            assert!(c.fs.read(ino, 0, data.len() + 1).unwrap() == *data, "content of {path}");
        }
        Node::Dir(d) => {
            let listed: BTreeMap<String, u64> =
                c.fs.readdir(ino, 0, 100_000)
                    .unwrap()
                    .into_iter()
                    .filter(|e| e.name != b"." && e.name != b"..")
                    .map(|e| (String::from_utf8(e.name).unwrap(), e.ino))
                    .collect();
            assert_eq!(listed.keys().collect::<Vec<_>>(), d.keys().collect::<Vec<_>>(), "names in {path}/");
            for (name, child) in d {
                compare(m, c, *child, listed[name], &format!("{path}/{name}"));
            }
        }
    }
}

fn run(seed: u64, steps: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let cl = Cluster::new();
    let c = cl.client(1);
    let mut m = Model::new();
    // model id -> real inode
    let mut real: HashMap<u64, u64> = HashMap::from([(0, ROOT_INO)]);
    for step in 0..steps {
        let dirs: Vec<u64> =
            m.nodes.iter().filter(|(_, n)| matches!(n, Node::Dir(_))).map(|(id, _)| *id).collect();
        let mut dirs = dirs;
        dirs.sort();
        let d = dirs[rng.gen_range(0..dirs.len())];
        let d2 = dirs[rng.gen_range(0..dirs.len())];
        let name = format!("n{}", rng.gen_range(0..6));
        let name2 = format!("n{}", rng.gen_range(0..6));
        let (rd, rd2) = (real[&d], real[&d2]);
        let what;
        let (want, got): (Result<(), FsError>, Result<(), FsError>) = match rng.gen_range(0..9) {
            0 => {
                what = format!("create {d}/{name}");
                let w = m.add(d, &name, Node::File(Vec::new()));
                let g = c.fs.create(rd, name.as_bytes(), 0o644, 0, ME);
                if let (Ok(id), Ok(a)) = (&w, &g) {
                    real.insert(*id, a.ino);
                }
                (w.map(|_| ()), g.map(|_| ()))
            }
            1 => {
                what = format!("mkdir {d}/{name}");
                let w = m.add(d, &name, Node::Dir(BTreeMap::new()));
                let g = c.fs.mkdir(rd, name.as_bytes(), 0o755, ME);
                if let (Ok(id), Ok(a)) = (&w, &g) {
                    real.insert(*id, a.ino);
                }
                (w.map(|_| ()), g.map(|_| ()))
            }
            2 | 3 => {
                what = format!("write {d}/{name}");
                match m.lookup(d, &name) {
                    Ok(id) if !m.is_dir(id) => {
                        let off = rng.gen_range(0..150_000usize);
                        let data: Vec<u8> = (0..rng.gen_range(1..20_000)).map(|_| rng.gen()).collect();
                        if let Some(Node::File(f)) = m.nodes.get_mut(&id) {
                            if f.len() < off + data.len() {
                                f.resize(off + data.len(), 0);
                            }
                            f[off..off + data.len()].copy_from_slice(&data);
                        }
                        (Ok(()), c.fs.write(real[&id], off as u64, &data).map(|_| ()))
                    }
                    _ => continue,
                }
            }
            4 => {
                what = format!("truncate {d}/{name}");
                match m.lookup(d, &name) {
                    Ok(id) if !m.is_dir(id) => {
                        let size = rng.gen_range(0..120_000usize);
                        if let Some(Node::File(f)) = m.nodes.get_mut(&id) {
                            f.resize(size, 0);
                        }
                        let set = SetAttr { size: Some(size as u64), ..Default::default() };
                        (Ok(()), c.fs.setattr(real[&id], set).map(|_| ()))
                    }
                    _ => continue,
                }
            }
            5 => {
                what = format!("unlink {d}/{name}");
                (m.remove(d, &name, false), c.fs.unlink(rd, name.as_bytes()))
            }
            6 => {
                what = format!("rmdir {d}/{name}");
                (m.remove(d, &name, true), c.fs.rmdir(rd, name.as_bytes()))
            }
            7 => {
                what = format!("rename {d}/{name} -> {d2}/{name2}");
                (
                    m.rename(d, &name, d2, &name2),
                    c.fs.rename(rd, name.as_bytes(), rd2, name2.as_bytes(), RenameFlags::default()),
                )
            }
            _ => {
                what = format!("link {d}/{name} -> {d2}/{name2}");
                match m.lookup(d, &name) {
                    Ok(id) if !m.is_dir(id) => {
                        let w = if m.dir(d2).unwrap().contains_key(&name2) {
                            Err(FsError::Exists)
                        } else {
                            m.dir_mut(d2).insert(name2.clone(), id);
                            *m.links.get_mut(&id).unwrap() += 1;
                            Ok(())
                        };
                        (w, c.fs.link(real[&id], rd2, name2.as_bytes()).map(|_| ()))
                    }
                    _ => continue,
                }
            }
        };
        assert!(same_error(&want, &got), "seed {seed} step {step}: {what}: model {want:?}, fs {got:?}");
        compare(&m, &c, 0, ROOT_INO, "");
    }
    let report = c.fs.fsck(false).unwrap();
    assert!(report.is_clean(), "seed {seed}: {report}");
}

#[test]
fn random_operations_match_the_model() {
    let seeds: u64 = std::env::var("FRANGIPANI_MODEL_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    for seed in 0..seeds {
        run(seed, 150);
    }
}
