//! kiln-store's behaviour, one suite run against both stores: a real SQLite file and a real
//! PostgreSQL server (a private throwaway cluster, see `kiln_test_support::postgres`).

use std::sync::Arc;
use std::time::Duration;

use kiln_store::{
    Delivery, NewRun, PostgresStore, RunFilter, RunResult, RunStatus, RunStore, SqliteStore,
    StoreError,
};

fn new_run(workflow: &str, group: Option<&str>) -> NewRun {
    NewRun {
        forge: "github".into(),
        repository: "octo/app".into(),
        clone_url: "https://example.invalid/octo/app.git".into(),
        sha: "a".repeat(40),
        git_ref: "refs/heads/main".into(),
        event: "push".into(),
        workflow_file: format!(".github/workflows/{workflow}.yml"),
        workflow_name: workflow.into(),
        payload: serde_json::json!({"ref": "refs/heads/main"}),
        inputs: serde_json::json!({}),
        delivery: Some("d1".into()),
        concurrency_group: group.map(str::to_owned),
        cancel_in_progress: false,
        rerun_of: None,
    }
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// One test's empty database. [`Db::open`] opens a new store on it: a second process, or the
/// same one after a restart.
struct Db {
    backend: Backend,
    dir: tempfile::TempDir,
    postgres_url: Option<String>,
}

impl Db {
    fn new(backend: Backend) -> Db {
        let postgres_url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let cluster = kiln_test_support::postgres::cluster();
                Some(cluster.url(&cluster.create_database()))
            }
        };
        Db {
            backend,
            dir: tempfile::tempdir().expect("tempdir"),
            postgres_url,
        }
    }

    async fn open(&self) -> Arc<dyn RunStore> {
        match (self.backend, &self.postgres_url) {
            (Backend::Postgres, Some(url)) => {
                let password = kiln_test_support::postgres::cluster().password();
                Arc::new(
                    PostgresStore::connect(url, Some(password))
                        .await
                        .expect("connect to PostgreSQL"),
                )
            }
            _ => Arc::new(
                SqliteStore::open(&self.dir.path().join("kiln.db"))
                    .await
                    .expect("open store"),
            ),
        }
    }
}

/// Each behaviour test, once per backend: `sqlite::NAME` and `postgres::NAME`.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

suite!(
    queue_claims_in_order_and_finishes,
    concurrent_claimers_never_share_a_run,
    a_concurrency_group_runs_one_at_a_time,
    concurrent_claimers_start_one_run_per_group,
    cancel_finishes_queued_and_flags_running,
    list_filters_and_pages_newest_first,
    events_are_stored_in_order_and_read_after_a_cursor,
    deliveries_are_deduplicated_across_reopen,
    outbox_keeps_order_per_key_and_retries,
    report_refs_are_kept_and_replaced,
    recovery_marks_running_runs_interrupted_and_keeps_the_queue,
    recovery_can_requeue,
);

async fn queue_claims_in_order_and_finishes(backend: Backend) {
    let db = Db::new(backend);
    let store = db.open().await;
    let first = store.enqueue(new_run("ci", None)).await.expect("enqueue");
    let second = store.enqueue(new_run("lint", None)).await.expect("enqueue");
    assert_eq!(first.status, RunStatus::Queued);
    assert!(second.seq > first.seq);
    assert_eq!(first.spec.payload["ref"], "refs/heads/main");

    let claimed = store.claim_next().await.expect("claim").expect("a run");
    assert_eq!(claimed.id, first.id);
    assert_eq!(claimed.status, RunStatus::Running);
    assert!(claimed.started_at.is_some());
    let claimed2 = store.claim_next().await.expect("claim").expect("a run");
    assert_eq!(claimed2.id, second.id);
    assert!(store.claim_next().await.expect("claim").is_none());

    let done = store
        .finish(&first.id, RunResult::Success, None)
        .await
        .expect("finish");
    assert_eq!(done.status, RunStatus::Finished);
    assert_eq!(done.result, Some(RunResult::Success));
    // Finishing twice is refused.
    let again = store.finish(&first.id, RunResult::Failure, None).await;
    assert!(
        matches!(again, Err(StoreError::WrongState { .. })),
        "{again:?}"
    );
}

