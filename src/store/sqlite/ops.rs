//! Every write the SQLite store makes, as queued for the writer thread, and what each one does
//! once its batch is committed.
//!
//! An op runs on the writer's connection inside the current batch's transaction and becomes a
//! [`Done`]: the answer its caller waits for and the change it makes to the dispatch state in
//! memory ([`MemQueue`]), both held back until the batch is on disk. If the commit fails,
//! every [`Done`] of the batch answers with the failure and changes nothing. Each op carries the
//! channel of its own answer's type, so an answer can never be of the wrong kind.
//!
//! This file holds the intake (a delivery written once, with its body) and the probe; the
//! records appended later (verdicts, attempts, replays) are in [`super::appends`], reading back
//! what another process appended in [`super::recover`], retention in [`super::prune`].
//! Statements are prepared once and cached (`prepare_cached`): the writer runs the same few
//! thousands of times a second.

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::blob::BlobDir;
use super::queue::{Arrival, MemQueue};
use super::{appends, prune, recover};
use crate::delivery::{IncomingBody, NewDelivery, Payload, Status, UnixMillis};
use crate::ordering::Verdict;
use crate::store::retention::{Cutoffs, PruneReport};
use crate::store::{Accepted, ChainRecord, GateRequest, ReplayItem, ReplayTarget, StoreError};

/// Where an op's answer goes.
pub type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write, as queued for the writer. Times are taken from the store's clock when the op is
/// made.
#[derive(Debug)]
pub enum Op {
    Accept {
        delivery: Box<NewDelivery>,
        reply: Reply<Accepted>,
    },
    /// Proves the store takes commits (`/readyz`).
    Probe { now: UnixMillis, reply: Reply<()> },
    /// The gate's verdicts, one per request: `None` for one gated already (or failed).
    Gate {
        gates: Vec<GateRequest>,
        now: UnixMillis,
        reply: Reply<Vec<Option<Verdict>>>,
    },
    /// Attempts of claimed deliveries, in lane order (a head and its chain, or one delivery);
    /// their statuses after.
    Record {
        owner: String,
        records: Vec<ChainRecord>,
        now: UnixMillis,
        reply: Reply<Vec<Status>>,
    },
    Replay {
        target: ReplayTarget,
        now: UnixMillis,
        reply: Reply<Vec<ReplayItem>>,
    },
    /// Reads what another process (the CLI) appended since, and moves the dispatch mark; says
    /// when that is in the dispatch state, to whoever asked.
    CatchUp {
        now: UnixMillis,
        reply: Option<Reply<()>>,
    },
    /// One batch of retention: what it removed, and the blob files to delete after the commit.
    Prune {
        cutoffs: Cutoffs,
        limit: u32,
        reply: Reply<(PruneReport, Vec<String>)>,
    },
    /// Gives up to `pages` free pages back to the file system; true when more are left.
    Reclaim { pages: u32, reply: Reply<bool> },
}

/// How a batch ended, as each of its ops is told: committed (and the dispatch state to change),
/// or failed.
pub type Committed<'a> = Result<&'a mut MemQueue, &'a StoreError>;

/// What an op leaves for after the commit.
pub struct Done(Box<dyn for<'a> FnOnce(Committed<'a>) -> Effects + Send>);

/// What a committed op changed, for the writer's bookkeeping.
#[derive(Debug, Default, Clone, Copy)]
pub struct Effects {
    /// The dispatcher has something new to do.
    pub new_work: bool,
    /// A new delivery was stored.
    pub stored: bool,
}

impl Done {
    pub fn new(apply: impl for<'a> FnOnce(Committed<'a>) -> Effects + Send + 'static) -> Self {
        Self(Box::new(apply))
    }

    /// After a commit (`Ok`) or a failed one (`Err`).
    pub fn finish(self, committed: Committed<'_>) -> Effects {
        (self.0)(committed)
    }

    /// After a commit, `apply` changes the dispatch state and gives the answer and whether the
    /// dispatcher has new work; after a failed one, the caller is told the failure and nothing
    /// changes.
    pub fn on_commit<T: Send + 'static>(
        reply: Reply<T>,
        apply: impl FnOnce(&mut MemQueue) -> (T, bool) + Send + 'static,
    ) -> Self {
        Self::new(move |committed| match committed {
            Ok(queue) => {
                let (answer, new_work) = apply(queue);
                let _ = reply.send(Ok(answer));
                Effects {
                    new_work,
                    stored: false,
                }
            }
            Err(failure) => {
                let _ = reply.send(Err(failure.again()));
                Effects::default()
            }
        })
    }

    /// An answer that changes nothing in memory.
    pub fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Self {
        Self::new(move |committed| {
            let _ = reply.send(settle(committed.map(|_| ()), result));
            Effects::default()
        })
    }
}

