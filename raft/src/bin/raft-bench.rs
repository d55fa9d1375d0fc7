//! `raft-bench`: a put load generator for a `raft-kv serve` cluster, or for an etcd
//! cluster as the yardstick (`scripts/bench-raft.sh` runs both and compares them).
//!
//! ```text
//! raft-bench --cluster 1=127.0.0.1:7201,2=127.0.0.1:7202,3=127.0.0.1:7203 --clients 16 --value-bytes 1024
//! raft-bench --etcd http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793 --clients 16
//! ```
//!
//! Each of `--clients` tasks owns its own client (its own connections) and puts unique
//! keys back to back: first for a warm-up, then for `--seconds`. Only puts that start and
//! finish inside the measured window count. One line reports the throughput and the
//! commit latency a client sees (request sent to answer received):
//!
//! ```text
//! target=raft clients=16 value_bytes=1024 ops=9000 ops_per_s=3000.0 mib_per_s=2.93 p50_ms=5.120 p99_ms=9.870 errors=0
//! ```
//!
//! etcd's load goes to its leader, as ours does (a follower would forward each put to it).

use anyhow::{bail, ensure, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use raft::kv_service::KvClient;
use raft::NodeId;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::time::Instant as TokioInstant;
use tonic::transport::{Channel, Endpoint};

/// Most concurrent clients.
const CLIENTS_MAX: usize = 4096;
/// Largest value (well under both servers' message limits).
const VALUE_BYTES_MAX: usize = 1 << 20;
/// How long one put may take (retries included) before it counts as an error.
const PUT_DEADLINE: Duration = Duration::from_secs(10);
/// How long to look for etcd's leader.
const LEADER_WAIT: Duration = Duration::from_secs(15);
/// Latencies above this are clamped into the histogram's top bucket.
const LATENCY_US_MAX: u64 = 60_000_000;

#[derive(Parser)]
#[command(name = "raft-bench", about = "Put load on a raft-kv (or etcd) cluster: throughput and latency")]
struct Args {
    /// raft-kv nodes as ID=HOST:PORT, comma-separated.
    #[arg(long, required_unless_present = "etcd", conflicts_with = "etcd")]
    cluster: Option<String>,
    /// etcd client URLs, comma-separated; the load goes to the leader among them.
    #[arg(long)]
    etcd: Option<String>,
    /// Concurrent clients, each with its own connections.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Bytes of each value.
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Length of the measured window.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Load before the measured window (connections, leader discovery, caches).
    #[arg(long, default_value_t = 1)]
    warmup_seconds: u64,
    /// Print the result as one JSON object instead of key=value pairs.
    #[arg(long)]
    json: bool,
}

fn parse_cluster(s: &str) -> anyhow::Result<BTreeMap<NodeId, String>> {
    raft::cluster::parse_cluster(s).map_err(anyhow::Error::msg)
}

/// The two calls of etcd's v3 gRPC API the benchmark needs, written out by hand with
/// the field numbers of etcd's `rpc.proto` (unknown fields of the answers are skipped),
/// so that neither protoc nor an etcd client crate is needed.
mod etcd {
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::transport::Channel;
    use tonic::Status;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        #[prost(int64, tag = "3")]
        pub revision: i64,
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }

    /// `etcdserverpb.PutRequest` without lease, prev_kv and the ignore flags.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}

    /// `etcdserverpb.StatusResponse`, through `leader`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(int64, tag = "3")]
        pub db_size: i64,
        #[prost(uint64, tag = "4")]
        pub leader: u64,
    }

    async fn unary<Req, Resp>(channel: &Channel, path: &'static str, request: Req) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
        let codec = tonic::codec::ProstCodec::default();
        let response =
            grpc.unary(tonic::Request::new(request), PathAndQuery::from_static(path), codec).await?;
        Ok(response.into_inner())
    }

    /// `KV.Put`.
    pub async fn put(channel: &Channel, key: Vec<u8>, value: Vec<u8>) -> Result<PutResponse, Status> {
        unary(channel, "/etcdserverpb.KV/Put", PutRequest { key, value }).await
    }

    /// `Maintenance.Status` of the member behind `channel`.
    pub async fn status(channel: &Channel) -> Result<StatusResponse, Status> {
        unary(channel, "/etcdserverpb.Maintenance/Status", StatusRequest {}).await
    }
}

