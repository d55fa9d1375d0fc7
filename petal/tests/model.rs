//! The state machine and its block store against a plain in-memory model: random writes,
//! decommits, reads, snapshots and deletes at random offsets (unaligned, crossing 64 KiB
//! extents, near 2^64), with persists and crashes in between. A crash drops everything
//! in memory and replays the commands after the last persisted index over the files as
//! they are, as a restarted replica does.

use petal::machine::{Command, ExtentSource, Op, PetalMachine};
use petal::store::{ExtentContent, Store, BLOCK_BYTES};
use petal::PetalError;
use proptest::prelude::*;
use raft::StateMachine;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// The model: per disk, the non-zero 4 KiB blocks.
#[derive(Clone, Debug, Default)]
struct Model {
    disks: BTreeMap<String, (bool, BTreeMap<u64, Vec<u8>>)>,
}

impl Model {
    fn write(&mut self, disk: &str, offset: u64, data: &[u8]) {
        let blocks = &mut self.disks.get_mut(disk).unwrap().1;
        for (i, byte) in data.iter().enumerate() {
            let pos = offset + i as u64;
            let b = blocks.entry(pos / BLOCK_BYTES as u64).or_insert_with(|| vec![0; BLOCK_BYTES]);
            b[(pos % BLOCK_BYTES as u64) as usize] = *byte;
        }
    }

    fn decommit(&mut self, disk: &str, offset: u64, len: u64) {
        let blocks = &mut self.disks.get_mut(disk).unwrap().1;
        let end = offset as u128 + len as u128;
        let first = offset / BLOCK_BYTES as u64;
        let keys: Vec<u64> = blocks.range(first..).map(|(k, _)| *k).collect();
        for k in keys {
            let start = k as u128 * BLOCK_BYTES as u128;
            if start >= end {
                break;
            }
            let b = blocks.get_mut(&k).unwrap();
            for (i, byte) in b.iter_mut().enumerate() {
                let pos = start + i as u128;
                if pos >= offset as u128 && pos < end {
                    *byte = 0;
                }
            }
        }
    }

    fn read(&self, disk: &str, offset: u64, len: u64) -> Vec<u8> {
        let blocks = &self.disks[disk].1;
        (0..len)
            .map(|i| {
                let pos = offset + i;
                blocks.get(&(pos / BLOCK_BYTES as u64)).map_or(0, |b| b[(pos % BLOCK_BYTES as u64) as usize])
            })
            .collect()
    }
}

/// No peers: the model test never installs a snapshot from elsewhere.
struct NoPeers;

impl ExtentSource for NoPeers {
    fn fetch(&self, _: u64, _: &[(String, u64)]) -> Result<Vec<Option<ExtentContent>>, String> {
        Err("no peers in this test".into())
    }
}

#[derive(Clone, Debug)]
enum Action {
    Write { disk: usize, offset: u64, len: u64, byte: u8 },
    Decommit { disk: usize, offset: u64, len: u64 },
    Read { disk: usize, offset: u64, len: u64 },
    Snapshot { disk: usize },
    DeleteSnapshot,
    Persist,
    Crash,
}

const EXTENT: u64 = 64 * 1024;

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..300_000,
        (0u64..8, 0u64..200).prop_map(|(e, d)| (e * EXTENT + d).saturating_sub(100)),
        (0u64..300_000).prop_map(|d| u64::MAX - d),
        any::<u64>(),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    let disk = 0usize..2;
    let len = prop_oneof![1u64..100, 1u64..5000, 4096u64..140_000];
    prop_oneof![
        6 => (disk.clone(), offset(), len.clone(), any::<u8>())
            .prop_map(|(disk, offset, len, byte)| Action::Write { disk, offset, len, byte }),
        2 => (disk.clone(), offset(), prop_oneof![len.clone(), Just(u64::MAX)])
            .prop_map(|(disk, offset, len)| Action::Decommit { disk, offset, len }),
        4 => (0usize..4, offset(), len).prop_map(|(disk, offset, len)| Action::Read { disk, offset, len }),
        1 => disk.prop_map(|disk| Action::Snapshot { disk }),
        1 => Just(Action::DeleteSnapshot),
        1 => Just(Action::Persist),
        1 => Just(Action::Crash),
    ]
}

