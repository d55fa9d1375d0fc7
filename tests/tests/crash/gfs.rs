//! Scenario 7: GFS record appends while a chunkserver and then the master leader die.

use crate::Run;
use cluster_tests::gfs::{
    append_in_background, assert_each_once, join_all, read_all, wait_acked, Appenders, Cluster, Options,
};
use rand::Rng;
use std::sync::Arc;

/// Scenario 7: Kill a chunkserver mid-append (the primary of the chunk being appended to), then
/// the master leader: every append succeeds, and each acknowledged record reads back
/// exactly once.
pub fn kill_mid_append(run: &mut Run) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut rng = run.rng();
    rt.block_on(async {
        let mut c = Cluster::start(Options { chunkservers: 4, ..Options::default() });
        c.wait_ready().await;
        let client = Arc::new(c.client());
        client.create("/log").await.expect("create /log");
        let len = rng.gen_range(500..3000);
        let Appenders { tasks, acked, sent } = append_in_background(client.clone(), "/log", 4, 200, len);
        wait_acked(&c, &acked, rng.gen_range(20..200)).await;
        let info = c.lookup("/log").await;
        let last = info.chunks.last().expect("a chunk");
        let victim =
            last.replicas.iter().find(|r| r.server == last.primary).unwrap_or(&last.replicas[0]).addr.clone();
        c.kill_chunkserver(c.cs_index(&victim));
        run.fault(format!("SIGKILL chunkserver {victim} (primary)"));
        let done = acked.lock().expect("acked").len();
        wait_acked(&c, &acked, done + rng.gen_range(20..200)).await;
        let leader = c.leader().await.expect("a master leader");
        c.kill_master(leader);
        run.fault(format!("SIGKILL master leader {leader}"));
        join_all(&c, tasks).await;
        let acked = acked.lock().expect("acked").clone();
        assert_eq!(acked.len(), 800, "appends lost");
        assert_each_once(&acked, &sent, &read_all(&c, "/log").await);
        run.checked(acked.len() as u64);
        c.assert_no_unexpected_errors(&[]);
    });
}
