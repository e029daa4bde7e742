//! LOGIN's reads on SQLite, on threads of their own: the login readers.
//!
//! A LOGIN reads the store twice: the device row, then, only once the caller has checked the
//! login against that row, the pending-inbox count ([`crate::Store::device_for_login`]).
//! Through sqlx each statement is a round trip to its connection's worker thread, and handing
//! the connection back to the pool is a third (sqlx pings it on release): three wake-ups of
//! another thread and three back. On a busy 2-core broker those wake-ups cost more than the
//! reads themselves (docs/performance.md, "logins"). A login reader runs a LOGIN's whole store
//! work, the caller's check between the reads included, as one job: one wake-up there and one
//! back.
//!
//! Each reader owns a read-only connection to the store's file. WAL lets it read beside the
//! pool's writer, and a job sees every transaction committed before it started. What a job
//! reads and in which order is exactly what the pool path does, so the timing of a refused
//! LOGIN still tells nothing about which devices exist.
//!
//! The caller's check runs on the reader's thread, so it must be short and must not block (a
//! LOGIN's is a few HMACs). A job that panics fails alone: its caller gets
//! [`StoreError::Closed`], and the reader takes the next job.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::StoreError;

/// LOGINs that may wait for a reader at once; beyond, a LOGIN waits to queue (the connection's
/// task is parked, nothing is dropped).
const QUEUED_JOBS: usize = 256;

/// Statements each reader keeps prepared (LOGIN uses two).
const PREPARED_STATEMENTS: usize = 8;

type Job = Box<dyn FnOnce(&Connection) + Send>;

/// The login readers of one SQLite store: their queue and their threads. [`LoginReaders::close`]
/// ends them; so does dropping the last handle (every clone of its store), once their queued
/// jobs are done.
#[derive(Debug)]
pub(crate) struct LoginReaders {
    /// `None` once closed.
    jobs: Mutex<Option<flume::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// How long a LOGIN waits for a reader's answer (queued and run) before it is answered
    /// UNAVAILABLE: a reader stuck on the disk must not hold every LOGIN for ever.
    timeout: Duration,
}

