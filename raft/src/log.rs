//! The in-memory view of the replicated log: what is compacted into the snapshot, what is
//! stored, what is durable, committed and applied.

use crate::types::{Entry, Index, Snapshot, SnapshotMeta, Term};

/// The log after the latest snapshot.
///
/// Invariant: `snapshot.index <= applied <= committed <= last_index()`,
/// `applied <= stable <= in_progress <= last_index()`, and
/// `entries[i].index == snapshot.index + 1 + i`.
#[derive(Debug)]
pub(crate) struct RaftLog {
    /// Where the log starts: entries up to here live only in the snapshot.
    pub(crate) snapshot: SnapshotMeta,
    /// The snapshot's bytes, kept to send to followers that fell behind.
    pub(crate) snapshot_data: bytes::Bytes,
    entries: Vec<Entry>,
    /// Highest index known committed.
    pub(crate) committed: Index,
    /// Highest index handed out for apply.
    pub(crate) applied: Index,
    /// Highest index known durable on this node's disk.
    pub(crate) stable: Index,
    /// Highest index handed out to be persisted (durable or not yet).
    pub(crate) in_progress: Index,
}

impl RaftLog {
    pub(crate) fn new(snapshot: Option<Snapshot>, entries: Vec<Entry>) -> RaftLog {
        let (meta, data) = match snapshot {
            Some(s) => (s.meta, s.data),
            None => (SnapshotMeta::default(), bytes::Bytes::new()),
        };
        let entries: Vec<Entry> = entries.into_iter().filter(|e| e.index > meta.index).collect();
        let last = entries.last().map_or(meta.index, |e| e.index);
        let log = RaftLog {
            committed: meta.index,
            applied: meta.index,
            stable: last,
            in_progress: last,
            snapshot: meta,
            snapshot_data: data,
            entries,
        };
        log.assert_contiguous();
        log
    }

    fn assert_contiguous(&self) {
        for (i, e) in self.entries.iter().enumerate() {
            assert_eq!(e.index.0, self.snapshot.index.0 + 1 + i as u64, "log not contiguous");
        }
    }

    pub(crate) fn first_index(&self) -> Index {
        self.snapshot.index.next()
    }

    pub(crate) fn last_index(&self) -> Index {
        self.entries.last().map_or(self.snapshot.index, |e| e.index)
    }

    pub(crate) fn last_term(&self) -> Term {
        self.term(self.last_index()).expect("last index has a term")
    }

    /// The term at `index`, or None when it is compacted away or beyond the log.
    pub(crate) fn term(&self, index: Index) -> Option<Term> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub(crate) fn entry(&self, index: Index) -> Option<&Entry> {
        if index <= self.snapshot.index {
            return None;
        }
        self.entries.get((index.0 - self.snapshot.index.0 - 1) as usize)
    }

    pub(crate) fn match_term(&self, index: Index, term: Term) -> bool {
        self.term(index) == Some(term)
    }

    /// Raft §5.4.1: a candidate's log is at least as up to date as ours.
    pub(crate) fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        last_term > self.last_term() || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// The largest index at or below `index` whose term is at most `term`, with that term
    /// (the conflict search of the fast backtracking optimisation).
    pub(crate) fn find_conflict_by_term(&self, index: Index, term: Term) -> (Index, Term) {
        let mut i = index.min(self.last_index());
        loop {
            match self.term(i) {
                Some(t) if t <= term => return (i, t),
                Some(_) if i > self.snapshot.index => i = i.prev(),
                // Still too new at the snapshot: the match lies below it.
                Some(_) => return (i.prev(), Term(0)),
                None => return (i, Term(0)),
            }
        }
    }