/// A connection to etcd at `url` (one HTTP/2 connection per channel).
async fn etcd_channel(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad etcd url {url:?}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(PUT_DEADLINE)
        .connect()
        .await
        .with_context(|| format!("connect to etcd at {url}"))
}

/// The client URL of the etcd member that leads, asking each member in turn until one
/// says so or `LEADER_WAIT` has passed (a cluster that was just started may still elect).
async fn etcd_leader(urls: &[String]) -> anyhow::Result<String> {
    let start = Instant::now();
    let mut last_error = String::from("no member leads");
    while start.elapsed() < LEADER_WAIT {
        for url in urls {
            let status = match etcd_channel(url).await {
                Ok(channel) => etcd::status(&channel).await.map_err(|e| e.message().to_string()),
                Err(e) => Err(format!("{e:#}")),
            };
            match status {
                Ok(s) if s.leader != 0 && s.header.as_ref().is_some_and(|h| h.member_id == s.leader) => {
                    return Ok(url.clone());
                }
                Ok(_) => {}
                Err(e) => last_error = format!("{url}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("no etcd member among {urls:?} led within {LEADER_WAIT:?} (last: {last_error})")
}

/// One load-generating client.
enum Client {
    Raft(Box<KvClient>),
    Etcd(Channel),
}

impl Client {
    async fn put(&mut self, key: String, value: &str) -> Result<(), String> {
        match self {
            Client::Raft(c) => c.put(&key, value).await.map_err(|e| e.to_string()),
            Client::Etcd(channel) => etcd::put(channel, key.into_bytes(), value.as_bytes().to_vec())
                .await
                .map(|_| ())
                .map_err(|e| e.message().to_string()),
        }
    }
}

/// What one client did inside the measured window.
struct Tally {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    latency_us: Histogram<u64>,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Puts `bench/RUN/CLIENT/N` keys back to back until `end`, counting the puts that start
/// at or after `measure_from` and finish by `end`.
async fn run_client(
    mut client: Client,
    key_prefix: String,
    value: std::sync::Arc<str>,
    measure_from: TokioInstant,
    end: TokioInstant,
) -> Tally {
    let mut tally = Tally { ops: 0, errors: 0, first_error: None, latency_us: new_histogram() };
    let mut n: u64 = 0;
    loop {
        let started = TokioInstant::now();
        if started >= end {
            break;
        }
        n += 1;
        let result = client.put(format!("{key_prefix}/{n}"), &value).await;
        let finished = TokioInstant::now();
        if started < measure_from || finished > end {
            continue;
        }
        match result {
            Ok(()) => {
                let us = u64::try_from((finished - started).as_micros()).unwrap_or(u64::MAX);
                tally.latency_us.saturating_record(us.clamp(1, LATENCY_US_MAX));
                tally.ops += 1;
            }
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
            }
        }
    }
    tally
}

/// The benchmark's result.
struct Report {
    target: &'static str,
    clients: usize,
    value_bytes: usize,
    ops: u64,
    seconds: f64,
    errors: u64,
    latency_us: Histogram<u64>,
}

impl Report {
    /// Name and value of each figure, in print order (`target` is the only string).
    fn fields(&self) -> Vec<(&'static str, String)> {
        let ops_per_s = self.ops as f64 / self.seconds;
        let mib_per_s = ops_per_s * self.value_bytes as f64 / f64::from(1 << 20);
        let ms = |q: f64| self.latency_us.value_at_quantile(q) as f64 / 1000.0;
        vec![
            ("target", self.target.to_string()),
            ("clients", self.clients.to_string()),
            ("value_bytes", self.value_bytes.to_string()),
            ("ops", self.ops.to_string()),
            ("ops_per_s", format!("{ops_per_s:.1}")),
            ("mib_per_s", format!("{mib_per_s:.2}")),
            ("p50_ms", format!("{:.3}", ms(0.50))),
            ("p99_ms", format!("{:.3}", ms(0.99))),
            ("errors", self.errors.to_string()),
        ]
    }

    fn line(&self) -> String {
        self.fields().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    }

    fn json(&self) -> String {
        let fields: Vec<String> = self
            .fields()
            .into_iter()
            .map(|(k, v)| if k == "target" { format!("\"{k}\":\"{v}\"") } else { format!("\"{k}\":{v}") })
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!((1..=CLIENTS_MAX).contains(&args.clients), "--clients must be 1..={CLIENTS_MAX}");
    ensure!(args.value_bytes <= VALUE_BYTES_MAX, "--value-bytes must be at most {VALUE_BYTES_MAX}");
    ensure!(args.seconds > 0, "--seconds must be positive");

    let (target, mut clients) = match (&args.cluster, &args.etcd) {
        (Some(cluster), _) => {
            let nodes = parse_cluster(cluster)?;
            let clients = (0..args.clients)
                .map(|_| {
                    let mut c = KvClient::new(nodes.clone());
                    c.deadline = PUT_DEADLINE;
                    Client::Raft(Box::new(c))
                })
                .collect::<Vec<_>>();
            ("raft", clients)
        }
        (None, Some(urls)) => {
            let urls: Vec<String> =
                urls.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
            let leader = etcd_leader(&urls).await?;
            eprintln!("raft-bench: etcd leader is {leader}");
            let mut clients = Vec::with_capacity(args.clients);
            for _ in 0..args.clients {
                clients.push(Client::Etcd(etcd_channel(&leader).await?));
            }
            ("etcd", clients)
        }
        (None, None) => bail!("give --cluster or --etcd"),
    };

    let run: u32 = rand::random();
    let value: std::sync::Arc<str> = "x".repeat(args.value_bytes).into();
    let measure_from = TokioInstant::now() + Duration::from_secs(args.warmup_seconds);
    let end = measure_from + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = clients
        .drain(..)
        .enumerate()
        .map(|(i, c)| {
            let prefix = format!("bench/{run:08x}/{i}");
            tokio::spawn(run_client(c, prefix, value.clone(), measure_from, end))
        })
        .collect();

    let wall = Instant::now();
    let mut report = Report {
        target,
        clients: args.clients,
        value_bytes: args.value_bytes,
        ops: 0,
        seconds: args.seconds as f64,
        errors: 0,
        latency_us: new_histogram(),
    };
    let mut first_error = None;
    for task in tasks {
        let tally = task.await.context("join a client task")?;
        report.ops += tally.ops;
        report.errors += tally.errors;
        report.latency_us.add(&tally.latency_us).context("merge latency histograms")?;
        first_error = first_error.or(tally.first_error);
    }
    if let Some(e) = first_error {
        eprintln!("raft-bench: {} puts failed; the first: {e}", report.errors);
    }
    warn_overrun(wall.elapsed(), args.warmup_seconds + args.seconds);
    println!("{}", if args.json { report.json() } else { report.line() });
    ensure!(report.ops > 0, "no put succeeded in the measured window");
    Ok(())
}

/// Warns when the clients overran the run (puts that hung past the end, up to their
/// deadline): the figures are then only for the puts that finished in time.
fn warn_overrun(elapsed: Duration, planned_secs: u64) {
    let overrun = elapsed.saturating_sub(Duration::from_secs(planned_secs));
    if overrun > Duration::from_secs(1) {
        eprintln!("raft-bench: clients ran {overrun:?} past the end waiting for their last puts");
    }
}