impl LoginReaders {
    /// Opens `count` read-only connections to the SQLite file at `path`, each on a thread of
    /// its own, with the pool's busy timeout; a job's caller waits at most `timeout`. Fails if a
    /// connection cannot be opened.
    pub(crate) async fn start(
        path: &Path,
        count: usize,
        busy_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let (jobs, queue) = flume::bounded::<Job>(QUEUED_JOBS);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (opened, open_result) = oneshot::channel();
            let path = path.to_owned();
            let queue = queue.clone();
            let thread = std::thread::Builder::new()
                .name(format!("login-reader-{index}"))
                .spawn(move || {
                    let conn = match open(&path, busy_timeout) {
                        Ok(conn) => conn,
                        Err(e) => {
                            let _ = opened.send(Err(e));
                            return;
                        }
                    };
                    let _ = opened.send(Ok(()));
                    serve(&conn, &queue);
                })
                .map_err(StoreError::Spawn)?;
            threads.push(thread);
            open_result.await.map_err(|_| StoreError::Closed)??;
        }
        Ok(Self {
            jobs: Mutex::new(Some(jobs)),
            threads: Mutex::new(threads),
            timeout,
        })
    }

    /// Runs `job` on a reader's connection and returns what it returned; [`StoreError::TimedOut`]
    /// past the readers' timeout (the job may still run later: its answer is then dropped).
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Connection) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let jobs = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Closed)?;
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = answer.send(job(conn));
        });
        let asked = async {
            jobs.send_async(job).await.map_err(|_| StoreError::Closed)?;
            answered.await.map_err(|_| StoreError::Closed)
        };
        tokio::time::timeout(self.timeout, asked)
            .await
            .unwrap_or(Err(StoreError::TimedOut))
    }

    /// Ends the readers: jobs already queued still run, later ones fail with
    /// [`StoreError::Closed`]; returns once every reader's connection is closed, so that the
    /// pool's last connection, closed after, can checkpoint the WAL and remove it.
    pub(crate) async fn close(&self) {
        drop(self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take());
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// A reader's connection: read-only, so nothing it runs can write, with statements cached.
fn open(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(StoreError::Reader)?;
    conn.busy_timeout(busy_timeout)
        .map_err(StoreError::Reader)?;
    conn.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
    Ok(conn)
}

/// A reader's loop: jobs until every sender is gone.
fn serve(conn: &Connection, queue: &flume::Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        // The unwind drops the job's answer sender, which is how its caller learns it failed.
        let _ = catch_unwind(AssertUnwindSafe(|| job(conn)));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    async fn readers(count: usize) -> (tempfile::TempDir, LoginReaders) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        // The store makes the file and its WAL; the readers only read it.
        crate::Store::open_sqlite(&path).await.unwrap();
        let readers = LoginReaders::start(&path, count, Duration::from_secs(1), TIMEOUT)
            .await
            .unwrap();
        (dir, readers)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_panics_fails_alone_and_the_reader_goes_on() {
        let (_dir, readers) = readers(1).await;
        let failed = readers
            .run(|_| -> i64 { panic!("a check that panics") })
            .await;
        assert!(matches!(failed, Err(StoreError::Closed)), "{failed:?}");
        let entities: i64 = readers
            .run(|conn| conn.query_row("SELECT COUNT(*) FROM entities", [], |r| r.get(0)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(entities, 0, "the same reader answers the next job");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_cannot_write() {
        let (_dir, readers) = readers(1).await;
        let write = readers
            .run(|conn| {
                conn.execute(
                    "INSERT INTO entities (number, created_at, next_device) VALUES ('5550001', 0, 1)",
                    [],
                )
            })
            .await
            .unwrap();
        let refused = write.unwrap_err();
        assert_eq!(
            refused.sqlite_error_code(),
            Some(rusqlite::ErrorCode::ReadOnly),
            "{refused}"
        );
        let error = StoreError::Reader(refused);
        assert!(
            !error.is_unavailable() && !error.is_retryable(),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn readers_that_cannot_open_their_file_fail_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let missing = LoginReaders::start(
            &dir.path().join("none.db"),
            2,
            Duration::from_secs(1),
            TIMEOUT,
        )
        .await;
        assert!(matches!(missing, Err(StoreError::Reader(_))), "{missing:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_does_not_answer_in_time_is_a_timeout_and_the_next_job_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        crate::Store::open_sqlite(&path).await.unwrap();
        let readers =
            LoginReaders::start(&path, 1, Duration::from_secs(1), Duration::from_millis(100))
                .await
                .unwrap();
        let (finished, done) = oneshot::channel();
        let stuck = readers
            .run(move |_| {
                std::thread::sleep(Duration::from_millis(300));
                let _ = finished.send(());
            })
            .await;
        assert!(matches!(stuck, Err(StoreError::TimedOut)), "{stuck:?}");
        assert!(
            StoreError::TimedOut.is_unavailable(),
            "answered UNAVAILABLE, not INTERNAL"
        );
        // The reader was not lost: once the slow job is over, it answers the next.
        done.await.unwrap();
        assert_eq!(readers.run(|_| 7).await.unwrap(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_the_store_closes_its_readers_and_the_wal_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut store = crate::Store::open_sqlite(&path).await.unwrap();
        store.start_login_readers(2, TIMEOUT).await.unwrap();
        let number = crate::Number::new("5550001".to_owned()).unwrap();
        let device = crate::DeviceId::new(1).unwrap();
        // A read, so that the readers hold the database open as they do on a live broker.
        let seen = store
            .device_for_login(&number, device, 0, |_| Some(()))
            .await
            .unwrap();
        assert!(seen.is_none());
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        assert!(Path::new(&wal).exists(), "a live WAL store has its WAL");
        store.close().await;
        assert!(
            !Path::new(&wal).exists(),
            "the last connection to close checkpointed and removed the WAL"
        );
        let after = store
            .device_for_login(&number, device, 0, |_| Some(()))
            .await;
        assert!(matches!(after, Err(StoreError::Closed)), "{after:?}");
    }
}
