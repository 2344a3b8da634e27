//! A fenced write against the same write unfenced, same store, same run, on servers this bench
//! starts on free loopback ports: Redis (`SET` against `RedisFence::set`) and, with the
//! `postgres` feature, PostgreSQL (an `UPDATE` in a transaction against the same `UPDATE` in
//! a `PgFence::transaction`, and through `PgFence::execute`).
//!
//! Run: `cargo bench --bench fenced` (Redis), with `--features etcd` for etcd (a `put`
//! against the same `put` in `EtcdFence::run`) and `--features postgres` for PostgreSQL. Issue 19's target is a ratio
//! (fenced / unfenced time per write) of at most 1.2.
//!
//! Each store's two writes take turns in rounds (the order alternating each round), each
//! round `OPS` writes back to back on one connection by `TASKS` tasks; the figure is the
//! median of the rounds' time per write. Not criterion: the figure that matters is the ratio
//! of two clients measured in one run, interleaved, which criterion's one-function-at-a-time
//! sampling does not give.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold::RedisFence;
use leasehold_test_support::RedisServer;

const ROUNDS: usize = 11;
const OPS: usize = 2_000;

/// Runs `ops` calls of `write` spread over `tasks` tasks; returns the time per call.
async fn round<F, Fut>(tasks: usize, ops: usize, write: F) -> Duration
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let write = Arc::new(write);
    let started = Instant::now();
    let mut running = Vec::new();
    for task in 0..tasks {
        let write = write.clone();
        running.push(tokio::spawn(async move {
            for i in 0..ops / tasks {
                write(task, i).await;
            }
        }));
    }
    for task in running {
        task.await.unwrap();
    }
    started.elapsed() / ops as u32
}

fn median(mut figures: Vec<Duration>) -> Duration {
    figures.sort();
    figures[figures.len() / 2]
}

/// Measures `plain` and `fenced` in alternating rounds and prints one line.
async fn compare<P, PF, F, FF>(store: &str, tasks: usize, plain: P, fenced: F)
where
    P: Fn(usize, usize) -> PF + Clone + Send + Sync + 'static,
    PF: Future<Output = ()> + Send,
    F: Fn(usize, usize) -> FF + Clone + Send + Sync + 'static,
    FF: Future<Output = ()> + Send,
{
    // A warm-up round of each: connections, script loads, prepared statements.
    round(tasks, OPS / 4, plain.clone()).await;
    round(tasks, OPS / 4, fenced.clone()).await;
    let (mut plains, mut fences) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        if r % 2 == 0 {
            plains.push(round(tasks, OPS, plain.clone()).await);
            fences.push(round(tasks, OPS, fenced.clone()).await);
        } else {
            fences.push(round(tasks, OPS, fenced.clone()).await);
            plains.push(round(tasks, OPS, plain.clone()).await);
        }
    }
    let (plain, fenced) = (median(plains), median(fences));
    println!(
        "{store:<14} {tasks:>5} {:>12.1} {:>12.1} {:>7.2}",
        plain.as_secs_f64() * 1e6,
        fenced.as_secs_f64() * 1e6,
        fenced.as_secs_f64() / plain.as_secs_f64()
    );
}

