//! flock and POSIX record locks between two machines (two clients of one in-memory file
//! system, mounted by one `frangipani mount-memory`), through the lock service.

mod common;

use common::{fuse_available, Mount};

#[test]
fn file_locks_hold_across_two_memory_clients() {
    if !fuse_available("file_locks_hold_across_two_memory_clients") {
        return;
    }
    let m = Mount::start_clients(2);
    common::file_locks_hold_across_machines(m.dir_of(0), m.dir_of(1), &m.scratch());
    m.stop();
}
