//! The dispatch state read back from the records: whole at start ([`rebuild`]), and what another
//! process appended while this one serves ([`catch_up`]: deliveries a backfill stored, replays
//! the CLI asked for), read every second and whenever a delivery's `seq` shows that one came in
//! between.
//!
//! Only deliveries from the dispatch mark on are read at start: every delivery below it is
//! finished. The writer moves the mark forward as work finishes (with each catch-up), and a
//! replay moves it back to the delivery it puts back.

use rusqlite::{params, Connection};

use super::appends::{apply_replays, arrival_of};
use super::ops::{Ctx, Done, Effects, Reply};
use super::queue::{Arrival, Gated, MemQueue, Run};
use crate::delivery::UnixMillis;
use crate::ordering::Version;
use crate::store::{RunState, StoreError};

/// A delivery with work left, as read back: waiting for the gate, or gated with runs left
/// (with its place in its lane).
enum Unfinished {
    Ungated(i64, Arrival),
    Gated(i64, Arrival, Gated),
}

/// The dispatch state as the records leave it: the deliveries from the dispatch mark on that
/// are not finished, waiting for the gate or in their lanes in the gate's order. Leases are
/// not kept: whatever a previous run was handling is due again.
pub fn rebuild(conn: &Connection) -> Result<MemQueue, StoreError> {
    let mut queue = MemQueue::default();
    let mark: i64 = conn.query_row("SELECT low_water FROM dispatch_mark", [], |row| row.get(0))?;
    let (last_seq, last_replay): (i64, i64) = conn.query_row(
        "SELECT (SELECT COALESCE(MAX(seq), 0) FROM deliveries), \
                (SELECT COALESCE(MAX(id), 0) FROM replays)",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    queue.known_seq = last_seq;
    queue.known_replay = last_replay;
    restore(&mut queue, unfinished(conn, mark, last_seq)?);
    Ok(queue)
}

fn restore(queue: &mut MemQueue, mut found: Vec<(Option<i64>, Unfinished)>) {
    // Into their lanes in the gate's order, which is not always the order of arrival.
    found.sort_by_key(|(lane_pos, _)| *lane_pos);
    for (_, u) in found {
        match u {
            Unfinished::Ungated(seq, arrival) => queue.arrived(seq, arrival),
            Unfinished::Gated(seq, arrival, gated) => {
                queue.arrived(seq, arrival);
                queue.gated(gated);
            }
        }
    }
}

/// The unfinished deliveries with `seq` in `from..=to`, each with its place in the gate's order
/// (none for those waiting for the gate).
fn unfinished(
    conn: &Connection,
    from: i64,
    to: i64,
) -> Result<Vec<(Option<i64>, Unfinished)>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT d.seq, d.round, d.gated, d.entity, d.version, d.project_id, d.fresh, \
                    d.parse_error, d.handlers, d.status, d.lane_pos \
             FROM deliveries_now d WHERE d.seq >= ?1 AND d.seq <= ?2 AND NOT d.finished \
             ORDER BY d.seq",
        )?
        .query_map(params![from, to], |row| {
            Ok(Row {
                seq: row.get(0)?,
                round: row.get(1)?,
                gated: row.get::<_, Option<bool>>(2)?.unwrap_or(false),
                entity: row.get(3)?,
                version: row.get(4)?,
                project_id: row.get(5)?,
                fresh: row.get::<_, Option<bool>>(6)?.unwrap_or(true),
                parse_error: row.get(7)?,
                handlers: row.get(8)?,
                status: row.get(9)?,
                lane_pos: row.get(10)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|row| {
            let done = done_handlers(conn, row.seq)?;
            let arrival = arrival_of(conn, row.seq, row.round, done)?;
            if !row.gated {
                return Ok((None, Unfinished::Ungated(row.seq, arrival)));
            }
            let handlers: Vec<String> = row
                .handlers
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("handlers: {e}")))?
                .unwrap_or_default();
            let runs = runs_of(conn, row.seq, row.round, &handlers, &arrival.done)?;
            let gated = Gated {
                seq: row.seq,
                round: row.round,
                entity: row.entity,
                version: row.version.map(Version::from_nanos),
                project_id: row.project_id,
                fresh: row.fresh,
                body_is_json: row.parse_error.is_none(),
                event: None,
                status: row.status.parse().map_err(StoreError::Corrupt)?,
                runs,
            };
            Ok((row.lane_pos, Unfinished::Gated(row.seq, arrival, gated)))
        })
        .collect()
}

struct Row {
    seq: i64,
    round: i64,
    gated: bool,
    entity: Option<String>,
    version: Option<i64>,
    project_id: Option<String>,
    fresh: bool,
    parse_error: Option<String>,
    handlers: Option<String>,
    status: String,
    lane_pos: Option<i64>,
}

/// The handlers that did `seq`, in any round.
fn done_handlers(conn: &Connection, seq: i64) -> Result<Vec<String>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT DISTINCT handler FROM attempts WHERE delivery_seq = ?1 AND outcome = 'ok'",
        )?
        .query_map([seq], |row| row.get(0))?
        .collect::<Result<_, _>>()?)
}