async fn redis(tasks: usize) {
    let server = RedisServer::start();
    let conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // One resource per task, so tasks do not contend on a key (neither write would).
    let fences: Arc<Vec<RedisFence>> = Arc::new(
        (0..tasks)
            .map(|t| RedisFence::new(format!("bench:{t}")))
            .collect(),
    );
    let plain = {
        let (conn, fences) = (conn.clone(), fences.clone());
        move |task: usize, i: usize| {
            let (mut conn, fences) = (conn.clone(), fences.clone());
            async move {
                let _: () = redis::cmd("SET")
                    .arg(fences[task].key())
                    .arg(i)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }
    };
    let fenced = {
        let (conn, fences) = (conn.clone(), fences.clone());
        move |task: usize, i: usize| {
            let (mut conn, fences) = (conn.clone(), fences.clone());
            async move {
                fences[task].set(&mut conn, 7, i).await.unwrap();
            }
        }
    };
    compare("redis", tasks, plain, fenced).await;
}

/// One transaction per write, each task on a client of its own (a transaction borrows its
/// client), the `UPDATE` prepared once per client: plain is `BEGIN`, `UPDATE`, `COMMIT`;
/// "postgres tx" is `PgFence::transaction` (`BEGIN`, the fence upsert), the same `UPDATE`,
/// `COMMIT`; "postgres pipe" is `PgFence::execute`, which sends the fence upsert and the
/// `UPDATE` together.
#[cfg(feature = "postgres")]
async fn postgres(tasks: usize) {
    use leasehold::PgFence;
    use leasehold_test_support::PostgresServer;
    use tokio::sync::Mutex;

    let server = PostgresServer::start();
    let fence = Arc::new(PgFence::new());
    let mut clients = Vec::new();
    for task in 0..tasks {
        let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        if task == 0 {
            fence.create_table(&client).await.unwrap();
            client
                .batch_execute("CREATE TABLE bench (name text PRIMARY KEY, value bigint)")
                .await
                .unwrap();
        }
        client
            .execute(
                "INSERT INTO bench (name, value) VALUES ($1, 0)",
                &[&format!("bench:{task}")],
            )
            .await
            .unwrap();
        let update = client
            .prepare("UPDATE bench SET value = $1 WHERE name = $2")
            .await
            .unwrap();
        clients.push(Mutex::new((client, update)));
    }
    let clients = Arc::new(clients);
    let plain = {
        let clients = clients.clone();
        move |task: usize, i: usize| {
            let clients = clients.clone();
            async move {
                let mut guard = clients[task].lock().await;
                let (client, update) = &mut *guard;
                let tx = client.transaction().await.unwrap();
                let (name, value) = (format!("bench:{task}"), i as i64);
                tx.execute(&*update, &[&value, &name]).await.unwrap();
                tx.commit().await.unwrap();
            }
        }
    };
    let in_transaction = {
        let (clients, fence) = (clients.clone(), fence.clone());
        move |task: usize, i: usize| {
            let (clients, fence) = (clients.clone(), fence.clone());
            async move {
                let mut guard = clients[task].lock().await;
                let (client, update) = &mut *guard;
                let (name, value) = (format!("bench:{task}"), i as i64);
                let tx = fence.transaction(client, &name, 7).await.unwrap();
                tx.execute(&*update, &[&value, &name]).await.unwrap();
                tx.commit().await.unwrap();
            }
        }
    };
    let pipelined = {
        let (clients, fence) = (clients.clone(), fence.clone());
        move |task: usize, i: usize| {
            let (clients, fence) = (clients.clone(), fence.clone());
            async move {
                let mut guard = clients[task].lock().await;
                let (client, update) = &mut *guard;
                let (name, value) = (format!("bench:{task}"), i as i64);
                fence
                    .execute(client, &name, 7, &[(&*update, &[&value, &name])])
                    .await
                    .unwrap();
            }
        }
    };
    compare("postgres tx", tasks, plain.clone(), in_transaction).await;
    compare("postgres pipe", tasks, plain, pipelined).await;
}

/// A `put` against `EtcdFence::run` with the same `put`, each task on a key of its own,
/// all on one client (etcd-client multiplexes requests on one gRPC channel).
#[cfg(feature = "etcd")]
async fn etcd(tasks: usize) {
    use etcd_client::TxnOp;
    use leasehold::EtcdFence;
    use leasehold_test_support::EtcdServer;

    let server = EtcdServer::start();
    let kv = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap()
        .kv_client();
    let fences: Arc<Vec<EtcdFence>> = Arc::new(
        (0..tasks)
            .map(|t| EtcdFence::new(format!("bench/{t}/fence")))
            .collect(),
    );
    let plain = {
        let kv = kv.clone();
        move |task: usize, i: usize| {
            let mut kv = kv.clone();
            async move {
                kv.put(format!("bench/{task}"), i.to_string(), None)
                    .await
                    .unwrap();
            }
        }
    };
    let fenced = {
        let (kv, fences) = (kv.clone(), fences.clone());
        move |task: usize, i: usize| {
            let (mut kv, fences) = (kv.clone(), fences.clone());
            async move {
                let put = TxnOp::put(format!("bench/{task}"), i.to_string(), None);
                fences[task].run(&mut kv, 7, [put]).await.unwrap();
            }
        }
    };
    compare("etcd", tasks, plain, fenced).await;
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; a filter or `--quick` is accepted and ignored.
    println!(
        "{:<14} {:>5} {:>12} {:>12} {:>7}",
        "store", "tasks", "plain µs/op", "fenced µs/op", "ratio"
    );
    for tasks in [1, 16] {
        redis(tasks).await;
    }
    #[cfg(feature = "etcd")]
    for tasks in [1, 16] {
        etcd(tasks).await;
    }
    #[cfg(feature = "postgres")]
    for tasks in [1, 4] {
        postgres(tasks).await;
    }
}
