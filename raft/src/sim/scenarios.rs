//! Named scenarios, each a story from the Raft paper or its folklore, run in the simulator
//! with the safety checkers on.

use super::{Sim, SimConfig, TICK_MS};
use crate::{ConfChange, Index, NodeId, ProgressState, Role};

/// An election timeout is 10–20 ticks.
const ELECTION_MS: u64 = 20 * TICK_MS;

fn cluster(seed: u64, nodes: u64) -> Sim {
    Sim::new(SimConfig::new(seed, nodes))
}

fn elect(sim: &mut Sim) -> NodeId {
    sim.run_until(10 * ELECTION_MS, "a leader is elected", |s| s.leader().is_some());
    sim.leader().unwrap()
}

/// Commits `n` puts through the current leader and returns the last index.
fn commit_puts(sim: &mut Sim, n: usize, prefix: &str) -> Index {
    let mut last = Index(0);
    for i in 0..n {
        let leader = elect(sim);
        let p = sim.propose_on(leader, &format!("{prefix}{i}"), "v").expect("leader accepts");
        last = p.index;
        sim.run_until(10 * ELECTION_MS, "the put commits", |s| {
            s.raft(leader).is_none_or(|r| r.commit_index() >= p.index || r.role() != Role::Leader)
        });
    }
    last
}

fn role_count(sim: &Sim, role: Role) -> usize {
    sim.ids().into_iter().filter(|id| sim.raft(*id).is_some_and(|r| r.role() == role)).count()
}

// Raft §5.2: a leader is elected, and only one.
#[test]
fn initial_election() {
    for seed in 0..20 {
        let mut sim = cluster(seed, 3);
        let leader = elect(&mut sim);
        let term = sim.raft(leader).unwrap().term();
        sim.run_ms(5 * ELECTION_MS);
        assert_eq!(sim.leader(), Some(leader), "seed {seed}: a healthy leader keeps leading");
        assert_eq!(sim.raft(leader).unwrap().term(), term, "seed {seed}: no needless elections");
        assert_eq!(role_count(&sim, Role::Leader), 1);
        for id in sim.ids() {
            assert_eq!(sim.raft(id).unwrap().leader(), Some(leader), "seed {seed}: {id} knows the leader");
        }
    }
}

// Raft §5.2: when the leader fails a new one is elected; the old one rejoins as follower.
#[test]
fn reelection_after_leader_loss() {
    let mut sim = cluster(1, 3);
    let old = elect(&mut sim);
    sim.crash(old);
    sim.run_until(4 * ELECTION_MS, "a new leader", |s| s.leader().is_some_and(|l| l != old));
    let new = sim.leader().unwrap();
    assert!(sim.raft(new).unwrap().term() > crate::Term(2));
    sim.restart(old);
    sim.run_ms(3 * ELECTION_MS);
    assert_eq!(sim.leader(), Some(new), "the returning node does not disrupt the new leader");
    assert_eq!(sim.raft(old).unwrap().role(), Role::Follower);
    // With two of three down there is no leader.
    let other = sim.ids().into_iter().find(|id| *id != new && *id != old).unwrap();
    sim.crash(new);
    sim.crash(other);
    sim.run_ms(10 * ELECTION_MS);
    assert_eq!(sim.leader(), None, "one node of three cannot lead");
}

// Raft §5.3: an entry is committed only once a majority stores it.
#[test]
fn no_commit_without_majority() {
    let mut sim = cluster(2, 5);
    let leader = elect(&mut sim);
    commit_puts(&mut sim, 3, "before");
    let committed = sim.raft(leader).unwrap().commit_index();
    let followers: Vec<NodeId> = sim.ids().into_iter().filter(|id| *id != leader).collect();
    for f in &followers[..3] {
        sim.crash(*f);
    }
    let p = sim.propose_on(leader, "lost", "x").unwrap();
    sim.run_ms(2 * ELECTION_MS);
    assert_eq!(sim.raft(leader).unwrap().commit_index(), committed, "2 of 5 cannot commit");
    assert!(sim.raft(leader).unwrap().raft_log().last_index() >= p.index);
    for f in &followers[..3] {
        sim.restart(*f);
    }
    sim.run_until(10 * ELECTION_MS, "commit resumes once a majority is back", |s| {
        s.leader().is_some_and(|l| s.raft(l).unwrap().commit_index() > committed)
    });
}

// Many clients propose at once: every node applies the same sequence.
#[test]
fn concurrent_proposals() {
    let mut cfg = SimConfig::new(3, 3);
    cfg.clients = 10;
    let mut sim = Sim::new(cfg);
    sim.run_ms(3000);
    sim.quiesce_clients(5000);
    sim.converge(5000);
    assert!(sim.ops_completed() > 200, "only {} ops completed", sim.ops_completed());
    sim.check_linearizable();
}

