//! Linearizability checking for the key-value histories that the simulator records.
//!
//! A history is linearizable when each operation can be given one instant between its
//! call and its return such that applying the operations in the order of those instants
//! to a plain sequential map gives exactly the outputs the clients saw (Herlihy & Wing
//! 1990). Deciding that is NP-complete, so the checker searches, as Porcupine and Knossos
//! do:
//!
//! - P-compositionality (Horn & Kroening 2015): a history is linearizable if and only if
//!   its sub-history on each key is, so every key is checked on its own.
//! - Wing & Gong's depth-first search over a doubly linked list of call and return
//!   events sorted by time. The operations that may take effect next are those called
//!   before the first return still in the list; linearizing one unlinks its two events,
//!   backtracking relinks them.
//! - Lowe's memoization ("Testing for linearizability", 2017): a configuration is the
//!   set of operations linearized so far plus the value they leave, and no configuration
//!   is explored twice.
//!
//! Three reductions, each sound for this model, keep Appends and lost operations from
//! blowing the search up: a read that fits the current value is linearized at once
//! without trying alternatives; a configuration in which some read can no longer see its
//! value is abandoned (Appends only extend a value); and a pending write whose value no
//! read contains is left out, since it never needs to take effect.
//!
//! An operation that never returned (its client timed out or crashed) may take effect at
//! any time after its call, or never, and since its output is unknown any output is
//! accepted. A read that never returned therefore constrains nothing and is dropped.
//!
//! Events at the same tick count as concurrent: a call at tick t sorts before a return at
//! tick t. The order of events inside one simulated tick is not recorded, and only the
//! lenient reading avoids false alarms.
//!
//! When a key fails, the report shows how far the search got and where it was stuck, and,
//! if a bounded effort manages, a minimal set of operations that still fails.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::mem;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A client's request to the key-value state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KvInput {
    /// Read the value of `key`.
    Get { key: String },
    /// Set `key` to `value`.
    Put { key: String, value: String },
    /// Append `value` to the value of `key`; an absent key counts as empty.
    Append { key: String, value: String },
}

impl KvInput {
    fn key(&self) -> &str {
        match self {
            KvInput::Get { key } | KvInput::Put { key, .. } | KvInput::Append { key, .. } => key,
        }
    }
}

/// The state machine's answer to a [`KvInput`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KvOutput {
    /// The answer to a Get: the value, None if the key is absent.
    Value(Option<String>),
    /// The answer to a Put or an Append.
    Ok,
}

/// One client operation, as the simulator recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Operation {
    /// The client that issued it; reports only.
    pub client: u64,
    /// What the client asked for.
    pub input: KvInput,
    /// Tick at which the client sent the request.
    pub call: u64,
    /// Tick at which the client got the answer. None if it never did (it timed out or
    /// crashed): the operation may then take effect at any time after `call`, or never.
    pub ret: Option<u64>,
    /// The answer. Required when `ret` is Some, ignored when it is None.
    pub output: Option<KvOutput>,
}

/// The verdict of [`check_kv`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CheckResult {
    /// The history of every key is linearizable.
    Ok,
    /// The history of `key` is not linearizable; `detail` shows why, for a human.
    Illegal { key: String, detail: String },
    /// The budget ran out while checking `key`; nothing is known about it. A key found
    /// illegal is reported instead, even when another key ran out of budget.
    Timeout { key: String },
}

/// Steps between looks at the clock and at memory use, which cost more than a step.
const CLOCK_CHECK_STEPS: u64 = 4096;
/// Memory that one search's memo and interned values may take; past it the search gives
/// up as if out of time.
const MEMORY_BYTES_MAX: usize = 1 << 30;
/// Steps that shrinking a failure may take, in addition to a multiple of the steps that
/// finding it took.
const MINIMIZE_STEPS_MIN: u64 = 1_000_000;
const MINIMIZE_STEPS_FACTOR: u64 = 4;
/// Steps that one check while shrinking may take, unless finding the failure took more.
const MINIMIZE_CHECK_STEPS_MIN: u64 = 100_000;
/// Operations a report lists per section.
const REPORT_LINES_MAX: usize = 40;
/// Characters of a value a report shows before eliding its middle.
const REPORT_VALUE_CHARS_MAX: usize = 80;

/// Checks that `history` is linearizable with respect to a sequential key-value map,
/// spending at most about `budget`.
///
/// Panics if the history is malformed (a return before its call, a returned operation
/// without an output, or an output of the wrong kind): that is a bug in the recorder.
pub(crate) fn check_kv(history: &[Operation], budget: Duration) -> CheckResult {
    let mut search_budget = Budget { deadline: Instant::now().checked_add(budget), steps_left: u64::MAX };
    let mut timed_out = None;
    for (key, ops) in split_by_key(history) {
        match check_key(ops, &mut search_budget) {
            Verdict::Linearizable => {}
            Verdict::Illegal(report) => {
                return CheckResult::Illegal { key: key.to_owned(), detail: report.to_string() }
            }
            // Go on: another key may still be found illegal within a few steps.
            Verdict::Exhausted => {
                timed_out.get_or_insert(key);
            }
        }
    }
    match timed_out {
        Some(key) => CheckResult::Timeout { key: key.to_owned() },
        None => CheckResult::Ok,
    }
}

/// What an operation does to its key, as the search sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// A read, and the value it returned.
    Get(Option<String>),
    Put(String),
    Append(String),
}

/// An operation on one key.
// Invariant: a Get has returned (`ret` is Some).
#[derive(Clone, Debug)]
struct KeyOp {
    /// Index in the history given to `check_kv`; reports name operations by it.
    id: usize,
    client: u64,
    call: u64,
    /// None: may take effect at any time after `call`, or never.
    ret: Option<u64>,
    action: Action,
}

