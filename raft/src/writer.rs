//! A node's disk on a thread of its own, so that the driver goes on taking requests and
//! messages while the log syncs (etcd's asynchronous storage writes).
//!
//! The driver hands over [`Job`]s; the thread does them in the order given, and takes
//! every job that queued up while it was busy into one fsync (group commit). Each job
//! comes back as a [`Done`] in the same order, with the messages that had to wait for it
//! (votes, acknowledgements), and the driver is woken through a [`Notify`].

use crate::disk::{DiskError, NodeDisk};
use crate::{Index, Message, Ready, Snapshot, Term};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use tokio::sync::Notify;

/// Most jobs taken into one fsync.
const JOBS_PER_SYNC_MAX: usize = 1024;

/// Work for the disk thread.
pub(crate) enum Job {
    /// Persist a Ready's snapshot, entries and hard state, then hand back `late`.
    Persist {
        /// The parts of the Ready that go to disk.
        rd: Ready,
        /// The messages that may be sent only once `rd` is durable.
        late: Vec<Message>,
    },
    /// Store a snapshot the node took itself and drop the log it covers.
    Compact(Snapshot),
}

/// A job done.
pub(crate) struct Done {
    /// The last entry the job made durable, if it held entries.
    pub(crate) last: Option<(Index, Term)>,
    /// The messages that waited for it.
    pub(crate) late: Vec<Message>,
}

impl Job {
    fn done(self) -> Done {
        match self {
            Job::Persist { rd, late } => Done { last: rd.entries.last().map(|e| (e.index, e.term)), late },
            Job::Compact(_) => Done { last: None, late: Vec::new() },
        }
    }
}

/// The driver's side of the disk thread.
pub(crate) struct Writer {
    /// `None` once dropped, which ends the thread.
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Result<Done, DiskError>>,
    wake: Arc<Notify>,
    /// Jobs handed over and not yet taken back as done.
    in_flight: usize,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread that owns `disk`.
    pub(crate) fn start(disk: NodeDisk) -> std::io::Result<Writer> {
        let (jobs, jobs_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let wake = Arc::new(Notify::new());
        let notify = wake.clone();
        let thread = std::thread::Builder::new()
            .name("raft-disk".into())
            .spawn(move || run(disk, jobs_rx, done_tx, notify))?;
        Ok(Writer { jobs: Some(jobs), done, wake, in_flight: 0, thread: Some(thread) })
    }

    /// Notified whenever jobs are done.
    pub(crate) fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Jobs handed over and not yet taken back.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Hands a job to the thread.
    pub(crate) fn submit(&mut self, job: Job) -> Result<(), DiskError> {
        let sent = self.jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            return Err(gone());
        }
        self.in_flight += 1;
        Ok(())
    }

    /// The next job done, if one is.
    pub(crate) fn try_done(&mut self) -> Option<Result<Done, DiskError>> {
        if self.in_flight == 0 {
            return None;
        }
        match self.done.try_recv() {
            Ok(done) => Some(self.took(done)),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(Err(gone())),
        }
    }

    /// Waits for the next job to be done (blocks the thread). `None` if none is in flight.
    pub(crate) fn wait_done(&mut self) -> Option<Result<Done, DiskError>> {
        if self.in_flight == 0 {
            return None;
        }
        Some(match self.done.recv() {
            Ok(done) => self.took(done),
            Err(_) => Err(gone()),
        })
    }

    fn took(&mut self, done: Result<Done, DiskError>) -> Result<Done, DiskError> {
        if done.is_ok() {
            self.in_flight -= 1;
        }
        done
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has finished its batch; wait for that,
        // so that the files are closed before anyone opens them again.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn gone() -> DiskError {
    DiskError::Storage(storage::StorageError::Io {
        context: "raft disk thread".into(),
        source: std::io::Error::other("the disk thread stopped after a failure"),
    })
}

/// The disk thread: jobs in order, one fsync for all that queued up meanwhile. Stops at
/// the first failure (reported once), or when the driver drops its side.
fn run(
    mut disk: NodeDisk,
    jobs: mpsc::Receiver<Job>,
    done: mpsc::Sender<Result<Done, DiskError>>,
    wake: Arc<Notify>,
) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < JOBS_PER_SYNC_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = batch
            .iter()
            .try_for_each(|job| match job {
                Job::Persist { rd, .. } => disk.write(rd),
                Job::Compact(snapshot) => disk.compact(snapshot),
            })
            .and_then(|()| disk.sync());
        let failed = result.is_err();
        match result {
            Ok(()) => batch.into_iter().for_each(|job| {
                let _ = done.send(Ok(job.done()));
            }),
            Err(e) => {
                let _ = done.send(Err(e));
            }
        }
        wake.notify_one();
        if failed {
            return;
        }
    }
}