// Raft §5.4: a leader cut off from the majority cannot commit; when it returns it steps
// down and its uncommitted entries are replaced by the new leader's.
#[test]
fn partitioned_old_leader_rejoins() {
    let mut sim = cluster(4, 5);
    let old = elect(&mut sim);
    commit_puts(&mut sim, 2, "a");
    sim.isolate(old);
    let stranded = sim.propose_on(old, "stranded", "x").unwrap();
    sim.run_until(10 * ELECTION_MS, "the majority elects a new leader", |s| {
        s.ids().into_iter().any(|id| id != old && s.raft(id).is_some_and(|r| r.role() == Role::Leader))
    });
    commit_puts(&mut sim, 5, "b");
    sim.heal();
    sim.run_until(10 * ELECTION_MS, "the old leader follows", |s| {
        s.raft(old).unwrap().role() == Role::Follower
    });
    sim.converge(5000);
    let new = sim.leader().unwrap();
    assert_ne!(new, old);
    let entry = sim.raft(old).unwrap().raft_log().entry(stranded.index).cloned();
    assert!(entry.is_none_or(|e| e.term != stranded.term), "the stranded entry was replaced");
    assert_eq!(sim.kv(old).get("stranded"), None);
    assert_eq!(sim.kv(old).get("b4").as_deref(), Some("v"));
}

// Fast backtracking (Raft §5.3's optimisation): a follower 50 conflicting entries apart
// is repaired in a few round trips, not one per entry.
#[test]
fn fast_backup_over_divergent_logs() {
    let mut cfg = SimConfig::new(5, 5);
    cfg.max_msg_bytes = 1 << 20;
    let mut sim = Sim::new(cfg);
    let l1 = elect(&mut sim);
    commit_puts(&mut sim, 1, "base");
    // Leader plus one follower go off and collect 50 entries that never commit.
    let buddy = sim.ids().into_iter().find(|id| *id != l1).unwrap();
    sim.partition(&[l1, buddy]);
    for i in 0..50 {
        sim.propose_on(l1, &format!("lost{i}"), "x").unwrap();
    }
    // The other three elect a leader and commit 50 entries of their own.
    sim.run_until(10 * ELECTION_MS, "the majority elects", |s| {
        s.leader().is_some_and(|l| l != l1 && l != buddy)
    });
    let l2 = sim.leader().unwrap();
    for i in 0..50 {
        sim.propose_on(l2, &format!("won{i}"), "y").unwrap();
    }
    sim.run_until(10 * ELECTION_MS, "the majority commits", |s| {
        s.raft(l2).unwrap().commit_index() >= s.raft(l2).unwrap().raft_log().last_index()
    });
    let rejections_before = sim.stats.append_rejections;
    sim.heal();
    sim.converge(20 * ELECTION_MS);
    let rejections = sim.stats.append_rejections - rejections_before;
    assert!(rejections <= 8, "{rejections} refused appends: backtracking went entry by entry");
    assert_eq!(sim.kv(l1).get("won49").as_deref(), Some("y"));
    assert_eq!(sim.kv(buddy).get("lost0"), None);
}

// A full-cluster power loss keeps everything committed.
#[test]
fn full_cluster_restart_keeps_committed() {
    let mut cfg = SimConfig::new(6, 3);
    cfg.clients = 5;
    cfg.snapshot_every = 40;
    let mut sim = Sim::new(cfg);
    sim.run_ms(2000);
    sim.quiesce_clients(5000);
    let leader = sim.leader().unwrap();
    let before = sim.kv(leader).clone();
    let commit = sim.raft(leader).unwrap().commit_index();
    for id in sim.ids() {
        sim.crash_mid_write(id);
    }
    sim.run_ms(500);
    sim.converge(5000);
    let leader = sim.leader().unwrap();
    assert!(sim.raft(leader).unwrap().commit_index() >= commit);
    for (k, v) in [("k0", before.get("k0")), ("k1", before.get("k1")), ("k2", before.get("k2"))] {
        let now = sim.kv(leader).get(k);
        assert_eq!(now, v, "{k} changed across a restart with no writes");
    }
    sim.check_linearizable();
}