/// Splits a history by key (P-compositionality), dropping the reads that never returned.
fn split_by_key(history: &[Operation]) -> BTreeMap<&str, Vec<KeyOp>> {
    let mut keys: BTreeMap<&str, Vec<KeyOp>> = BTreeMap::new();
    for (id, op) in history.iter().enumerate() {
        let output = match op.ret {
            Some(ret) => {
                assert!(op.call <= ret, "operation #{id} returns before its call: {op:?}");
                let output = op.output.as_ref();
                Some(output.unwrap_or_else(|| panic!("operation #{id} returned nothing: {op:?}")))
            }
            None => None,
        };
        let action = match (&op.input, output) {
            (KvInput::Get { .. }, None) => continue,
            (KvInput::Get { .. }, Some(KvOutput::Value(value))) => Action::Get(value.clone()),
            (KvInput::Put { value, .. }, None | Some(KvOutput::Ok)) => Action::Put(value.clone()),
            (KvInput::Append { value, .. }, None | Some(KvOutput::Ok)) => Action::Append(value.clone()),
            (input, Some(output)) => {
                panic!("operation #{id}: {output:?} is no answer to {input:?}")
            }
        };
        keys.entry(op.input.key()).or_default().push(KeyOp {
            id,
            client: op.client,
            call: op.call,
            ret: op.ret,
            action,
        });
    }
    keys
}

enum Verdict {
    Linearizable,
    Illegal(Report),
    Exhausted,
}

fn check_key(mut ops: Vec<KeyOp>, budget: &mut Budget) -> Verdict {
    // Each pending write doubles the configurations from its call on, but one that no
    // read observes never needs to take effect.
    let ops_len = ops.len();
    drop_unobserved_writes(&mut ops);
    match search(&ops, budget) {
        Outcome::Linearizable => Verdict::Linearizable,
        Outcome::Exhausted => Verdict::Exhausted,
        Outcome::Illegal(failure) => {
            let report = Report::new(&ops, ops_len - ops.len(), &failure, budget.deadline);
            Verdict::Illegal(report)
        }
    }
}

/// A value of the key, interned by [`Model`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct StateId(u32);

impl StateId {
    const ABSENT: StateId = StateId(0);
}

/// The sequential specification of one key. Every value reached is interned, so that the
/// memo holds a number rather than a string that appends make ever longer.
struct Model {
    /// The values by id; `StateId::ABSENT` is the absent key.
    values: Vec<Option<Rc<str>>>,
    ids: HashMap<Rc<str>, StateId>,
    /// Bytes of string in `values`, for the memory limit.
    value_bytes: usize,
}

impl Model {
    fn new() -> Model {
        Model { values: vec![None], ids: HashMap::new(), value_bytes: 0 }
    }

    fn value(&self, state: StateId) -> Option<&str> {
        self.values[state.0 as usize].as_deref()
    }

    fn intern(&mut self, value: &str) -> StateId {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        let id = StateId(u32::try_from(self.values.len()).expect("memory limit keeps ids small"));
        let value: Rc<str> = Rc::from(value);
        self.value_bytes += value.len();
        self.values.push(Some(Rc::clone(&value)));
        self.ids.insert(value, id);
        id
    }

    /// The value after `action` applies to `state`, or None if the output that the action
    /// saw contradicts `state`.
    fn step(&mut self, state: StateId, action: &Action) -> Option<StateId> {
        match action {
            Action::Get(seen) => (self.value(state) == seen.as_deref()).then_some(state),
            Action::Put(value) => Some(self.intern(value)),
            Action::Append(suffix) => {
                let mut value = self.value(state).unwrap_or_default().to_owned();
                value.push_str(suffix);
                Some(self.intern(&value))
            }
        }
    }
}

/// The set of operations linearized so far, by index in the key's history.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn new(len: usize) -> Bitset {
        Bitset(vec![0; len.div_ceil(64)])
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

#[derive(Clone, Copy)]
enum Event {
    /// Sentinels at both ends, so that every node has both links.
    Head,
    Tail,
    /// The call of operation `op`, and the node of its return if it returned.
    Call {
        op: usize,
        ret: Option<usize>,
    },
    Return,
}

/// Porcupine's list of call and return events sorted by time, doubly linked so that
/// linearizing an operation unlinks its events and backtracking relinks them, each in
/// O(1) (Knuth's dancing links).
struct Events {
    event: Vec<Event>,
    time: Vec<u64>,
    prev: Vec<usize>,
    next: Vec<usize>,
}

impl Events {
    const HEAD: usize = 0;

    fn new(ops: &[KeyOp]) -> Events {
        // (time, is a return, operation): calls sort before returns at the same tick.
        let mut sorted: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            sorted.push((op.call, false, i));
            if let Some(ret) = op.ret {
                sorted.push((ret, true, i));
            }
        }
        sorted.sort_unstable();
        let mut ret_node = vec![None; ops.len()];
        for (n, &(_, is_return, op)) in sorted.iter().enumerate() {
            if is_return {
                ret_node[op] = Some(n + 1);
            }
        }
        let mut event = vec![Event::Head];
        let mut time = vec![0];
        for &(t, is_return, op) in &sorted {
            event.push(if is_return { Event::Return } else { Event::Call { op, ret: ret_node[op] } });
            time.push(t);
        }
        event.push(Event::Tail);
        time.push(u64::MAX);
        let len = event.len();
        Events {
            event,
            time,
            prev: (0..len).map(|n| n.saturating_sub(1)).collect(),
            next: (0..len).map(|n| (n + 1).min(len - 1)).collect(),
        }
    }

    fn first(&self) -> usize {
        self.next[Events::HEAD]
    }

    fn op(&self, call: usize) -> usize {
        match self.event[call] {
            Event::Call { op, .. } => op,
            _ => unreachable!("node {call} is not a call"),
        }
    }

    fn unlink(&mut self, n: usize) {
        let (p, q) = (self.prev[n], self.next[n]);
        self.next[p] = q;
        self.prev[q] = p;
    }

    fn relink(&mut self, n: usize) {
        let (p, q) = (self.prev[n], self.next[n]);
        self.next[p] = n;
        self.prev[q] = n;
    }

    /// Takes the events of the operation called at node `call` out of the list.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        if let Event::Call { ret: Some(ret), .. } = self.event[call] {
            self.unlink(ret);
        }
    }

    /// Undoes `lift(call)`; lifts are undone in the reverse of their order.
    fn unlift(&mut self, call: usize) {
        if let Event::Call { ret: Some(ret), .. } = self.event[call] {
            self.relink(ret);
        }
        self.relink(call);
    }
}