/// A machine over the store in `dir`, replaying `log` after the persisted index.
fn open(dir: &Path, log: &[(u64, Command)]) -> PetalMachine {
    let store = Arc::new(RwLock::new(Store::open(dir).unwrap()));
    let mut m = PetalMachine::new(store, Box::new(NoPeers)).unwrap();
    let persisted = m.applied_index().0;
    for (index, cmd) in log.iter().filter(|(i, _)| *i > persisted) {
        let _ = m.apply_command(*index, cmd); // answers were checked the first time
    }
    m
}

/// `len` cut to the end of the address space.
fn room(offset: u64, len: u64) -> u64 {
    ((1u128 << 64) - offset as u128).min(len as u128) as u64
}

fn clip(offset: u64, len: u64) -> u64 {
    room(offset, len).min(200_000)
}

fn run(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let disks = ["a", "b"];
    let mut log: Vec<(u64, Command)> = Vec::new();
    let mut model = Model::default();
    let mut m = open(dir.path(), &log);
    let mut snapshots: Vec<String> = Vec::new();
    let mut next_index = 1;
    let mut apply = |m: &mut PetalMachine, log: &mut Vec<(u64, Command)>, op: Op| {
        let cmd = Command { client: 7, seq: next_index, acked_below: next_index, stamp_ms: 0, op };
        let reply = m.apply_command(next_index, &cmd);
        log.push((next_index, cmd));
        next_index += 1;
        reply
    };
    for d in disks {
        apply(&mut m, &mut log, Op::Create { disk: d.into() }).unwrap();
        model.disks.insert(d.into(), (false, BTreeMap::new()));
    }
    for action in actions {
        match action {
            Action::Write { disk, offset, len, byte } => {
                let len = clip(offset, len);
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8) | 1).collect();
                let op =
                    Op::Write { disk: disks[disk].into(), offset, data: data.clone().into(), fence: None };
                apply(&mut m, &mut log, op).unwrap();
                model.write(disks[disk], offset, &data);
            }
            Action::Decommit { disk, offset, len } => {
                let len = room(offset, len);
                apply(&mut m, &mut log, Op::Decommit { disk: disks[disk].into(), offset, len, fence: None })
                    .unwrap();
                model.decommit(disks[disk], offset, len);
            }
            Action::Read { disk, offset, len } => {
                let len = clip(offset, len);
                let name = match disk {
                    0 | 1 => disks[disk].to_string(),
                    _ => match snapshots.last() {
                        Some(s) => s.clone(),
                        None => continue,
                    },
                };
                let got = m.store().read().unwrap().read(&name, offset, len).unwrap();
                prop_assert!(got == model.read(&name, offset, len), "read {name} at {offset} len {len}");
            }
            Action::Snapshot { disk } => {
                let name = format!("{}@{}", disks[disk], log.len() + 1);
                apply(&mut m, &mut log, Op::Snapshot { disk: disks[disk].into(), name: name.clone() })
                    .unwrap();
                let copy = (true, model.disks[disks[disk]].1.clone());
                model.disks.insert(name.clone(), copy);
                snapshots.push(name);
            }
            Action::DeleteSnapshot => {
                if let Some(name) = snapshots.first().cloned() {
                    snapshots.remove(0);
                    apply(&mut m, &mut log, Op::Delete { disk: name.clone() }).unwrap();
                    model.disks.remove(&name);
                }
            }
            Action::Persist => {
                m.snapshot();
            }
            Action::Crash => {
                drop(m);
                m = open(dir.path(), &log);
            }
        }
    }
    // Writes to a snapshot are refused and change nothing.
    if let Some(s) = snapshots.last() {
        let op = Op::Write { disk: s.clone(), offset: 0, data: vec![1].into(), fence: None };
        prop_assert!(matches!(apply(&mut m, &mut log, op), Err(PetalError::ReadOnly(_))));
    }
    // Everything reads back, after a last crash too.
    for round in 0..2 {
        let store = m.store().read().unwrap();
        for (name, (read_only, blocks)) in &model.disks {
            prop_assert_eq!(store.stat(name).unwrap().read_only, *read_only);
            for (b, data) in blocks {
                let got = store.read(name, b * BLOCK_BYTES as u64, BLOCK_BYTES as u64).unwrap();
                prop_assert!(&got == data, "round {round}: {name} block {b}");
            }
        }
        prop_assert_eq!(store.list().len(), model.disks.len());
        drop(store);
        drop(m);
        m = open(dir.path(), &log);
    }
    Ok(())
}