// Raft Figure 8: leaders crash at random moments, over and over; an entry from an old
// term must never be committed by counting replicas, and nothing committed is lost.
#[test]
fn figure8_1000_leader_crashes() {
    let mut cfg = SimConfig::new(8, 5);
    // One entry per message and long, uneven delays: the interleavings of Figure 8.
    cfg.delay_ms = (1, 30);
    cfg.max_msg_bytes = 1;
    cfg.max_inflight_msgs = 1;
    let mut sim = Sim::new(cfg);
    let mut crashes = 0;
    let mut rng_state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let mut up = 5;
    while crashes < 1000 {
        if let Some(l) = sim.leader() {
            let _ = sim.propose_on(l, &format!("f{crashes}"), "v");
            sim.run_ms(next() % 40 + 1);
            if sim.is_up(l) && sim.raft(l).unwrap().role() == Role::Leader {
                sim.crash(l);
                crashes += 1;
                up -= 1;
            }
        } else {
            sim.run_ms(10);
        }
        if up < 3 {
            for id in sim.ids() {
                if !sim.is_up(id) && next() % 2 == 0 {
                    sim.restart(id);
                    up += 1;
                }
            }
        }
        if up < 3 {
            let id = sim.ids().into_iter().find(|id| !sim.is_up(*id)).unwrap();
            sim.restart(id);
            up += 1;
        }
    }
    sim.converge(20 * ELECTION_MS);
    assert!(sim.stats.elections_won > 900, "only {} elections", sim.stats.elections_won);
}

// Churn on an unreliable network: loss, duplication, reordering, crashes; the history
// stays linearizable and the nodes converge.
#[test]
fn churn_on_unreliable_network() {
    let mut cfg = SimConfig::new(9, 5);
    cfg.drop = 0.1;
    cfg.duplicate = 0.05;
    cfg.delay_ms = (1, 30);
    cfg.clients = 6;
    cfg.snapshot_every = 30;
    let mut sim = Sim::new(cfg);
    for round in 0..30u64 {
        sim.run_ms(150);
        let ids = sim.ids();
        let victim = ids[(round as usize * 7 + 3) % ids.len()];
        if round % 3 == 0 {
            sim.crash_mid_write(victim);
        } else {
            sim.crash(victim);
        }
        sim.run_ms(100);
        sim.restart(victim);
    }
    sim.quiesce_clients(10_000);
    sim.converge(10_000);
    assert!(sim.ops_completed() > 100, "only {} ops completed", sim.ops_completed());
    sim.check_linearizable();
}

// Raft §7: a follower that fell behind the leader's snapshot gets the snapshot, in chunks.
#[test]
fn snapshot_to_lagging_follower() {
    let mut cfg = SimConfig::new(10, 3);
    cfg.snapshot_every = 20;
    cfg.snapshot_chunk_bytes = 64;
    let mut sim = Sim::new(cfg);
    let leader = elect(&mut sim);
    let lagger = sim.ids().into_iter().find(|id| *id != leader).unwrap();
    sim.isolate(lagger);
    commit_puts(&mut sim, 60, "x");
    let leader = sim.leader().unwrap();
    assert!(
        sim.raft(leader).unwrap().snapshot_meta().index > sim.raft(lagger).unwrap().raft_log().last_index()
    );
    let chunks_before = sim.delivered_kinds.get("Snapshot").copied().unwrap_or(0);
    sim.heal();
    sim.converge(20 * ELECTION_MS);
    let chunks = sim.delivered_kinds.get("Snapshot").copied().unwrap_or(0) - chunks_before;
    assert!(chunks > 1, "the snapshot went in {chunks} chunk(s)");
    assert_eq!(sim.kv(lagger).get("x59").as_deref(), Some("v"));
}

// Raft §7: a follower that restarts after the others compacted past its log.
#[test]
fn snapshot_to_restarted_follower() {
    let mut cfg = SimConfig::new(11, 3);
    cfg.snapshot_every = 10;
    let mut sim = Sim::new(cfg);
    let leader = elect(&mut sim);
    let follower = sim.ids().into_iter().find(|id| *id != leader).unwrap();
    commit_puts(&mut sim, 5, "a");
    sim.crash(follower);
    commit_puts(&mut sim, 40, "b");
    let snapshots_before = sim.stats.snapshots_sent;
    sim.restart(follower);
    sim.converge(20 * ELECTION_MS);
    assert!(sim.stats.snapshots_sent > snapshots_before, "the follower was caught up by snapshot");
    assert_eq!(sim.kv(follower).get("b39").as_deref(), Some("v"));
    assert_eq!(sim.kv(follower).get("a0").as_deref(), Some("v"));
}