/// What a search may spend.
struct Budget {
    /// None: no limit in time.
    deadline: Option<Instant>,
    /// A step tries one event.
    steps_left: u64,
}

impl Budget {
    /// Takes the `steps`th step of a search that holds `memory_bytes`; false if out of
    /// steps, time or memory.
    fn spend_step(&mut self, steps: u64, memory_bytes: usize) -> bool {
        if self.steps_left == 0 {
            return false;
        }
        self.steps_left -= 1;
        if !steps.is_multiple_of(CLOCK_CHECK_STEPS) {
            return true;
        }
        let late = self.deadline.is_some_and(|deadline| Instant::now() >= deadline);
        !late && memory_bytes <= MEMORY_BYTES_MAX
    }
}

enum Outcome {
    Linearizable,
    Illegal(Failure),
    /// Out of time, steps or memory.
    Exhausted,
}

/// How far a search that found no linearization got.
struct Failure {
    /// The longest sequence of operations, by index, that the search linearized.
    longest: Vec<usize>,
    /// The latest first return of any configuration the search reached. It got no
    /// further in time, so the operations called after this do not matter to the
    /// failure: `minimize` relaxes them all at once (and checks that it may).
    frontier: u64,
    steps: u64,
}

/// Searches for a linearization of the operations on one key.
fn search(ops: &[KeyOp], budget: &mut Budget) -> Outcome {
    let mut search = Search::new(ops);
    // The next operation to try, and whether it is the only one worth trying in its
    // configuration; None to backtrack.
    let mut next = search.choices();
    // Done when every operation that returned is linearized: the pending operations
    // still unlinearized never took effect.
    while search.returned_left > 0 {
        search.steps += 1;
        if !budget.spend_step(search.steps, search.memory_bytes()) {
            return Outcome::Exhausted;
        }
        let Some((node, only)) = next else {
            next = match search.backtrack() {
                Some(node) => Some((node, false)),
                None => return Outcome::Illegal(search.failure()),
            };
            continue;
        };
        let event = search.events.event[node];
        next = match event {
            Event::Call { .. } if search.linearize(node, only) => search.choices(),
            Event::Call { .. } if !only => Some((search.events.next[node], false)),
            // The only choice worth trying failed; or nothing before this return can go
            // next, yet the operation returning here is not linearized. (The tail is
            // reached only through a bug: a return is left while `returned_left > 0`.)
            Event::Call { .. } | Event::Return | Event::Tail => None,
            Event::Head => unreachable!("the head follows no node"),
        };
    }
    Outcome::Linearizable
}

/// The state of one depth-first search (Wing & Gong, with Lowe's memo).
struct Search<'a> {
    ops: &'a [KeyOp],
    events: Events,
    model: Model,
    state: StateId,
    linearized: Bitset,
    /// Configurations explored already, or being explored.
    memo: HashSet<(Bitset, StateId)>,
    /// The linearized operations in order: each one's call node, the state before it,
    /// and whether it was the only choice worth trying there.
    stack: Vec<(usize, StateId, bool)>,
    /// The Puts not linearized, by call time.
    puts: BTreeSet<(u64, usize)>,
    returned_left: usize,
    longest: Vec<usize>,
    frontier: u64,
    steps: u64,
}