/// Each handler's run in `round`, from its attempts: done (in any round), dead, or pending with
/// the attempts made and when the next is due (at once when none was made).
fn runs_of(
    conn: &Connection,
    seq: i64,
    round: i64,
    handlers: &[String],
    done: &[String],
) -> Result<Vec<Run>, StoreError> {
    let mut last = conn.prepare_cached(
        "SELECT attempt, outcome, next_at FROM attempts \
         WHERE delivery_seq = ?1 AND round = ?2 AND handler = ?3 \
         ORDER BY attempt DESC LIMIT 1",
    )?;
    handlers
        .iter()
        .map(|handler| {
            if done.contains(handler) {
                return Ok(Run {
                    handler: handler.clone(),
                    state: RunState::Done,
                    attempts: 0,
                    next_at: 0,
                });
            }
            let attempt: Option<(i64, String, Option<i64>)> = last
                .query_map(params![seq, round, handler], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })?
                .next()
                .transpose()?;
            Ok(match attempt {
                None => Run::pending(handler.clone(), 0),
                Some((attempts, outcome, next_at)) => Run {
                    handler: handler.clone(),
                    state: if outcome == "dead" {
                        RunState::Dead
                    } else {
                        RunState::Pending
                    },
                    attempts: attempts.max(0) as u32,
                    next_at: next_at.unwrap_or(0),
                },
            })
        })
        .collect()
}

/// Reads what another process appended since the last catch-up (deliveries, including those
/// in the gaps between this process's own, and replays), and writes the dispatch mark.
pub fn catch_up(ctx: &Ctx<'_>, now: UnixMillis, reply: Option<Reply<()>>) -> Done {
    let answer = |result: Result<(), StoreError>| {
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    };
    match read_appended(ctx) {
        Ok((found, replays, last_seq, last_replay)) => Done::new(move |committed| {
            let queue = match committed {
                Ok(queue) => queue,
                Err(failure) => {
                    answer(Err(failure.again()));
                    return Effects::default();
                }
            };
            let new_work = !found.is_empty() || !replays.is_empty();
            // Known from here on, so that restoring them does not count as gaps.
            queue.known_seq = queue.known_seq.max(last_seq);
            queue.known_replay = queue.known_replay.max(last_replay);
            queue.clear_gaps(last_seq);
            let found = found
                .into_iter()
                .filter(|(_, u)| {
                    let seq = match u {
                        Unfinished::Ungated(seq, _) | Unfinished::Gated(seq, _, _) => *seq,
                    };
                    queue.held(seq).is_none()
                })
                .collect();
            restore(queue, found);
            let replays = replays
                .into_iter()
                .filter(|(seq, a)| queue.held(*seq).is_none_or(|(round, _)| round < a.round))
                .collect();
            apply_replays(queue, replays, now);
            answer(Ok(()));
            Effects {
                new_work,
                stored: false,
            }
        }),
        Err(e) => {
            tracing::warn!(error = %e, "could not read what other processes appended");
            answer(Err(e));
            Done::new(|_| Effects::default())
        }
    }
}

type Appended = (
    Vec<(Option<i64>, Unfinished)>,
    Vec<(i64, Arrival)>,
    i64,
    i64,
);

fn read_appended(ctx: &Ctx<'_>) -> Result<Appended, StoreError> {
    let conn = ctx.conn;
    let queue = ctx.queue;
    let (last_seq, last_replay): (i64, i64) = conn.query_row(
        "SELECT (SELECT COALESCE(MAX(seq), 0) FROM deliveries), \
                (SELECT COALESCE(MAX(id), 0) FROM replays)",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let mut found = Vec::new();
    for (from, to) in queue.gaps() {
        found.extend(unfinished(conn, from, to)?);
    }
    if last_seq > queue.known_seq {
        found.extend(unfinished(conn, queue.known_seq + 1, last_seq)?);
    }
    let mut replays = Vec::new();
    if last_replay > queue.known_replay {
        // Only a delivery's latest replay counts, and only until its round is gated (this
        // process's own replays are applied when they commit, and come by here again).
        let rows: Vec<(i64, i64)> = conn
            .prepare_cached(
                "SELECT r.seq, r.round FROM replays r WHERE r.id > ?1 \
                   AND r.round = (SELECT MAX(round) FROM replays WHERE seq = r.seq) \
                   AND NOT EXISTS (SELECT 1 FROM verdicts v \
                                   WHERE v.seq = r.seq AND v.round = r.round) \
                 ORDER BY r.id",
            )?
            .query_map([queue.known_replay], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (seq, round) in rows {
            let done = done_handlers(conn, seq)?;
            replays.push((seq, arrival_of(conn, seq, round, done)?));
        }
    }
    // Everything below the mark is finished: what is held here, and what was just found.
    let earliest = found
        .iter()
        .map(|(_, u)| match u {
            Unfinished::Ungated(seq, _) | Unfinished::Gated(seq, _, _) => *seq,
        })
        .chain(replays.iter().map(|(seq, _)| *seq))
        .chain([queue.low_water()])
        .min()
        .unwrap_or(0);
    conn.prepare_cached("UPDATE dispatch_mark SET low_water = ?1 WHERE low_water <> ?1")?
        .execute([earliest])?;
    Ok((found, replays, last_seq, last_replay))
}