/// An op's own result, unless its batch failed to commit.
pub fn settle<T>(
    committed: Result<(), &StoreError>,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    match committed {
        Ok(()) => result,
        Err(failure) => Err(failure.again()),
    }
}

/// What an op runs against: the writer's connection (in its transaction), the blob files, and
/// the dispatch state as the last commit left it.
pub struct Ctx<'a> {
    pub conn: &'a Connection,
    pub blobs: &'a BlobDir,
    pub queue: &'a MemQueue,
}

impl Op {
    /// The dispatcher's bookkeeping (and the operator's), as opposed to deliveries coming in:
    /// committed first when both wait.
    pub fn is_dispatch(&self) -> bool {
        !matches!(self, Op::Accept { .. } | Op::Probe { .. })
    }

    pub fn is_accept(&self) -> bool {
        matches!(self, Op::Accept { .. })
    }

    pub fn is_staged_accept(&self) -> bool {
        matches!(self, Op::Accept { delivery, .. } if matches!(delivery.body, IncomingBody::Staged(_)))
    }

    /// Answers the op with `failure` without running it.
    pub fn refuse(self, failure: &StoreError) {
        let err = || failure.again();
        match self {
            Op::Accept { reply, .. } => drop(reply.send(Err(err()))),
            Op::Probe { reply, .. } => drop(reply.send(Err(err()))),
            Op::Gate { reply, .. } => drop(reply.send(Err(err()))),
            Op::Record { reply, .. } => drop(reply.send(Err(err()))),
            Op::Replay { reply, .. } => drop(reply.send(Err(err()))),
            Op::Prune { reply, .. } => drop(reply.send(Err(err()))),
            Op::Reclaim { reply, .. } => drop(reply.send(Err(err()))),
            Op::CatchUp { reply, .. } => {
                if let Some(reply) = reply {
                    drop(reply.send(Err(err())));
                }
            }
        }
    }

    /// Runs the op inside the open transaction. An op that fails is undone alone (its own
    /// savepoint, or its own statement) and answers with its error; the batch goes on.
    pub fn run(self, ctx: &Ctx<'_>) -> Done {
        match self {
            Op::Accept { delivery, reply } => accept(ctx, *delivery, reply),
            Op::Probe { now, reply } => {
                let probed = ctx
                    .conn
                    .prepare_cached("UPDATE probe SET at = ?1 WHERE id = 1")
                    .and_then(|mut probe| probe.execute([now]))
                    .map(|_| ())
                    .map_err(StoreError::from);
                Done::answer(reply, probed)
            }
            Op::Gate { gates, now, reply } => appends::gate(ctx, gates, now, reply),
            Op::Record {
                owner,
                records,
                now,
                reply,
            } => appends::record(ctx, &owner, records, now, reply),
            Op::Replay { target, now, reply } => appends::replay(ctx, &target, now, reply),
            Op::CatchUp { now, reply } => recover::catch_up(ctx, now, reply),
            Op::Prune {
                cutoffs,
                limit,
                reply,
            } => {
                let pruned =
                    in_savepoint(ctx.conn, || prune::prune_batch(ctx.conn, &cutoffs, limit))
                        .and_then(|r| r);
                Done::answer(reply, pruned)
            }
            Op::Reclaim { pages, reply } => Done::answer(reply, prune::reclaim(ctx.conn, pages)),
        }
    }
}

/// Writes a new delivery once: its row (the dedup key with it) and a small body beside it. After
/// the commit it waits for the gate, its body still in memory.
fn accept(ctx: &Ctx<'_>, delivery: NewDelivery, reply: Reply<Accepted>) -> Done {
    let inserted = insert(ctx.conn, &delivery);
    let blobs = ctx.blobs.clone();
    Done::new(move |committed| {
        let queue = match committed {
            Ok(queue) => queue,
            Err(failure) => {
                // Its staged body, if any, is dropped (and removed) with the delivery.
                let _ = reply.send(Err(failure.again()));
                return Effects::default();
            }
        };
        let accepted = match inserted {
            Ok(accepted) => accepted,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Effects::default();
            }
        };
        // A duplicate's staged body is dropped (and removed); a new one is kept.
        if accepted.duplicate {
            let _ = reply.send(Ok(accepted));
            return Effects::default();
        }
        let body = match delivery.body {
            IncomingBody::Inline(bytes) => Payload::inline(bytes),
            IncomingBody::Staged(staged) => {
                let body = Payload::stored(staged.len(), blobs.source(staged.key()));
                staged.keep();
                body
            }
        };
        queue.arrived(
            accepted.seq,
            Arrival {
                delivery_id: delivery.delivery_id,
                request_id: delivery.request_id,
                topic: delivery.topic,
                received_at: delivery.received_at,
                round: 0,
                body: Some(body),
                done: Vec::new(),
                origin: delivery.origin,
            },
        );
        let _ = reply.send(Ok(accepted));
        Effects {
            new_work: true,
            stored: true,
        }
    })
}