    /// Entries `[lo, hi)`, at least one if any, then up to `max_bytes`.
    pub(crate) fn slice(&self, lo: Index, hi: Index, max_bytes: u64) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut i = lo;
        while i < hi {
            let Some(e) = self.entry(i) else { break };
            bytes += e.size_bytes();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
            i = i.next();
        }
        out
    }

    /// Appends entries as leader (their indexes must follow the last).
    pub(crate) fn append(&mut self, entries: Vec<Entry>) {
        for e in entries {
            assert_eq!(e.index, self.last_index().next(), "append out of order");
            self.entries.push(e);
        }
    }

    /// Follower side of AppendEntries (Raft §5.3): if the log matches at `prev`, drop any
    /// conflicting suffix, append what is new, and return the last index the leader's
    /// message vouches for.
    pub(crate) fn maybe_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
    ) -> Option<Index> {
        if !self.match_term(prev_index, prev_term) {
            return None;
        }
        let last_new = Index(prev_index.0 + entries.len() as u64);
        for e in entries {
            if e.index <= self.snapshot.index {
                continue;
            }
            match self.term(e.index) {
                Some(t) if t == e.term => continue,
                Some(_) => {
                    assert!(e.index > self.committed, "conflict at committed index {}", e.index);
                    self.truncate_from(e.index);
                    self.entries.push(e);
                }
                None => self.entries.push(e),
            }
        }
        Some(last_new)
    }

    fn truncate_from(&mut self, index: Index) {
        let keep = (index.0 - self.snapshot.index.0 - 1) as usize;
        self.entries.truncate(keep);
        self.stable = self.stable.min(index.prev());
        self.in_progress = self.in_progress.min(index.prev());
    }

    /// Entries not yet handed out to be persisted.
    pub(crate) fn unstable(&self) -> &[Entry] {
        let from = (self.in_progress.0.max(self.snapshot.index.0) - self.snapshot.index.0) as usize;
        &self.entries[from.min(self.entries.len())..]
    }

    /// Records that entries through `index` (of `term`) are being persisted.
    pub(crate) fn in_progress_to(&mut self, index: Index, term: Term) {
        if self.term(index) == Some(term) && index > self.in_progress {
            self.in_progress = index;
        }
    }

    pub(crate) fn stable_to(&mut self, index: Index, term: Term) {
        // Only if the entry is still the one that was persisted (it may have been replaced:
        // by Log Matching, an entry with the same index and term is the same entry).
        if self.term(index) == Some(term) && index > self.stable {
            self.stable = index;
            self.in_progress = self.in_progress.max(index);
        }
    }

    pub(crate) fn commit_to(&mut self, index: Index) {
        if index > self.committed {
            assert!(index <= self.last_index(), "commit {} beyond last {}", index, self.last_index());
            self.committed = index;
        }
    }

    /// Raft §5.4.2: only entries of the current term are committed by counting replicas.
    pub(crate) fn maybe_commit(&mut self, index: Index, term: Term) -> bool {
        if index > self.committed && self.term(index) == Some(term) {
            self.committed = index;
            return true;
        }
        false
    }

    /// Committed, durable entries not yet handed out for apply, up to `max_bytes`.
    pub(crate) fn next_committed(&self, max_bytes: u64) -> Vec<Entry> {
        let hi = self.committed.min(self.stable);
        if hi <= self.applied {
            return Vec::new();
        }
        self.slice(self.applied.next(), hi.next(), max_bytes)
    }

    /// Replaces the whole log by a snapshot received from the leader.
    pub(crate) fn restore(&mut self, snapshot: Snapshot) {
        self.entries.clear();
        self.committed = snapshot.meta.index;
        self.applied = snapshot.meta.index;
        self.stable = snapshot.meta.index;
        self.in_progress = snapshot.meta.index;
        self.snapshot = snapshot.meta;
        self.snapshot_data = snapshot.data;
    }

    /// Drops entries up to `meta.index`, now covered by the application's snapshot.
    pub(crate) fn compact(&mut self, meta: SnapshotMeta, data: bytes::Bytes) {
        assert!(meta.index <= self.applied, "compact beyond applied");
        if meta.index <= self.snapshot.index {
            return;
        }
        let drop = (meta.index.0 - self.snapshot.index.0) as usize;
        self.entries.drain(..drop);
        self.snapshot = meta;
        self.snapshot_data = data;
        self.assert_contiguous();
    }

    /// Bytes of uncommitted entries (the leader's proposal bound).
    pub(crate) fn uncommitted_bytes(&self) -> u64 {
        self.entries.iter().rev().take_while(|e| e.index > self.committed).map(Entry::size_bytes).sum()
    }
}
