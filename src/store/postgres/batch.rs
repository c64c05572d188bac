//! Group commit for the PostgreSQL back-end: callers that write at the same moment (accepts
//! from concurrent requests, outcomes from concurrent handler calls) hand their job to one
//! task per kind, which runs whatever has gathered as one transaction of multi-row statements
//! and answers each caller once that transaction is committed.
//!
//! Nothing waits on purpose: a job is taken at once when a transaction slot is free, so a lone
//! caller pays no delay; jobs gather only while all of a batcher's `in_flight` transactions are
//! running, which is exactly when one more transaction per job would queue behind the others
//! anyway. So the batch grows with the load, up to `max` jobs.
//!
//! Several transactions are kept in flight, not one: a commit's cost here is mostly the wait
//! for the WAL flush, and PostgreSQL flushes the commits that arrive while one flush is under
//! way together. A single transaction in flight would make every batch wait for the flush
//! before it and then for its own; a few in flight let a new batch join the next flush while
//! the previous one is still being written.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::store::StoreError;

/// Jobs that may wait for a transaction, in batches of `max`, before callers are told
/// [`StoreError::Busy`].
const QUEUED_BATCHES: usize = 8;

/// One job and where its answer goes.
struct Job<J, R> {
    job: J,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

/// A running batcher: [`Batcher::submit`] hands it a job and waits for its answer.
pub(super) struct Batcher<J, R> {
    /// `None` once closed.
    sender: Mutex<Option<mpsc::Sender<Job<J, R>>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl<J: Send + 'static, R: Send + 'static> Batcher<J, R> {
    /// Starts the task that runs batches of up to `max` jobs with `run`, at most `in_flight`
    /// at once; `run` answers each job of its batch, in order.
    pub fn start<F, Fut>(max: usize, in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<R, StoreError>>> + Send + 'static,
    {
        let max = max.max(1);
        let (sender, receiver) = mpsc::channel(max * QUEUED_BATCHES);
        let task = tokio::spawn(drive(receiver, max, in_flight.max(1), Arc::new(run)));
        Self {
            sender: Mutex::new(Some(sender)),
            task: Mutex::new(Some(task)),
        }
    }

    /// Runs `job` in the next batch and returns its answer, once its transaction is over.
    pub async fn submit(&self, job: J) -> Result<R, StoreError> {
        let sender = self
            .sender
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| StoreError::unavailable("the store is closed"))?;
        let (reply, answer) = oneshot::channel();
        sender.try_send(Job { job, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Busy,
            mpsc::error::TrySendError::Closed(_) => StoreError::unavailable("the store is closed"),
        })?;
        answer
            .await
            .map_err(|_| StoreError::unavailable("the store's writer stopped"))?
    }

    /// Takes no more jobs and waits until those handed in are answered.
    pub async fn close(&self) {
        drop(self.sender.lock().ok().and_then(|mut s| s.take()));
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Takes jobs as they come, at most `in_flight` batches at a time, until every sender is gone;
/// then finishes the batches that run.
async fn drive<J, R, F, Fut>(
    mut jobs: mpsc::Receiver<Job<J, R>>,
    max: usize,
    in_flight: usize,
    run: Arc<F>,
) where
    J: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Result<R, StoreError>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut running = JoinSet::new();
    loop {
        // A slot first: while none is free, jobs gather in the channel for a larger batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = jobs.recv().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let run = run.clone();
        running.spawn(async move {
            let (work, replies): (Vec<J>, Vec<_>) =
                batch.into_iter().map(|j| (j.job, j.reply)).unzip();
            let answers = run(work).await;
            let mut answers = answers.into_iter();
            for reply in replies {
                let answer = answers
                    .next()
                    .unwrap_or_else(|| Err(StoreError::database("a batch gave too few answers")));
                let _ = reply.send(answer);
            }
            drop(slot);
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}