// Raft thesis §4: single-server changes with learners, while clients keep writing.
#[test]
fn membership_add_remove_under_load() {
    let mut cfg = SimConfig::new(12, 3);
    cfg.clients = 4;
    cfg.snapshot_every = 50;
    let mut sim = Sim::new(cfg);
    elect(&mut sim);
    sim.run_ms(300);
    sim.add_empty_node(NodeId(4));
    change(&mut sim, ConfChange::AddLearner(NodeId(4)));
    sim.run_until(20 * ELECTION_MS, "the learner catches up", |s| {
        let l = s.leader();
        l.is_some_and(|l| {
            s.raft(l)
                .unwrap()
                .status()
                .peers
                .iter()
                .any(|p| p.id == NodeId(4) && p.learner && p.state == ProgressState::Replicate)
        })
    });
    change(&mut sim, ConfChange::Promote(NodeId(4)));
    sim.run_ms(300);
    // Remove the current leader itself: it steps down and the rest carry on.
    let leader = sim.leader().unwrap();
    change(&mut sim, ConfChange::Remove(leader));
    sim.run_until(20 * ELECTION_MS, "a new leader without the removed node", |s| {
        s.leader().is_some_and(|l| l != leader && !s.raft(l).unwrap().conf().contains(leader))
    });
    sim.crash(leader);
    sim.run_ms(500);
    sim.quiesce_clients(10_000);
    let l = sim.leader().unwrap();
    let conf = sim.raft(l).unwrap().conf().clone();
    assert_eq!(conf.voters.len(), 3);
    assert!(conf.voters.contains(&NodeId(4)));
    assert!(!conf.voters.contains(&leader));
    sim.check_linearizable();
}

/// Proposes a membership change, retrying while another is pending or leadership moves.
fn change(sim: &mut Sim, c: ConfChange) {
    let mut tries = 0;
    while let Err(e) = sim.conf_change(c) {
        tries += 1;
        assert!(tries < 200, "membership change {c:?} keeps failing: {e}");
        sim.run_ms(20);
    }
}

// Raft thesis §3.10: leadership transfer hands over within an election timeout.
#[test]
fn leadership_transfer() {
    let mut cfg = SimConfig::new(13, 3);
    cfg.clients = 2;
    let mut sim = Sim::new(cfg);
    let from = elect(&mut sim);
    sim.run_ms(200);
    let to = sim.ids().into_iter().find(|id| *id != from).unwrap();
    sim.raft_mut(from).unwrap().transfer_leader(to).unwrap();
    sim.process_ready(from);
    sim.run_until(ELECTION_MS, "the transferee leads", |s| s.leader() == Some(to));
    assert_eq!(sim.raft(from).unwrap().role(), Role::Follower);
    sim.quiesce_clients(5000);
    sim.check_linearizable();
}

// PreVote (thesis §9.6): a node that was cut off and comes back cannot depose a healthy
// leader by bumping the term.
#[test]
fn prevote_keeps_rejoining_node_from_deposing_leader() {
    let mut sim = cluster(14, 3);
    let leader = elect(&mut sim);
    let term = sim.raft(leader).unwrap().term();
    let loner = sim.ids().into_iter().find(|id| *id != leader).unwrap();
    sim.isolate(loner);
    sim.run_ms(30 * ELECTION_MS);
    assert_eq!(sim.raft(loner).unwrap().term(), term, "pre-votes do not bump the term");
    sim.heal();
    sim.run_ms(10 * ELECTION_MS);
    assert_eq!(sim.leader(), Some(leader));
    assert_eq!(sim.raft(leader).unwrap().term(), term, "the leader was not deposed");

    // Without PreVote the same story does depose the leader: the test can fail.
    let mut cfg = SimConfig::new(14, 3);
    cfg.pre_vote = false;
    cfg.check_quorum = false;
    let mut sim = Sim::new(cfg);
    let leader = elect(&mut sim);
    let term = sim.raft(leader).unwrap().term();
    let loner = sim.ids().into_iter().find(|id| *id != leader).unwrap();
    sim.isolate(loner);
    sim.run_ms(30 * ELECTION_MS);
    assert!(sim.raft(loner).unwrap().term() > term);
    sim.heal();
    sim.run_ms(10 * ELECTION_MS);
    assert!(sim.leader().is_some_and(|l| sim.raft(l).unwrap().term() > term));
}

// CheckQuorum (thesis §6.2): a leader that loses the majority steps down.
#[test]
fn check_quorum_steps_down_isolated_leader() {
    let mut sim = cluster(15, 3);
    let leader = elect(&mut sim);
    sim.isolate(leader);
    sim.run_ms(3 * ELECTION_MS);
    assert_ne!(sim.raft(leader).unwrap().role(), Role::Leader);
}
