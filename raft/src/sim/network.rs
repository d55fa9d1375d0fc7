//! The simulated network: per-message random delay (so messages reorder), loss,
//! duplication, and links that can be cut and healed.

use crate::{Message, NodeId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};

pub(crate) struct Network {
    rng: SmallRng,
    pub drop: f64,
    pub duplicate: f64,
    pub delay_ms: (u64, u64),
    /// Directed links that are down.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Messages in flight by (delivery time, send order).
    in_flight: BTreeMap<(u64, u64), Message>,
    sent: u64,
}

impl Network {
    pub(crate) fn new(seed: u64, drop: f64, duplicate: f64, delay_ms: (u64, u64)) -> Network {
        Network {
            rng: SmallRng::seed_from_u64(seed),
            drop,
            duplicate,
            delay_ms,
            cut: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            sent: 0,
        }
    }

    /// Queues a message; false if the network lost it.
    pub(crate) fn send(&mut self, now_ms: u64, m: Message) -> bool {
        if self.cut.contains(&(m.from, m.to)) || self.rng.gen_bool(self.drop) {
            return false;
        }
        if self.rng.gen_bool(self.duplicate) {
            self.enqueue(now_ms, m.clone());
        }
        self.enqueue(now_ms, m);
        true
    }

    fn enqueue(&mut self, now_ms: u64, m: Message) {
        let delay = self.rng.gen_range(self.delay_ms.0..=self.delay_ms.1);
        self.sent += 1;
        self.in_flight.insert((now_ms + delay, self.sent), m);
    }

    /// The next message due by `now_ms` whose link is still up.
    pub(crate) fn pop_due(&mut self, now_ms: u64) -> Option<Message> {
        loop {
            let (&key, _) = self.in_flight.iter().next()?;
            if key.0 > now_ms {
                return None;
            }
            let m = self.in_flight.remove(&key).expect("present");
            if !self.cut.contains(&(m.from, m.to)) {
                return Some(m);
            }
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Cuts the link between `a` and `b` both ways.
    pub(crate) fn cut(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }

    pub(crate) fn heal_all(&mut self) {
        self.cut.clear();
    }
}