async fn concurrent_claimers_never_share_a_run(backend: Backend) {
    let db = Db::new(backend);
    let store = db.open().await;
    for i in 0..20 {
        store
            .enqueue(new_run(&format!("w{i}"), None))
            .await
            .expect("enqueue");
    }
    // Two stores on one file, as two processes would have, plus tasks on each.
    let other = db.open().await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let store: Arc<dyn RunStore> = if i % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(run) = store.claim_next().await.expect("claim") {
                got.push(run.seq);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_unstable();
    let before = all.len();
    all.dedup();
    assert_eq!(before, 20, "every run claimed once");
    assert_eq!(all.len(), 20, "no run claimed twice");
}

async fn a_concurrency_group_runs_one_at_a_time(backend: Backend) {
    let db = Db::new(backend);
    let store = db.open().await;
    let a = store
        .enqueue(new_run("a", Some("g")))
        .await
        .expect("enqueue");
    let b = store
        .enqueue(new_run("b", Some("g")))
        .await
        .expect("enqueue");
    let c = store.enqueue(new_run("c", None)).await.expect("enqueue");
    assert_eq!(
        store.claim_next().await.expect("claim").map(|r| r.id),
        Some(a.id.clone())
    );
    // b waits for a; c is free to go.
    assert_eq!(
        store.claim_next().await.expect("claim").map(|r| r.id),
        Some(c.id)
    );
    assert!(store.claim_next().await.expect("claim").is_none());
    let queued = store
        .group_runs("g", RunStatus::Queued)
        .await
        .expect("group");
    assert_eq!(queued.iter().map(|r| &r.id).collect::<Vec<_>>(), [&b.id]);
    store
        .finish(&a.id, RunResult::Success, None)
        .await
        .expect("finish");
    assert_eq!(
        store.claim_next().await.expect("claim").map(|r| r.id),
        Some(b.id)
    );
}

async fn concurrent_claimers_start_one_run_per_group(backend: Backend) {
    let db = Db::new(backend);
    let store = db.open().await;
    let groups = ["g0", "g1", "g2"];
    for i in 0..12 {
        store
            .enqueue(new_run(&format!("w{i}"), Some(groups[i % 3])))
            .await
            .expect("enqueue");
    }
    let other = db.open().await;
    let running = Arc::new(std::sync::Mutex::new(
        std::collections::HashSet::<String>::new(),
    ));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let store: Arc<dyn RunStore> = if i % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        let (running, done) = (running.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while done.load(std::sync::atomic::Ordering::SeqCst) < 12 {
                let Some(run) = store.claim_next().await.expect("claim") else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let group = run.spec.concurrency_group.clone().expect("a group");
                assert!(
                    running.lock().expect("lock").insert(group.clone()),
                    "two runs of {group} claimed at once"
                );
                let in_store = store
                    .group_runs(&group, RunStatus::Running)
                    .await
                    .expect("group");
                assert_eq!(in_store.len(), 1, "running in {group}: {in_store:?}");
                tokio::task::yield_now().await;
                running.lock().expect("lock").remove(&group);
                store
                    .finish(&run.id, RunResult::Success, None)
                    .await
                    .expect("finish");
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                got.push(run.seq);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 12, "every run claimed exactly once");
    // Within a group, runs started in queue order.
    for group in groups {
        let runs = store
            .group_runs(group, RunStatus::Finished)
            .await
            .expect("group");
        let mut starts: Vec<_> = runs.iter().map(|r| (r.started_at, r.seq)).collect();
        starts.sort();
        let seqs: Vec<i64> = starts.iter().map(|(_, seq)| *seq).collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "{group} ran out of order");
    }
}

async fn cancel_finishes_queued_and_flags_running(backend: Backend) {
    let db = Db::new(backend);
    let store = db.open().await;
    let running = store.enqueue(new_run("a", None)).await.expect("enqueue");
    let queued = store.enqueue(new_run("b", None)).await.expect("enqueue");
    store.claim_next().await.expect("claim");
    let q = store.request_cancel(&queued.id).await.expect("cancel");
    assert_eq!(
        (q.status, q.result),
        (RunStatus::Finished, Some(RunResult::Cancelled))
    );
    let r = store.request_cancel(&running.id).await.expect("cancel");
    assert_eq!(r.status, RunStatus::Running);
    assert!(r.cancel_requested);
    assert!(matches!(
        store.request_cancel(&q.id).await,
        Err(StoreError::WrongState { .. })
    ));
    assert!(matches!(
        store.request_cancel("nope").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn list_filters_and_pages_newest_first(backend: Backend) {
    let db = Db::new(backend);
    let store = db.open().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut run = new_run(&format!("w{i}"), None);
        if i == 4 {
            run.repository = "octo/other".into();
        }
        ids.push(store.enqueue(run).await.expect("enqueue").id);
    }
    let page1 = store
        .list(&RunFilter {
            repository: Some("octo/app".into()),
            limit: 2,
            ..RunFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(
        page1.iter().map(|r| &r.id).collect::<Vec<_>>(),
        [&ids[3], &ids[2]]
    );
    let page2 = store
        .list(&RunFilter {
            repository: Some("octo/app".into()),
            limit: 2,
            before: Some(page1[1].seq),
            ..RunFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(
        page2.iter().map(|r| &r.id).collect::<Vec<_>>(),
        [&ids[1], &ids[0]]
    );
    let queued = store
        .list(&RunFilter {
            status: Some(RunStatus::Queued),
            ..RunFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(queued.len(), 5);
    let none = store
        .list(&RunFilter {
            result: Some(RunResult::Success),
            ..RunFilter::default()
        })
        .await
        .expect("list");
    assert!(none.is_empty());
}

async fn events_are_stored_in_order_and_read_after_a_cursor(backend: Backend) {
    let db = Db::new(backend);
    let store = db.open().await;
    let run = store.enqueue(new_run("a", None)).await.expect("enqueue");
    let bodies: Vec<String> = (0..5).map(|i| format!("{{\"n\":{i}}}")).collect();
    store
        .append_events(&run.id, &bodies[..3])
        .await
        .expect("append");
    store
        .append_events(&run.id, &bodies[3..])
        .await
        .expect("append");
    let all = store.events(&run.id, 0, 100).await.expect("events");
    assert_eq!(
        all.iter().map(|e| &e.body).collect::<Vec<_>>(),
        bodies.iter().collect::<Vec<_>>()
    );
    let rest = store.events(&run.id, all[1].id, 2).await.expect("events");
    assert_eq!(
        rest.iter().map(|e| e.body.as_str()).collect::<Vec<_>>(),
        ["{\"n\":2}", "{\"n\":3}"]
    );
}

async fn deliveries_are_deduplicated_across_reopen(backend: Backend) {
    let db = Db::new(backend);
    let delivery = Delivery {
        source: "github".into(),
        id: "72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
        event: "push".into(),
        payload: "{}".into(),
    };
    {
        let store = db.open().await;
        assert!(store.record_delivery(&delivery).await.expect("record"));
        assert!(!store.record_delivery(&delivery).await.expect("record"));
    }
    let store = db.open().await;
    assert!(
        !store.record_delivery(&delivery).await.expect("record"),
        "replay after restart"
    );
    // Pending until processed; still pending after the restart.
    assert_eq!(
        store.pending_deliveries().await.expect("pending"),
        std::slice::from_ref(&delivery)
    );
    let gitea = Delivery {
        source: "gitea".into(),
        ..delivery.clone()
    };
    assert!(
        store.record_delivery(&gitea).await.expect("record"),
        "sources are separate"
    );
    store
        .finish_delivery("github", &delivery.id, None)
        .await
        .expect("finish");
    assert_eq!(store.pending_deliveries().await.expect("pending"), [gitea]);
}

async fn outbox_keeps_order_per_key_and_retries(backend: Backend) {
    let db = Db::new(backend);
    let store = db.open().await;
    let p = store
        .push_outbox("k1", "github_status", "pending")
        .await
        .expect("push");
    let s = store
        .push_outbox("k1", "github_status", "success")
        .await
        .expect("push");
    let other = store
        .push_outbox("k2", "github_status", "x")
        .await
        .expect("push");
    let due = store.due_outbox(10).await.expect("due");
    assert_eq!(due.iter().map(|i| i.id).collect::<Vec<_>>(), [p, other]);

    // The first fails: nothing of its key is due until the retry time, the other key goes on.
    store
        .outbox_failed(p, "503", Some(Duration::from_millis(300)))
        .await
        .expect("failed");
    store.outbox_delivered(other).await.expect("delivered");
    assert!(store.due_outbox(10).await.expect("due").is_empty());
    assert_eq!(store.counts().await.expect("counts").outbox_pending, 2);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let due = store.due_outbox(10).await.expect("due");
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].id, due[0].attempts), (p, 1));
    store.outbox_delivered(p).await.expect("delivered");
    let due = store.due_outbox(10).await.expect("due");
    assert_eq!(due.iter().map(|i| i.id).collect::<Vec<_>>(), [s]);
    store.outbox_failed(s, "gone", None).await.expect("give up");
    assert!(store.due_outbox(10).await.expect("due").is_empty());
    assert_eq!(store.counts().await.expect("counts").outbox_pending, 0);
}

async fn report_refs_are_kept_and_replaced(backend: Backend) {
    let db = Db::new(backend);
    {
        let store = db.open().await;
        assert_eq!(store.report_ref("k").await.expect("get"), None);
        store.put_report_ref("k", "1").await.expect("put");
        store.put_report_ref("k", "2").await.expect("put");
        store.put_report_ref("other", "3").await.expect("put");
    }
    let store = db.open().await;
    assert_eq!(
        store.report_ref("k").await.expect("get").as_deref(),
        Some("2")
    );
}

async fn recovery_marks_running_runs_interrupted_and_keeps_the_queue(backend: Backend) {
    let db = Db::new(backend);
    let (running, queued) = {
        let store = db.open().await;
        let a = store.enqueue(new_run("a", None)).await.expect("enqueue");
        let b = store.enqueue(new_run("b", None)).await.expect("enqueue");
        store.claim_next().await.expect("claim");
        (a, b)
    };
    // "Restart": a new store on the same file.
    let store = db.open().await;
    let recovered = store.recover(false).await.expect("recover");
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].id, running.id);
    assert_eq!(recovered[0].result, Some(RunResult::Failure));
    assert_eq!(recovered[0].error.as_deref(), Some("interrupted"));
    let counts = store.counts().await.expect("counts");
    assert_eq!((counts.queued, counts.running), (1, 0));
    assert_eq!(
        store.claim_next().await.expect("claim").map(|r| r.id),
        Some(queued.id)
    );
}

async fn recovery_can_requeue(backend: Backend) {
    let db = Db::new(backend);
    let store = db.open().await;
    let a = store.enqueue(new_run("a", None)).await.expect("enqueue");
    store.claim_next().await.expect("claim");
    let recovered = store.recover(true).await.expect("recover");
    assert_eq!(recovered[0].status, RunStatus::Queued);
    assert_eq!(
        store.claim_next().await.expect("claim").map(|r| r.id),
        Some(a.id)
    );
}

/// PostgreSQL only: one `kiln serve` per database (the SQLite lock file's counterpart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_owner_lock_is_exclusive_until_released() {
    let db = Db::new(Backend::Postgres);
    let cluster = kiln_test_support::postgres::cluster();
    let url = db.postgres_url.clone().expect("a PostgreSQL database");
    let first = PostgresStore::connect(&url, Some(cluster.password()))
        .await
        .expect("connect");
    let second = PostgresStore::connect(&url, Some(cluster.password()))
        .await
        .expect("connect");
    let lock = first.lock_owner().await.expect("lock").expect("free");
    assert!(second.lock_owner().await.expect("lock").is_none());
    drop(lock);
    // The session closes in the background; the lock is free once it has.
    let mut freed = None;
    for _ in 0..100 {
        freed = second.lock_owner().await.expect("lock");
        if freed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed.is_some(), "the lock was released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_a_wrong_password() {
    let db = Db::new(Backend::Postgres);
    let url = db.postgres_url.clone().expect("a PostgreSQL database");
    let refused = PostgresStore::connect(&url, Some("wrong")).await;
    assert!(
        matches!(refused, Err(StoreError::Database(_))),
        "{refused:?}"
    );
}
