//! The randomized run: many seeds, each a random cluster under random faults with clients
//! running, checked for safety after every step and for linearizability at the end.
//! `RAFT_SIM_SEEDS` sets how many seeds (default 500); `RAFT_SIM_SEED` replays one.

use super::{Sim, SimConfig};
use crate::{ConfChange, NodeId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn run_seed(seed: u64) -> (u64, usize) {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    let nodes = if rng.gen_bool(0.5) { 3 } else { 5 };
    let mut cfg = SimConfig::new(seed, nodes);
    cfg.drop = [0.0, 0.01, 0.05, 0.15][rng.gen_range(0..4)];
    cfg.duplicate = [0.0, 0.02, 0.1][rng.gen_range(0..3)];
    cfg.delay_ms = [(1, 3), (1, 10), (1, 40)][rng.gen_range(0..3)];
    cfg.snapshot_every = [0, 10, 40][rng.gen_range(0..3)];
    cfg.clients = rng.gen_range(1..=6);
    cfg.keys = rng.gen_range(1..=4);
    cfg.pre_vote = rng.gen_bool(0.8);
    cfg.check_quorum = rng.gen_bool(0.8);
    cfg.max_inflight_msgs = rng.gen_range(1..=8);
    cfg.max_msg_bytes = [100, 1000, 1 << 20][rng.gen_range(0..3)];
    cfg.snapshot_chunk_bytes = [16, 200, 1 << 20][rng.gen_range(0..3)];
    let mut sim = Sim::new(cfg);
    let mut next_id = nodes + 1;
    for _ in 0..rng.gen_range(4..12) {
        sim.run_ms(rng.gen_range(50..400));
        let ids = sim.ids();
        let victim = ids[rng.gen_range(0..ids.len())];
        match rng.gen_range(0..10) {
            0 | 1 => sim.crash(victim),
            2 => sim.crash_mid_write(victim),
            3 => {
                let k = rng.gen_range(1..ids.len());
                let side: Vec<NodeId> = ids.iter().copied().take(k).collect();
                sim.partition(&side);
            }
            4 => sim.isolate(victim),
            5 => sim.heal(),
            6 => {
                if let Some(l) = sim.leader() {
                    let _ = sim.raft_mut(l).unwrap().transfer_leader(victim);
                    sim.process_ready(l);
                }
            }
            7 if next_id < nodes + 3 => {
                // Membership: add a learner, or promote, or remove.
                let id = NodeId(next_id);
                sim.add_empty_node(id);
                if sim.conf_change(ConfChange::AddLearner(id)).is_ok() {
                    next_id += 1;
                }
            }
            8 => {
                if let Some(l) = sim.leader() {
                    let learner = sim.raft(l).unwrap().conf().learners.iter().next().copied();
                    if let Some(id) = learner {
                        let _ = sim.conf_change(ConfChange::Promote(id));
                    }
                }
            }
            _ => {
                for id in ids {
                    sim.restart(id);
                }
            }
        }
    }
    sim.quiesce_clients(20_000);
    sim.converge(20_000);
    sim.check_linearizable();
    (sim.stats.crashes, sim.ops_completed())
}

#[test]
fn randomized_seeds() {
    if let Ok(seed) = std::env::var("RAFT_SIM_SEED") {
        let seed: u64 = seed.parse().expect("RAFT_SIM_SEED is a number");
        run_seed(seed);
        return;
    }
    let seeds: u64 = std::env::var("RAFT_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
    let (mut crashes, mut ops) = (0, 0);
    for seed in 0..seeds {
        let (c, o) = run_seed(seed);
        crashes += c;
        ops += o;
    }
    eprintln!(
        "randomized raft simulation: {seeds} seeds, {crashes} crashes, {ops} client operations checked"
    );
    assert!(ops as u64 > seeds * 10, "clients made too little progress: {ops} ops over {seeds} seeds");
}