fn insert(conn: &Connection, d: &NewDelivery) -> Result<Accepted, StoreError> {
    let headers = serde_json::to_string(&d.headers)
        .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?;
    let (inline, blob_name): (Option<&[u8]>, Option<&str>) = match &d.body {
        IncomingBody::Inline(bytes) => (Some(bytes), None),
        IncomingBody::Staged(staged) => (None, Some(staged.key())),
    };
    let accepted_as = match d.status {
        Status::Unrecognized => Status::Unrecognized,
        _ => Status::Pending,
    };
    // One statement: the dedup (unique key), the id-conflict flag and the row.
    let inserted = conn
        .prepare_cached(
            "INSERT INTO deliveries (delivery_id, body_sha256, id_conflict, endpoint, topic, \
                 client_ip, headers, blob_name, body_len, received_at, accepted_as, request_id, \
                 origin) \
             SELECT ?1, ?2, EXISTS (SELECT 1 FROM deliveries WHERE delivery_id = ?1 AND body_sha256 <> ?2), \
                 ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12 WHERE true \
             ON CONFLICT (delivery_id, body_sha256) DO NOTHING \
             RETURNING seq, id_conflict",
        )?
        .query_row(
            params![
                d.delivery_id,
                &d.body_sha256[..],
                d.endpoint,
                d.topic,
                d.client_ip.to_string(),
                headers,
                blob_name,
                d.body.len() as i64,
                d.received_at,
                accepted_as.as_str(),
                d.request_id,
                d.origin.as_str(),
            ],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, bool>(1)?)),
        )
        .optional()?;
    let Some((seq, id_conflict)) = inserted else {
        let seq = conn
            .prepare_cached(
                "SELECT seq FROM deliveries WHERE delivery_id = ?1 AND body_sha256 = ?2",
            )?
            .query_row(params![d.delivery_id, &d.body_sha256[..]], |row| row.get(0))?;
        return Ok(Accepted {
            seq,
            duplicate: true,
            id_conflict: false,
        });
    };
    if let Some(body) = inline {
        let stored = conn
            .prepare_cached("INSERT INTO bodies (seq, body) VALUES (?1, ?2)")
            .and_then(|mut insert| insert.execute(params![seq, body]));
        if let Err(e) = stored {
            // Undone by hand rather than in a savepoint (which costs more than the insert): no
            // delivery row without its body.
            conn.prepare_cached("DELETE FROM deliveries WHERE seq = ?1")?
                .execute([seq])?;
            return Err(e.into());
        }
    }
    Ok(Accepted {
        seq,
        duplicate: false,
        id_conflict,
    })
}

/// A row's body: the blob file it names, or its row in `bodies`; `None` when retention dropped
/// it (or it is missing).
pub(super) fn body_of(
    conn: &Connection,
    blobs: &BlobDir,
    seq: i64,
) -> Result<Option<Payload>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT d.blob_name, d.body_len, b.body FROM deliveries d \
             LEFT JOIN bodies b ON b.seq = d.seq WHERE d.seq = ?1",
        )?
        .query_row([seq], |row| {
            Ok((
                row.get::<_, Option<String>>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, Option<Vec<u8>>>(2)?,
            ))
        })
        .optional()?;
    Ok(match row {
        Some((Some(name), len, _)) => Some(Payload::stored(len.max(0) as u64, blobs.source(&name))),
        Some((None, _, Some(bytes))) => Some(Payload::inline(Bytes::from(bytes))),
        _ => None,
    })
}

/// [`body_of`], where a missing body is an error: never an empty body in its place, which would
/// hand handlers a wrong event.
pub(super) fn body_required(
    conn: &Connection,
    blobs: &BlobDir,
    seq: i64,
) -> Result<Payload, StoreError> {
    body_of(conn, blobs, seq)?
        .ok_or_else(|| StoreError::Corrupt(format!("delivery {seq} has no body")))
}

/// Runs `work` in a savepoint: kept when it succeeds, undone alone when it fails. The outer
/// error is the savepoint's own (the transaction is then in no state to go on).
///
/// The savepoint statements are prepared once and cached: `Connection::execute_batch`, which
/// rusqlite's `Savepoint` uses, parses its SQL on every call.
pub fn in_savepoint<T>(
    conn: &Connection,
    work: impl FnOnce() -> Result<T, StoreError>,
) -> Result<Result<T, StoreError>, StoreError> {
    conn.prepare_cached("SAVEPOINT op")?.execute([])?;
    let result = work();
    if result.is_err() {
        conn.prepare_cached("ROLLBACK TO op")?.execute([])?;
    }
    conn.prepare_cached("RELEASE op")?.execute([])?;
    Ok(result)
}
