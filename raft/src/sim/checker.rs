//! Raft's safety properties (Raft §5.2–§5.4, Figure 3), checked after every step:
//! election safety, log matching, leader completeness and state machine safety.

use crate::log::RaftLog;
use crate::{Entry, Index, NodeId, Raft, Role, Term};
use std::collections::BTreeMap;

#[derive(Default)]
pub(crate) struct Checker {
    /// Who led each term.
    leaders: BTreeMap<Term, NodeId>,
    /// Every entry applied anywhere, with an upper bound on the term in which it was
    /// committed (the lowest term of any node when it applied it).
    applied: BTreeMap<Index, (Entry, Term)>,
}

impl Checker {
    /// State machine safety: no two nodes apply different entries at one index.
    pub(crate) fn on_apply(&mut self, id: NodeId, e: &Entry, node_term: Term) -> Result<(), String> {
        match self.applied.get_mut(&e.index) {
            Some((first, commit_term)) => {
                if first != e {
                    return Err(format!(
                        "state machine safety: {id} applies {:?} at {} but {:?} was applied there before",
                        e, e.index, first
                    ));
                }
                *commit_term = (*commit_term).min(node_term);
            }
            None => {
                self.applied.insert(e.index, (e.clone(), node_term));
            }
        }
        Ok(())
    }

    pub(crate) fn check_node(&mut self, raft: &Raft, others: &[&Raft]) -> Result<(), String> {
        let id = raft.id();
        if raft.role() == Role::Leader {
            // Election safety: at most one leader per term.
            let first = *self.leaders.entry(raft.term()).or_insert(id);
            if first != id {
                return Err(format!("election safety: {first} and {id} both lead {}", raft.term()));
            }
            self.check_leader_completeness(raft)?;
        }
        for other in others {
            check_log_matching(raft.raft_log(), other.raft_log())
                .map_err(|e| format!("log matching between {id} and {}: {e}", other.id()))?;
        }
        Ok(())
    }

    /// Leader completeness: a leader of term T holds every entry committed before T.
    fn check_leader_completeness(&self, leader: &Raft) -> Result<(), String> {
        let log = leader.raft_log();
        for (index, (e, commit_term)) in self.applied.range(log.first_index()..) {
            if *commit_term >= leader.term() {
                continue;
            }
            match log.entry(*index) {
                Some(mine) if mine == e => {}
                other => {
                    return Err(format!(
                        "leader completeness: {} leads {} without committed entry {:?} (has {:?})",
                        leader.id(),
                        leader.term(),
                        e,
                        other
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Log matching: if two logs hold an entry with the same index and term, the logs are
/// identical up to there.
fn check_log_matching(a: &RaftLog, b: &RaftLog) -> Result<(), String> {
    let lo = a.first_index().max(b.first_index());
    let hi = a.last_index().min(b.last_index());
    if lo > hi {
        return Ok(());
    }
    let mut top = hi;
    while top >= lo && a.term(top) != b.term(top) {
        if top.0 == 0 {
            return Ok(());
        }
        top = top.prev();
    }
    let mut i = lo;
    while i <= top {
        if a.entry(i) != b.entry(i) {
            return Err(format!("both hold {top}@{:?} but differ at {i}", a.term(top)));
        }
        i = i.next();
    }
    Ok(())
}