impl<'a> Search<'a> {
    fn new(ops: &'a [KeyOp]) -> Search<'a> {
        Search {
            ops,
            events: Events::new(ops),
            model: Model::new(),
            state: StateId::ABSENT,
            linearized: Bitset::new(ops.len()),
            memo: HashSet::new(),
            stack: Vec::new(),
            puts: (ops.iter().enumerate())
                .filter(|(_, op)| matches!(op.action, Action::Put(_)))
                .map(|(i, op)| (op.call, i))
                .collect(),
            returned_left: ops.iter().filter(|op| op.ret.is_some()).count(),
            longest: Vec::new(),
            frontier: 0,
            steps: 0,
        }
    }

    /// In a configuration just reached, the operation to try first and whether it is the
    /// only one worth trying; None if the configuration is a dead end.
    ///
    /// A read that may go next and fits the value now is the only choice worth trying:
    /// moved ahead to here in any linearization from here, it changes no value and breaks
    /// no real-time order, since everything that returned before its call is linearized.
    fn choices(&mut self) -> Option<(usize, bool)> {
        let value = self.model.value(self.state);
        let mut fitting = None;
        let mut dead = false;
        let mut node = self.events.first();
        while let Event::Call { op, .. } = self.events.event[node] {
            if let Action::Get(seen) = &self.ops[op].action {
                if value == seen.as_deref() {
                    fitting = fitting.or(Some(node));
                } else if !self.may_read(op) {
                    dead = true;
                }
            }
            node = self.events.next[node];
        }
        self.frontier = self.frontier.max(self.events.time[node]);
        match fitting {
            _ if dead => None,
            Some(read) => Some((read, true)),
            None => Some((self.events.first(), false)),
        }
    }

    /// Whether the read `read` can still see the value it returned. Until it takes
    /// effect, Appends only extend the value, so it must extend the value now or that of
    /// a Put that can still go before the read (one called by the read's return).
    fn may_read(&self, read: usize) -> bool {
        let Action::Get(seen) = &self.ops[read].action else {
            unreachable!("operation {read} is not a read")
        };
        let Some(seen) = seen else {
            return self.model.value(self.state).is_none();
        };
        let ret = self.ops[read].ret.expect("reads have returned");
        let base = self.model.value(self.state);
        base.is_none_or(|base| seen.starts_with(base))
            || (self.puts.range(..=(ret, usize::MAX))).any(|&(_, put)| match &self.ops[put].action {
                Action::Put(value) => seen.starts_with(value.as_str()),
                _ => unreachable!("operation {put} is not a put"),
            })
    }

    /// Linearizes the operation called at `call` next, unless its output contradicts
    /// the value or the configuration it leads to was explored already.
    fn linearize(&mut self, call: usize, only: bool) -> bool {
        let op = self.events.op(call);
        let Some(next) = self.model.step(self.state, &self.ops[op].action) else {
            return false;
        };
        self.linearized.insert(op);
        if !self.memo.insert((self.linearized.clone(), next)) {
            self.linearized.remove(op);
            return false;
        }
        self.stack.push((call, self.state, only));
        self.state = next;
        if self.ops[op].ret.is_some() {
            self.returned_left -= 1;
        }
        if matches!(self.ops[op].action, Action::Put(_)) {
            self.puts.remove(&(self.ops[op].call, op));
        }
        self.events.lift(call);
        if self.stack.len() > self.longest.len() {
            let calls = self.stack.iter();
            self.longest = calls.map(|&(call, _, _)| self.events.op(call)).collect();
        }
        true
    }

    /// Undoes linearizations up to the latest that had alternatives, and returns the
    /// node of the next alternative; None if there is none left anywhere.
    fn backtrack(&mut self) -> Option<usize> {
        loop {
            let (call, before, only) = self.stack.pop()?;
            let op = self.events.op(call);
            self.events.unlift(call);
            self.linearized.remove(op);
            self.state = before;
            if self.ops[op].ret.is_some() {
                self.returned_left += 1;
            }
            if matches!(self.ops[op].action, Action::Put(_)) {
                self.puts.insert((self.ops[op].call, op));
            }
            if !only {
                return Some(self.events.next[call]);
            }
        }
    }

    /// Bytes held by the memo and the interned values, roughly.
    fn memory_bytes(&self) -> usize {
        let entry_bytes = mem::size_of::<(Bitset, StateId, u64)>() + 8 * self.linearized.0.len();
        self.memo.len() * entry_bytes + self.model.value_bytes
    }

    fn failure(self) -> Failure {
        Failure { longest: self.longest, frontier: self.frontier, steps: self.steps }
    }
}

/// Why a key's history is not linearizable.
struct Report {
    ops_len: usize,
    /// Pending writes that no read could observe, left out of the search.
    unobserved_len: usize,
    steps: u64,
    /// A sub-history that is still not linearizable; see [`minimize`].
    conflict: Vec<KeyOp>,
    /// False if minimizing ran out of budget, so that `conflict` may hold more than needed.
    conflict_minimal: bool,
    /// The longest linearizable prefix the search found, with the value after each.
    prefix: Vec<(KeyOp, Option<String>)>,
    stuck: Stuck,
}

/// Where the longest prefix got stuck.
struct Stuck {
    /// The operation not yet linearized with the earliest return.
    due: KeyOp,
    /// The value after the prefix.
    value: Option<String>,
    /// The operations that could go before `due` returns, each with why it does not.
    candidates: Vec<(KeyOp, String)>,
}

impl Report {
    fn new(ops: &[KeyOp], unobserved_len: usize, failure: &Failure, deadline: Option<Instant>) -> Report {
        let (conflict, conflict_minimal) = minimize(ops, failure, deadline);
        let (prefix, stuck) = replay(ops, &failure.longest);
        Report {
            ops_len: ops.len(),
            unobserved_len,
            steps: failure.steps,
            conflict,
            conflict_minimal,
            prefix,
            stuck,
        }
    }
}

/// Shrinks an illegal history to a core that is still illegal, for the report, and says
/// whether the core is minimal: whether each operation left that returned is needed, in
/// that relaxing it alone makes the core linearizable. The pending writes left are ones
/// that reads in the core may observe.
///
/// Relaxing an operation (dropping a read, or letting a write take effect at any time
/// after its call, or never) only admits more linearizations, so one whose relaxation
/// leaves the history illegal is not needed. Each check is a search that must exhaust
/// every configuration up to the failure, and relaxed writes widen it, so the checks are
/// bounded: one that runs out keeps its operation. The core is always illegal.
fn minimize(ops: &[KeyOp], failure: &Failure, deadline: Option<Instant>) -> (Vec<KeyOp>, bool) {
    let mut budget = Budget {
        deadline,
        steps_left: MINIMIZE_STEPS_MIN.saturating_add(failure.steps.saturating_mul(MINIMIZE_STEPS_FACTOR)),
    };
    let check_steps_max = MINIMIZE_CHECK_STEPS_MIN.max(failure.steps.saturating_mul(2));
    // Relaxing at once the operations called after the frontier saves a check for each.
    // (Dropping them would be stricter, and could leave a read unexplained for a reason
    // that is not the failure's.)
    let mut core: Vec<KeyOp> = ops
        .iter()
        .filter(|op| op.call <= failure.frontier || !matches!(op.action, Action::Get(_)))
        .cloned()
        .map(|mut op| {
            if op.call > failure.frontier {
                op.ret = None;
            }
            op
        })
        .collect();
    drop_unobserved_writes(&mut core);
    if !matches!(check(&core, &mut budget, check_steps_max), Outcome::Illegal(_)) {
        return (ops.to_vec(), false);
    }
    let mut minimal = true;
    // Reads first, so that writes which no read left observes can go entirely rather than
    // stay pending; and the latest first, so that the checks keep the constraints of the
    // early history, which only need exploring once.
    for reads in [true, false] {
        for i in (0..core.len()).rev() {
            if core[i].ret.is_none() || matches!(core[i].action, Action::Get(_)) != reads {
                continue;
            }
            if budget.steps_left == 0 || deadline.is_some_and(|d| Instant::now() >= d) {
                return (core, false);
            }
            let relaxed = relax(&core, i);
            match check(&relaxed, &mut budget, check_steps_max) {
                Outcome::Linearizable => {}
                Outcome::Illegal(_) => core = relaxed,
                Outcome::Exhausted => minimal = false,
            }
        }
        drop_unobserved_writes(&mut core);
    }
    (core, minimal)
}

/// Searches `ops` within `budget`, taking at most `steps_max` of its steps.
fn check(ops: &[KeyOp], budget: &mut Budget, steps_max: u64) -> Outcome {
    let steps_allowed = budget.steps_left.min(steps_max);
    let mut check_budget = Budget { deadline: budget.deadline, steps_left: steps_allowed };
    let outcome = search(ops, &mut check_budget);
    budget.steps_left -= steps_allowed - check_budget.steps_left;
    outcome
}

/// `core` with operation `i` relaxed: a read dropped, a write made pending, or dropped
/// outright if no read observes it.
fn relax(core: &[KeyOp], i: usize) -> Vec<KeyOp> {
    let mut relaxed = core.to_vec();
    if observed(core, &core[i]) {
        relaxed[i].ret = None;
    } else {
        relaxed.remove(i);
    }
    relaxed
}

/// Drops the pending writes that no read observes.
fn drop_unobserved_writes(ops: &mut Vec<KeyOp>) {
    let keep: Vec<bool> = (ops.iter()).map(|op| op.ret.is_some() || observed(ops, op)).collect();
    let mut keep = keep.into_iter();
    ops.retain(|_| keep.next().unwrap_or(true));
}

/// Whether `write` is a write, and a read in `ops` that may follow it returned a value
/// containing the value written.
///
/// A write that no read observes never needs to take effect: after a Put or an Append of
/// `w`, the value contains `w` until the next Put, so no read sees the value between the
/// two, and leaving the write out changes no read's output. Dropping such a write is no
/// stricter than letting it take effect at any time after its call, or never.
fn observed(ops: &[KeyOp], write: &KeyOp) -> bool {
    let (Action::Put(written) | Action::Append(written)) = &write.action else {
        return false;
    };
    ops.iter().any(|op| match (&op.action, op.ret) {
        (Action::Get(Some(seen)), Some(ret)) => ret >= write.call && seen.contains(written.as_str()),
        _ => false,
    })
}

/// Replays the longest prefix that the search found, and works out where it got stuck.
fn replay(ops: &[KeyOp], longest: &[usize]) -> (Vec<(KeyOp, Option<String>)>, Stuck) {
    let mut model = Model::new();
    let mut state = StateId::ABSENT;
    let mut linearized = vec![false; ops.len()];
    let mut prefix = Vec::with_capacity(longest.len());
    for &i in longest {
        state = model.step(state, &ops[i].action).expect("the search linearizes only legal steps");
        linearized[i] = true;
        prefix.push((ops[i].clone(), model.value(state).map(str::to_owned)));
    }
    let remaining: Vec<usize> = (0..ops.len()).filter(|&i| !linearized[i]).collect();
    let (due_ret, due) = remaining
        .iter()
        .filter_map(|&i| Some((ops[i].ret?, i)))
        .min()
        .expect("a failed search leaves a returned operation unlinearized");
    let continues = "but no linearization continues from there";
    let mut candidates = Vec::new();
    for &i in remaining.iter().filter(|&&i| ops[i].call <= due_ret) {
        let why = match (model.step(state, &ops[i].action), &ops[i].action) {
            (None, Action::Get(seen)) => format!("it returned {}", show(seen.as_deref())),
            (None, _) => unreachable!("writes always apply"),
            (Some(_), Action::Get(_)) => format!("it fits, {continues}"),
            (Some(next), _) => format!("it makes the value {}, {continues}", show(model.value(next))),
        };
        candidates.push((ops[i].clone(), why));
    }
    let stuck = Stuck { due: ops[due].clone(), value: model.value(state).map(str::to_owned), candidates };
    (prefix, stuck)
}

/// A value for a report: quoted, with the middle of a long one elided.
fn show(value: Option<&str>) -> String {
    let Some(value) = value else {
        return "absent".to_owned();
    };
    let chars = value.chars().count();
    if chars <= REPORT_VALUE_CHARS_MAX {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(REPORT_VALUE_CHARS_MAX / 4).collect();
    let tail_chars = REPORT_VALUE_CHARS_MAX - REPORT_VALUE_CHARS_MAX / 4;
    let tail: String = value.chars().skip(chars - tail_chars).collect();
    format!("{head:?}...{tail:?} ({} bytes)", value.len())
}

impl fmt::Display for KeyOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ret = self.ret.map_or("pending".to_owned(), |ret| ret.to_string());
        write!(f, "#{} client {} [{}, {}] ", self.id, self.client, self.call, ret)?;
        match &self.action {
            Action::Get(seen) => write!(f, "Get -> {}", show(seen.as_deref())),
            Action::Put(value) => write!(f, "Put {}", show(Some(value))),
            Action::Append(value) => write!(f, "Append {}", show(Some(value))),
        }
    }
}

