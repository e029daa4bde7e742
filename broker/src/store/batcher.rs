//! Group commit for offline deposits: [`DepositBatcher`] gathers single deposits from many
//! connections and stores them with [`Store::deposit_batch`], one transaction per batch.
//!
//! There is no timer: the first deposit starts a batch at once, and whatever arrives while
//! batches are committing (up to `max_in_flight` at a time) forms the next one. Idle load gives
//! one-item batches with no added latency; heavy load gives large batches and few commits.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{DepositOutcome, NewInboxItem, Store, StoreError};

/// Tuning of a [`DepositBatcher`].
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most items in one transaction.
    pub max_batch: usize,
    /// Most transactions committing at once (each holds one pooled connection). With 1 (the
    /// default) deposits are stored in the order they reached the batcher, so a connection
    /// that pipelines several deposits keeps their order; with more, deposits pending at the
    /// same time may land in either order (more throughput on Postgres, less ordering).
    pub max_in_flight: usize,
    /// Deposits waiting beyond this make [`DepositBatcher::deposit`] wait (back-pressure).
    pub queue: usize,
    /// Inbox quota per recipient device (see [`Store::deposit_batch`]).
    pub quota_per_device: u32,
    /// Retries of a whole batch that failed with a retryable error (deadlock, busy).
    pub retries: u32,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            max_batch: 512,
            max_in_flight: 1,
            queue: 8192,
            quota_per_device: 10_000,
            retries: 3,
        }
    }
}

type Reply = oneshot::Sender<Result<DepositOutcome, StoreError>>;

/// A handle to a group-commit task. Cheap to clone; the task ends when every handle is dropped
/// (after finishing what it has).
#[derive(Debug, Clone)]
pub struct DepositBatcher {
    tx: mpsc::Sender<(NewInboxItem, Reply)>,
}

impl DepositBatcher {
    /// Starts the batching task on the current tokio runtime.
    pub fn spawn(store: Store, config: BatcherConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(run(store, config, rx));
        Self { tx }
    }

    /// Deposits one item; resolves once its batch has committed (or failed).
    pub async fn deposit(&self, item: NewInboxItem) -> Result<DepositOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn run(store: Store, config: BatcherConfig, mut rx: mpsc::Receiver<(NewInboxItem, Reply)>) {
    let max_batch = config.max_batch.max(1);
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    while let Some(first) = rx.recv().await {
        // Wait for a commit slot first: deposits arriving meanwhile join this batch.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(max_batch.min(64));
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            commit(&store, &config, batch).await;
            drop(permit);
        });
    }
}

async fn commit(store: &Store, config: &BatcherConfig, batch: Vec<(NewInboxItem, Reply)>) {
    let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let mut attempt = 0;
    let result = loop {
        match store.deposit_batch(&items, config.quota_per_device).await {
            Err(e) if e.is_retryable() && attempt < config.retries => attempt += 1,
            other => break other,
        }
    };
    match result {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for reply in replies {
                let _ = reply.send(Err(StoreError::BatchFailed(e.clone())));
            }
        }
    }
}