proptest! {
    // PROPTEST_CASES raises the count for a longer run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]
    #[test]
    fn store_matches_model(actions in proptest::collection::vec(action(), 1..40)) {
        run(actions)?;
    }
}

#[test]
fn the_last_bytes_of_the_address_space() {
    run(vec![
        Action::Write { disk: 0, offset: u64::MAX - 10, len: 11, byte: 5 },
        Action::Read { disk: 0, offset: u64::MAX - 20, len: 21 },
        Action::Crash,
        Action::Decommit { disk: 0, offset: u64::MAX - 3, len: 4 },
        Action::Read { disk: 0, offset: u64::MAX - 20, len: 21 },
    ])
    .unwrap();
}

#[test]
fn bad_ranges_and_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.create("d", 1).unwrap();
    assert!(matches!(store.write("d", u64::MAX, &[1, 2], 2), Err(PetalError::OutOfRange(_))));
    assert!(matches!(store.read("d", u64::MAX - 1, 3), Err(PetalError::OutOfRange(_))));
    assert!(matches!(store.write("nope", 0, &[1], 2), Err(PetalError::NotFound(_))));
    assert!(matches!(store.create("d", 3), Err(PetalError::Exists(_))));
    assert!(matches!(store.create("", 3), Err(PetalError::Invalid(_))));
    assert!(matches!(store.snapshot("d", "d", 3), Err(PetalError::Exists(_))));
}

#[test]
fn fenced_commands_are_refused_and_never_visible() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = open(dir.path(), &[]);
    let cmd = |seq, stamp_ms, op| Command { client: 1, seq, acked_below: seq, stamp_ms, op };
    m.apply_command(1, &cmd(1, 0, Op::Create { disk: "d".into() })).unwrap();
    let fence = Some(petal::machine::Fence { lease_expiry_ms: 10_000, margin_ms: 2_000 });
    let write = |data: &[u8]| Op::Write { disk: "d".into(), offset: 0, data: data.to_vec().into(), fence };
    // Before expiry less the margin: applied. At or after it: refused, on every replica alike.
    m.apply_command(2, &cmd(2, 7_999, write(b"ok"))).unwrap();
    let e = m.apply_command(3, &cmd(3, 8_000, write(b"no"))).unwrap_err();
    assert!(matches!(e, PetalError::Fenced { lease_expiry_ms: 10_000, margin_ms: 2_000 }), "{e}");
    assert_eq!(m.store().read().unwrap().read("d", 0, 2).unwrap(), b"ok");
    // A retry of seq 3 gets the same answer without being applied again.
    assert!(matches!(m.apply_command(4, &cmd(3, 0, write(b"no"))), Err(PetalError::Fenced { .. })));
    assert_eq!(m.store().read().unwrap().read("d", 0, 2).unwrap(), b"ok");
}

#[test]
fn a_retried_request_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = open(dir.path(), &[]);
    let cmd = |seq, acked_below, op| Command { client: 9, seq, acked_below, stamp_ms: 0, op };
    m.apply_command(1, &cmd(1, 1, Op::Create { disk: "d".into() })).unwrap();
    m.apply_command(
        2,
        &cmd(2, 2, Op::Write { disk: "d".into(), offset: 0, data: b"one".to_vec().into(), fence: None }),
    )
    .unwrap();
    // Seq 3 overwrites; then seq 2 arrives again (a retry after a leader change): not re-applied.
    m.apply_command(
        3,
        &cmd(3, 2, Op::Write { disk: "d".into(), offset: 0, data: b"two".to_vec().into(), fence: None }),
    )
    .unwrap();
    m.apply_command(
        4,
        &cmd(2, 2, Op::Write { disk: "d".into(), offset: 0, data: b"one".to_vec().into(), fence: None }),
    )
    .unwrap();
    assert_eq!(m.store().read().unwrap().read("d", 0, 3).unwrap(), b"two");
    // A create retried answers as the first time did (Ok), not "exists".
    m.apply_command(5, &cmd(1, 2, Op::Create { disk: "d".into() })).unwrap_err(); // below acked_below: stale
    m.apply_command(6, &cmd(4, 4, Op::Create { disk: "e".into() })).unwrap();
    m.apply_command(7, &cmd(4, 4, Op::Create { disk: "e".into() })).unwrap();
}