/// Writes one line per item, at most `REPORT_LINES_MAX`.
fn write_lines<T: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    lines: impl ExactSizeIterator<Item = T>,
) -> fmt::Result {
    let len = lines.len();
    for line in lines.take(REPORT_LINES_MAX) {
        writeln!(f, "  {line}")?;
    }
    if len > REPORT_LINES_MAX {
        writeln!(f, "  ... and {} more", len - REPORT_LINES_MAX)?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "no linearization of this key's {} operations ({} search steps; left out: {} \
             pending writes that no read could observe).",
            self.ops_len, self.steps, self.unobserved_len
        )?;
        let (returned, pending): (Vec<&KeyOp>, Vec<&KeyOp>) =
            self.conflict.iter().partition(|op| op.ret.is_some());
        if self.conflict_minimal || returned.len() <= REPORT_LINES_MAX {
            let needed = if self.conflict_minimal {
                "each of them needed"
            } else {
                "minimizing ran out of budget, so some may not be needed"
            };
            writeln!(f, "Still no linearization with only these operations ({needed}):")?;
            write_lines(f, returned.iter())?;
            if !pending.is_empty() {
                writeln!(
                    f,
                    "and these writes that never returned, each of which may take effect at \
                     any time after its call, or never:"
                )?;
                write_lines(f, pending.iter())?;
            }
        } else {
            writeln!(f, "Minimizing ran out of budget with {} operations left.", self.conflict.len())?;
        }

        let shown = self.prefix.len().min(REPORT_LINES_MAX);
        match self.prefix.len() {
            0 => writeln!(f, "No operation can go first.")?,
            len if len == shown => writeln!(f, "Longest linearizable prefix found:")?,
            len => {
                writeln!(f, "Longest linearizable prefix found: {len} operations, the last {shown} of them:")?
            }
        }
        let prefix = &self.prefix[self.prefix.len() - shown..];
        write_lines(f, prefix.iter().map(|(op, value)| format!("{op}  => {}", show(value.as_deref()))))?;
        let Stuck { due, value, candidates } = &self.stuck;
        writeln!(
            f,
            "Then #{} must take effect by its return at {}, but from the value {} nothing can \
             go first:",
            due.id,
            due.ret.expect("due operations have returned"),
            show(value.as_deref())
        )?;
        write_lines(f, candidates.iter().map(|(op, why)| format!("{op}: {why}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_secs(20);

    fn get(client: u64, key: &str, call: u64, ret: u64, seen: Option<&str>) -> Operation {
        Operation {
            client,
            input: KvInput::Get { key: key.to_owned() },
            call,
            ret: Some(ret),
            output: Some(KvOutput::Value(seen.map(str::to_owned))),
        }
    }

    fn put(client: u64, key: &str, value: &str, call: u64, ret: Option<u64>) -> Operation {
        Operation {
            client,
            input: KvInput::Put { key: key.to_owned(), value: value.to_owned() },
            call,
            ret,
            output: ret.map(|_| KvOutput::Ok),
        }
    }

    fn append(client: u64, key: &str, value: &str, call: u64, ret: Option<u64>) -> Operation {
        Operation {
            input: KvInput::Append { key: key.to_owned(), value: value.to_owned() },
            ..put(client, key, value, call, ret)
        }
    }

    fn assert_ok(history: &[Operation]) {
        assert_eq!(check_kv(history, BUDGET), CheckResult::Ok, "{history:#?}");
    }

    /// Asserts that `key` is illegal, and returns the report for it.
    fn assert_illegal(history: &[Operation], key: &str) -> Report {
        match check_kv(history, BUDGET) {
            CheckResult::Illegal { key: k, detail } => {
                assert_eq!(k, key, "{detail}");
                println!("{detail}");
            }
            other => panic!("expected key {key} illegal, got {other:?}"),
        }
        let ops = split_by_key(history).remove(key).unwrap();
        let mut budget = Budget { deadline: None, steps_left: u64::MAX };
        let Verdict::Illegal(report) = check_key(ops, &mut budget) else {
            panic!("check_key disagrees with check_kv")
        };
        // The core must still be illegal.
        assert!(matches!(search(&report.conflict, &mut budget), Outcome::Illegal(_)));
        report
    }

    /// Ids of the operations in a report's conflict that keep their return time.
    fn conflict_ids(report: &Report) -> Vec<usize> {
        let returned = report.conflict.iter().filter(|op| op.ret.is_some());
        returned.map(|op| op.id).collect()
    }

    #[test]
    fn sequential_history_is_linearizable() {
        assert_ok(&[
            get(1, "k", 0, 1, None),
            put(1, "k", "a", 2, Some(3)),
            get(2, "k", 4, 5, Some("a")),
            append(2, "k", "b", 6, Some(7)),
            get(1, "k", 8, 9, Some("ab")),
            put(3, "k", "c", 10, Some(11)),
            append(3, "j", "x", 12, Some(13)),
            get(1, "k", 14, 15, Some("c")),
            get(1, "j", 16, 17, Some("x")),
        ]);
        assert_ok(&[]);
    }

    #[test]
    fn concurrent_writes_may_take_effect_in_either_order() {
        let writes = [put(1, "k", "a", 0, Some(10)), put(2, "k", "b", 5, Some(15))];
        for last in ["a", "b"] {
            let mut history = writes.to_vec();
            history.push(get(3, "k", 20, 21, Some(last)));
            assert_ok(&history);
        }
        // A read concurrent with both may see either, or neither.
        for seen in [None, Some("a"), Some("b")] {
            let mut history = writes.to_vec();
            history.push(get(3, "k", 1, 12, seen));
            assert_ok(&history);
        }
    }

    #[test]
    fn operations_touching_at_one_tick_are_concurrent() {
        assert_ok(&[put(1, "k", "a", 0, Some(10)), get(2, "k", 10, 11, None)]);
    }

    #[test]
    fn stale_read_after_completed_write_is_illegal() {
        let report = assert_illegal(
            &[
                put(1, "k", "a", 0, Some(10)),
                put(2, "k", "b", 20, Some(30)),
                get(3, "k", 40, 50, Some("a")),
                get(1, "k", 60, 70, Some("b")),
            ],
            "k",
        );
        assert_eq!(conflict_ids(&report), [0, 1, 2]);
        assert_eq!(report.stuck.due.id, 2);
    }

    #[test]
    fn read_of_value_never_written_is_illegal() {
        let report = assert_illegal(
            &[put(1, "k", "a", 0, Some(10)), get(2, "k", 5, 15, Some("z")), put(1, "k", "b", 20, Some(30))],
            "k",
        );
        assert_eq!(conflict_ids(&report), [1]);
    }

    #[test]
    fn appends_seen_out_of_real_time_order_are_illegal() {
        assert_illegal(
            &[
                append(1, "k", "x", 0, Some(10)),
                append(2, "k", "y", 20, Some(30)),
                get(3, "k", 40, 50, Some("yx")),
            ],
            "k",
        );
        // Had the appends overlapped, either order would do.
        assert_ok(&[
            append(1, "k", "x", 0, Some(30)),
            append(2, "k", "y", 10, Some(20)),
            get(3, "k", 40, 50, Some("yx")),
        ]);
    }

    #[test]
    fn pending_write_may_take_effect_late_or_never() {
        // Observed long after its call.
        assert_ok(&[put(1, "k", "x", 10, None), get(2, "k", 20, 30, None), get(2, "k", 40, 50, Some("x"))]);
        // Never observed.
        assert_ok(&[put(1, "k", "x", 10, None), get(2, "k", 20, 30, None)]);
        // A pending read constrains nothing.
        assert_ok(&[Operation { ret: None, output: None, ..get(1, "k", 0, 0, None) }]);
    }

    #[test]
    fn pending_write_observed_before_its_call_is_illegal() {
        assert_illegal(&[get(2, "k", 0, 5, Some("x")), put(1, "k", "x", 10, None)], "k");
    }

    #[test]
    fn pending_write_cannot_be_undone() {
        let report = assert_illegal(
            &[put(1, "k", "x", 10, None), get(2, "k", 20, 30, Some("x")), get(2, "k", 40, 50, None)],
            "k",
        );
        assert_eq!(conflict_ids(&report), [1, 2]);
        assert_eq!(report.conflict.len(), 3, "the pending write is context");
    }

    #[test]
    fn budget_exhausted_is_a_timeout() {
        // Concurrent appends, then a read no order explains: the search must try them all.
        let mut history: Vec<Operation> =
            (0..16).map(|i| append(i, "k", &format!("v{i};"), 0, Some(100))).collect();
        history.push(get(99, "k", 200, 201, Some("nope")));
        let result = check_kv(&history, Duration::ZERO);
        assert_eq!(result, CheckResult::Timeout { key: "k".to_owned() });
    }

    #[test]
    #[should_panic(expected = "returned nothing")]
    fn returned_operation_without_output_is_a_bug() {
        let op = Operation { output: None, ..get(1, "k", 0, 1, None) };
        check_kv(&[op], BUDGET);
    }

    /// `SplitMix64`: a seeded generator, so that a failing seed reproduces.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        }
    }

    /// A history that is linearizable by construction. Each client runs its operations
    /// one after another; each takes effect at a random instant inside its interval, and
    /// the outputs come from applying them in that order to a `BTreeMap`. One operation in
    /// twenty never returns, and took effect or not.
    fn generate(seed: u64, clients: u64, ops_per_client: u64, keys: u64) -> Vec<Operation> {
        struct Planned {
            at: u64,
            takes_effect: bool,
            op: Operation,
        }
        let mut rng = Rng(seed);
        let mut planned = Vec::new();
        for client in 0..clients {
            let mut now = rng.below(10);
            for n in 0..ops_per_client {
                let call = now + rng.below(5);
                let at = call + rng.below(30);
                let ret = at + rng.below(30);
                let key = format!("k{}", rng.below(keys));
                let value = format!("c{client}.{n};");
                let input = match rng.below(10) {
                    0..=3 => KvInput::Get { key },
                    4..=5 => KvInput::Put { key, value },
                    _ => KvInput::Append { key, value },
                };
                let returns = rng.below(20) != 0;
                planned.push(Planned {
                    at,
                    takes_effect: returns || rng.below(2) == 0,
                    op: Operation { client, input, call, ret: returns.then_some(ret), output: None },
                });
                now = ret + 1;
            }
        }
        planned.sort_by_key(|p| (p.at, p.op.client));
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        let mut history = Vec::new();
        for Planned { takes_effect, mut op, .. } in planned {
            let output = match &op.input {
                _ if !takes_effect => None,
                KvInput::Get { key } => Some(KvOutput::Value(map.get(key).cloned())),
                KvInput::Put { key, value } => {
                    map.insert(key.clone(), value.clone());
                    Some(KvOutput::Ok)
                }
                KvInput::Append { key, value } => {
                    map.entry(key.clone()).or_default().push_str(value);
                    Some(KvOutput::Ok)
                }
            };
            op.output = output.filter(|_| op.ret.is_some());
            history.push(op);
        }
        history.sort_by_key(|op| op.call);
        history
    }

    #[test]
    fn generated_history_is_linearizable_and_checks_fast() {
        for seed in 0..20 {
            let history = generate(seed, 10, 20, 5);
            let start = Instant::now();
            let result = check_kv(&history, BUDGET);
            let elapsed = start.elapsed();
            assert_eq!(result, CheckResult::Ok, "seed {seed}");
            assert!(elapsed < Duration::from_secs(1), "seed {seed}: {elapsed:?}");
        }
    }

    #[test]
    fn corrupted_read_is_illegal() {
        for seed in 0..20 {
            let mut history = generate(seed, 10, 20, 5);
            let reads: Vec<usize> = (0..history.len())
                .filter(|&i| matches!(history[i].output, Some(KvOutput::Value(_))))
                .collect();
            let victim = reads[Rng(seed).below(reads.len() as u64) as usize];
            history[victim].output = Some(KvOutput::Value(Some("never written".to_owned())));
            let key = history[victim].input.key().to_owned();
            let report = assert_illegal(&history, &key);
            assert_eq!(conflict_ids(&report), [victim], "seed {seed}");
            assert!(report.conflict_minimal, "seed {seed}");
            assert!(report.to_string().contains(&format!("#{victim} client")));
        }
    }

    /// The definition, by brute force: is there an order of the operations that respects
    /// real time, includes every operation that returned and gives it its output, and
    /// includes pending ones or not?
    fn linearizable_by_brute_force(ops: &[KeyOp]) -> bool {
        fn extend(ops: &[KeyOp], done: &mut [bool], value: Option<String>) -> bool {
            if (ops.iter().zip(done.iter())).all(|(op, &done)| done || op.ret.is_none()) {
                return true;
            }
            for i in 0..ops.len() {
                let returned_before =
                    |(op, &done): (&KeyOp, &bool)| !done && op.ret.is_some_and(|ret| ret < ops[i].call);
                if done[i] || ops.iter().zip(done.iter()).any(returned_before) {
                    continue;
                }
                let next = match &ops[i].action {
                    Action::Get(seen) if *seen != value => continue,
                    Action::Get(_) => value.clone(),
                    Action::Put(written) => Some(written.clone()),
                    Action::Append(written) => Some(value.clone().unwrap_or_default() + written),
                };
                done[i] = true;
                if extend(ops, done, next) {
                    return true;
                }
                done[i] = false;
            }
            false
        }
        extend(ops, &mut vec![false; ops.len()], None)
    }

    /// Small histories on one key whose values collide and contain one another, with
    /// reads that are right or, now and then, picked at random.
    fn small_history(rng: &mut Rng) -> Vec<Operation> {
        const VALUES: [&str; 4] = ["a", "b", "ab", ""];
        let len = 1 + rng.below(7);
        let mut planned: Vec<(u64, bool, Operation)> = (0..len)
            .map(|client| {
                let call = rng.below(20);
                let ret = call + rng.below(10);
                let at = call + rng.below(ret - call + 1);
                let value = VALUES[rng.below(4) as usize].to_owned();
                let key = "k".to_owned();
                let input = match rng.below(3) {
                    0 => KvInput::Get { key },
                    1 => KvInput::Put { key, value },
                    _ => KvInput::Append { key, value },
                };
                let returns = rng.below(6) != 0;
                let takes_effect = returns || rng.below(2) == 0;
                let ret = returns.then_some(ret);
                let op = Operation { client, input, call, ret, output: None };
                (at, takes_effect, op)
            })
            .collect();
        planned.sort_by_key(|(at, _, op)| (*at, op.client));
        let mut value: Option<String> = None;
        for (_, takes_effect, op) in &mut planned {
            let output = match &op.input {
                KvInput::Get { .. } if rng.below(4) == 0 => {
                    let random = ["a", "b", "ab", "ba", "aab", ""][rng.below(6) as usize];
                    KvOutput::Value((rng.below(5) != 0).then(|| random.to_owned()))
                }
                KvInput::Get { .. } => KvOutput::Value(value.clone()),
                _ if !*takes_effect => KvOutput::Ok,
                KvInput::Put { value: written, .. } => {
                    value = Some(written.clone());
                    KvOutput::Ok
                }
                KvInput::Append { value: written, .. } => {
                    value = Some(value.unwrap_or_default() + written);
                    KvOutput::Ok
                }
            };
            op.output = op.ret.map(|_| output);
        }
        planned.into_iter().map(|(_, _, op)| op).collect()
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let mut rng = Rng(7);
        let (mut legal, mut illegal) = (0, 0);
        for case in 0..5000 {
            let history = small_history(&mut rng);
            let Some(ops) = split_by_key(&history).remove("k") else {
                continue;
            };
            let expected = linearizable_by_brute_force(&ops);
            match check_kv(&history, BUDGET) {
                CheckResult::Ok => {
                    assert!(expected, "case {case}: {history:#?}");
                    legal += 1;
                }
                CheckResult::Illegal { .. } => {
                    assert!(!expected, "case {case}: {history:#?}");
                    illegal += 1;
                    let mut budget = Budget { deadline: None, steps_left: u64::MAX };
                    let Verdict::Illegal(report) = check_key(ops, &mut budget) else { unreachable!() };
                    let conflict = &report.conflict;
                    assert!(!linearizable_by_brute_force(conflict), "case {case}");
                    assert!(report.conflict_minimal, "case {case}");
                    for i in 0..conflict.len() {
                        if conflict[i].ret.is_some() {
                            let relaxed = relax(conflict, i);
                            assert!(linearizable_by_brute_force(&relaxed), "case {case}: {i}");
                        }
                    }
                }
                CheckResult::Timeout { .. } => panic!("case {case} timed out"),
            }
        }
        assert!(legal > 2000 && illegal > 500, "{legal} legal, {illegal} illegal");
    }
}
