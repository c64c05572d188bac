//! Retention for the SQLite store: which deliveries and bodies may go, removing them in one
//! batch (run by the writer, inside its transaction), counting them for a dry run (on a reader),
//! and the statistics the metrics show.
//!
//! A delivery may go only when it has no work left: its work closed, or gated with no handler
//! to run (the view `deliveries_now` says which). Rows are taken oldest first, and a delivery
//! goes with every record appended for it. Blob files of removed bodies are deleted by the
//! writer once the batch is committed.

use std::collections::HashSet;

use rusqlite::{Connection, OptionalExtension};

use crate::delivery::Status;
use crate::store::retention::{Cutoffs, PruneReport, StoreStats};
use crate::store::StoreError;

/// One prunable row: what it is and what it holds.
struct Doomed {
    seq: i64,
    status: Status,
    blob_name: Option<String>,
    /// Bytes of body still kept (0 when it was dropped already).
    body_bytes: u64,
}

/// Reads one row: what [`Doomed`] holds, and whether the delivery is finished.
fn walked(row: &rusqlite::Row<'_>) -> Result<(Doomed, bool), StoreError> {
    let status: String = row.get(1)?;
    let len: i64 = row.get(3)?;
    let pruned: bool = row.get(4)?;
    Ok((
        Doomed {
            seq: row.get(0)?,
            status: status.parse().map_err(StoreError::Corrupt)?,
            blob_name: row.get(2)?,
            body_bytes: if pruned { 0 } else { len.max(0) as u64 },
        },
        row.get(5)?,
    ))
}

/// The columns [`walked`] reads.
const WALK_COLUMNS: &str = "d.seq, d.status, d.blob_name, d.body_len, d.body_pruned, d.finished";

/// Walks the rows `sql` gives, in its order, keeping the first `limit` finished ones.
fn walk_finished(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
    limit: u32,
) -> Result<Vec<Doomed>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(args)?;
    let mut picked = Vec::new();
    while let Some(row) = rows.next()? {
        if picked.len() >= limit as usize {
            break;
        }
        let (doomed, finished) = walked(row)?;
        if finished {
            picked.push(doomed);
        }
    }
    Ok(picked)
}

/// The newest sequence number received before `before` (0 when none), found by halving the
/// range of sequence numbers: a few lookups by key, however many rows are kept. Sequence
/// numbers follow arrival (a row that arrived a moment earlier but committed later waits for
/// the next run).
fn last_seq_before(conn: &Connection, before: i64) -> Result<i64, StoreError> {
    // Two statements: SQLite answers a lone MIN or MAX from the key, both at once by a scan.
    let end = |sql: &str| -> Result<Option<i64>, StoreError> {
        Ok(conn.prepare_cached(sql)?.query_row([], |row| row.get(0))?)
    };
    let (Some(mut low), Some(high)) = (
        end("SELECT MIN(seq) FROM deliveries")?,
        end("SELECT MAX(seq) FROM deliveries")?,
    ) else {
        return Ok(0);
    };
    let mut first_young = high + 1;
    let mut probe = conn.prepare_cached(
        "SELECT seq, received_at FROM deliveries WHERE seq >= ?1 ORDER BY seq LIMIT 1",
    )?;
    // Every row below `low` was received before `before`; every row from `first_young` on, at
    // or after it.
    while low < first_young {
        let middle = low + (first_young - low) / 2;
        let found: Option<(i64, i64)> = probe
            .query_row([middle], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        match found {
            Some((seq, received_at)) if received_at < before => low = seq + 1,
            _ => first_young = middle,
        }
    }
    Ok(first_young - 1)
}

/// Where the deliveries that may stand at `status` with their work done are found: records
/// appended for them, each along a narrow index, in sequence order within `(?1, ?2]`, at most
/// `?3`. The view then says which of them really stand there now.
fn sources(status: Status) -> &'static [&'static str] {
    match status {
        Status::Delivered => &[
            "SELECT seq FROM closings WHERE status = 'delivered' AND seq > ?1 AND seq <= ?2 \
             ORDER BY seq LIMIT ?3",
            // Gated with no handler to run (migration 0007's index).
            "SELECT seq FROM verdicts WHERE handlers = '[]' AND seq > ?1 AND seq <= ?2 \
             ORDER BY seq LIMIT ?3",
        ],
        Status::Stale => &[
            "SELECT seq FROM closings WHERE status = 'stale' AND seq > ?1 AND seq <= ?2 \
             ORDER BY seq LIMIT ?3",
            "SELECT seq FROM verdicts WHERE status = 'stale' AND seq > ?1 AND seq <= ?2 \
             ORDER BY seq LIMIT ?3",
        ],
        Status::Unrecognized => &[
            "SELECT seq FROM closings WHERE status = 'unrecognized' AND seq > ?1 AND seq <= ?2 \
             ORDER BY seq LIMIT ?3",
            "SELECT seq FROM verdicts WHERE status = 'unrecognized' AND seq > ?1 \
             AND seq <= ?2 ORDER BY seq LIMIT ?3",
            "SELECT seq FROM deliveries WHERE accepted_as = 'unrecognized' AND seq > ?1 \
             AND seq <= ?2 ORDER BY seq LIMIT ?3",
            "SELECT seq FROM replays WHERE status = 'unrecognized' AND seq > ?1 AND seq <= ?2 \
             ORDER BY seq LIMIT ?3",
        ],
        Status::Dead => &[
            "SELECT seq FROM closings WHERE status = 'dead' AND seq > ?1 AND seq <= ?2 \
             ORDER BY seq LIMIT ?3",
        ],
        Status::Pending => &[],
    }
}

/// Deliveries finished at `status` with a sequence number in `(after, upto]`, oldest first, at
/// most `limit` of those `keep` accepts. Found through the records that say where a delivery
/// ended, so that the deliveries kept for another reason (a longer retention, work left) are
/// passed over in a narrow index instead of having each one's status worked out at every run.
fn finished_between(
    conn: &Connection,
    status: Status,
    (after, upto): (i64, i64),
    limit: u32,
    keep: impl Fn(&Doomed) -> bool,
) -> Result<Vec<Doomed>, StoreError> {
    let mut picked: Vec<Doomed> = Vec::new();
    let mut from = after;
    while picked.len() < limit as usize && from < upto {
        let mut seqs = Vec::new();
        for sql in sources(status) {
            let mut statement = conn.prepare_cached(sql)?;
            let found = statement.query_map((from, upto, limit), |row| row.get::<_, i64>(0))?;
            for seq in found {
                seqs.push(seq?);
            }
        }
        seqs.sort_unstable();
        seqs.dedup();
        // Each source is complete up to its own last row: up to `limit` of them, all are.
        seqs.truncate(limit as usize);
        let Some(&last) = seqs.last() else { break };
        for chunk in seqs.chunks(CHUNK) {
            let marks = vec!["?"; chunk.len()].join(",");
            let sql = format!(
                "SELECT {WALK_COLUMNS} FROM deliveries_now d WHERE d.seq IN ({marks}) \
                 ORDER BY d.seq"
            );
            let mut statement = conn.prepare_cached(&sql)?;
            let mut rows = statement.query(rusqlite::params_from_iter(chunk))?;
            while let Some(row) = rows.next()? {
                let (doomed, finished) = walked(row)?;
                let room = picked.len() < limit as usize;
                if room && finished && doomed.status == status && keep(&doomed) {
                    picked.push(doomed);
                }
            }
        }
        if seqs.len() < limit as usize {
            break;
        }
        from = last;
    }
    Ok(picked)
}

/// Rows past their retention, oldest first.
fn rows_to_delete(conn: &Connection, c: &Cutoffs, limit: u32) -> Result<Vec<Doomed>, StoreError> {
    let mut rows = Vec::new();
    let investigated = last_seq_before(conn, c.investigated_before)?;
    for (status, upto) in [
        (
            Status::Delivered,
            last_seq_before(conn, c.delivered_before)?,
        ),
        (Status::Stale, investigated),
        (Status::Unrecognized, investigated),
        (Status::Dead, investigated),
    ] {
        rows.extend(finished_between(conn, status, (0, upto), limit, |_| true)?);
    }
    rows.sort_by_key(|r| r.seq);
    rows.truncate(limit as usize);
    Ok(rows)
}

/// Rows that still have a body, oldest first, from after the newest body dropped so far
/// (bodies go in order, so the walk does not pass over the days of rows whose bodies are gone;
/// an older body that was kept then, its delivery not finished, goes with its row).
const UNPRUNED_BODIES: &str = "FROM deliveries_now d \
     WHERE d.seq > (SELECT COALESCE(MAX(seq), 0) FROM pruned_bodies) AND NOT d.body_pruned \
     ORDER BY d.seq";

/// Delivered rows whose bodies are past their retention (the rows stay), oldest first, from
/// after the newest body dropped so far (bodies go in order; an older body kept then, its
/// delivery not finished, goes with its row).
fn bodies_to_drop(conn: &Connection, c: &Cutoffs, limit: u32) -> Result<Vec<Doomed>, StoreError> {
    let after: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM pruned_bodies")?
        .query_row([], |row| row.get(0))?;
    let upto = last_seq_before(conn, c.bodies_before)?;
    finished_between(conn, Status::Delivered, (after, upto), limit, |d| {
        d.body_bytes > 0
    })
}

/// Bytes of bodies kept.
fn body_bytes(conn: &Connection) -> Result<u64, StoreError> {
    let bytes: i64 = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(body_len), 0) FROM deliveries d \
             WHERE NOT EXISTS (SELECT 1 FROM pruned_bodies p WHERE p.seq = d.seq)",
        )?
        .query_row([], |row| row.get(0))?;
    Ok(bytes.max(0) as u64)
}

/// Over the budget: the oldest finished deliveries whose bodies, dropped, bring the bytes kept
/// back under it (at most `limit` of them), skipping those in `already`.
fn bodies_over_budget(
    conn: &Connection,
    c: &Cutoffs,
    limit: u32,
    freed: u64,
    already: &HashSet<i64>,
) -> Result<Vec<Doomed>, StoreError> {
    let Some(budget) = c.max_body_bytes else {
        return Ok(Vec::new());
    };
    let kept = body_bytes(conn)?.saturating_sub(freed);
    let mut excess = kept.saturating_sub(budget);
    if excess == 0 {
        return Ok(Vec::new());
    }
    let sql = format!("SELECT {WALK_COLUMNS} {UNPRUNED_BODIES}");
    let room = limit.saturating_add(u32::try_from(already.len()).unwrap_or(u32::MAX));
    let rows = walk_finished(conn, &sql, [], room)?;
    let mut picked = Vec::new();
    for row in rows {
        if excess == 0 || picked.len() as u32 >= limit {
            break;
        }
        if already.contains(&row.seq) || row.body_bytes == 0 {
            continue;
        }
        excess = excess.saturating_sub(row.body_bytes);
        picked.push(row);
    }
    Ok(picked)
}

/// What one batch removes: rows, then bodies by age, then bodies over the budget.
fn plan(
    conn: &Connection,
    c: &Cutoffs,
    limit: u32,
) -> Result<(Vec<Doomed>, Vec<Doomed>), StoreError> {
    let rows = rows_to_delete(conn, c, limit)?;
    // Sets: a dry run plans the whole store at once.
    let deleted: HashSet<i64> = rows.iter().map(|r| r.seq).collect();
    let mut bodies: Vec<Doomed> = bodies_to_drop(conn, c, limit)?
        .into_iter()
        .filter(|b| !deleted.contains(&b.seq))
        .collect();
    let freed: u64 = rows.iter().chain(&bodies).map(|d| d.body_bytes).sum();
    let mut skip = deleted;
    skip.extend(bodies.iter().map(|b| b.seq));
    bodies.extend(bodies_over_budget(conn, c, limit, freed, &skip)?);
    Ok((rows, bodies))
}

fn report(rows: &[Doomed], bodies: &[Doomed]) -> PruneReport {
    PruneReport::of(
        rows.iter().map(|r| (r.status, r.body_bytes)),
        bodies.iter().map(|b| b.body_bytes),
    )
}

/// Counts what pruning would remove now, changing nothing.
pub fn dry_run(conn: &Connection, c: &Cutoffs) -> Result<PruneReport, StoreError> {
    let (rows, bodies) = plan(conn, c, u32::MAX)?;
    Ok(report(&rows, &bodies))
}

/// Removes one batch; returns what it removed and the blob files to delete after the commit.
pub fn prune_batch(
    conn: &Connection,
    c: &Cutoffs,
    limit: u32,
) -> Result<(PruneReport, Vec<String>), StoreError> {
    let (rows, bodies) = plan(conn, c, limit)?;
    let mut blobs = Vec::new();
    let gone: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    for sql in [
        "DELETE FROM attempts WHERE delivery_seq IN ({})",
        "DELETE FROM verdicts WHERE seq IN ({})",
        "DELETE FROM closings WHERE seq IN ({})",
        "DELETE FROM replays WHERE seq IN ({})",
        "DELETE FROM pruned_bodies WHERE seq IN ({})",
        "DELETE FROM bodies WHERE seq IN ({})",
        "DELETE FROM deliveries WHERE seq IN ({})",
    ] {
        for_each_chunk(conn, sql, &gone)?;
    }
    blobs.extend(rows.iter().filter_map(|r| r.blob_name.clone()));
    let dropped: Vec<i64> = bodies.iter().map(|b| b.seq).collect();
    for_each_chunk(conn, "DELETE FROM bodies WHERE seq IN ({})", &dropped)?;
    let mut mark = conn.prepare_cached("INSERT OR IGNORE INTO pruned_bodies (seq) VALUES (?1)")?;
    for seq in &dropped {
        mark.execute([seq])?;
    }
    blobs.extend(bodies.iter().filter_map(|b| b.blob_name.clone()));
    Ok((report(&rows, &bodies), blobs))
}

/// Rows deleted per statement.
const CHUNK: usize = 256;

/// Runs `sql` (with `{}` where the list of `seq`s goes) for `seqs`, a chunk at a time.
fn for_each_chunk(conn: &Connection, sql: &str, seqs: &[i64]) -> Result<(), StoreError> {
    for chunk in seqs.chunks(CHUNK) {
        let marks = vec!["?"; chunk.len()].join(",");
        conn.prepare_cached(&sql.replace("{}", &marks))?
            .execute(rusqlite::params_from_iter(chunk))?;
    }
    Ok(())
}

/// Free pages kept for the next inserts, as a share of the pages in use: under steady load
/// what one pruner run frees is filled again within seconds, and giving it back to the file
/// system only to grow the file again moves pages for nothing. What goes beyond (a backlog
/// pruned, a retention shortened) is given back.
const FREE_RESERVE_DIVISOR: i64 = 4;

/// Gives up to `pages` free pages beyond the reserve back to the file system; true when more
/// are left to give.
pub fn reclaim(conn: &Connection, pages: u32) -> Result<bool, StoreError> {
    let pragma = |name: &str| -> Result<i64, StoreError> {
        Ok(conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))?)
    };
    let free = pragma("freelist_count")?;
    let reserve = (pragma("page_count")? - free) / FREE_RESERVE_DIVISOR;
    let surplus = free - reserve;
    if surplus <= 0 {
        return Ok(false);
    }
    let step = surplus.min(i64::from(pages));
    // The pragma frees one page per step of its statement: step it to the end (a batch
    // execution steps it once, which freed a single page per call).
    let mut vacuum = conn.prepare(&format!("PRAGMA incremental_vacuum({step})"))?;
    let mut steps = vacuum.query([])?;
    while steps.next()?.is_some() {}
    Ok(surplus > step)
}

pub fn stats(conn: &Connection) -> Result<StoreStats, StoreError> {
    let pragma = |name: &str| -> Result<i64, StoreError> {
        Ok(conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))?)
    };
    let used_pages = pragma("page_count")? - pragma("freelist_count")?;
    let deliveries = super::reads::counts_by_status(conn)?;
    let oldest: Option<i64> = conn
        .prepare_cached("SELECT MIN(received_at) FROM deliveries")?
        .query_row([], |row| row.get(0))?;
    Ok(StoreStats {
        database_bytes: (used_pages.max(0) * pragma("page_size")?) as u64,
        body_bytes: body_bytes(conn)?,
        deliveries,
        oldest_received_at: oldest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(conn: &Connection, name: &str) -> i64 {
        conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
            .expect("pragma")
    }

    /// A database of `rows` 4 KiB rows, of which the first `deleted` are deleted.
    fn database(rows: i64, deleted: i64) -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL; CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB);",
        )
        .expect("schema");
        for id in 0..rows {
            conn.execute("INSERT INTO t (id, b) VALUES (?1, zeroblob(4000))", [id])
                .expect("insert");
        }
        conn.execute("DELETE FROM t WHERE id < ?1", [deleted])
            .expect("delete");
        conn
    }

    #[test]
    fn the_newest_row_before_a_time_is_found_among_gaps_in_the_sequence() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "CREATE TABLE deliveries (seq INTEGER PRIMARY KEY, received_at INTEGER NOT NULL);",
        )
        .expect("schema");
        assert_eq!(last_seq_before(&conn, 1_000).expect("empty"), 0);
        // Rows 5..=400 with gaps (every third is gone, as retention leaves them), row n received
        // at 10 n.
        for seq in (5..=400).filter(|n| n % 3 != 0) {
            conn.execute(
                "INSERT INTO deliveries (seq, received_at) VALUES (?1, ?2)",
                [seq, seq * 10],
            )
            .expect("insert");
        }
        let newest_before = |at: i64| last_seq_before(&conn, at).expect("search");
        // Before every row: below the first; after every row: the last.
        assert!(newest_before(50) < 5);
        assert_eq!(newest_before(4_001), 400);
        // 1,000 is row 100's time: the newest row before it is 98 (99 is gone).
        assert_eq!(newest_before(1_000), 98);
        assert_eq!(newest_before(1_001), 100);
        for at in (0..4_100).step_by(37) {
            let expected = (5..=400)
                .filter(|n| n % 3 != 0 && n * 10 < at)
                .max()
                .unwrap_or(0);
            let found = newest_before(at);
            assert!(
                found == expected || (expected == 0 && found < 5),
                "{at}: {found} != {expected}"
            );
        }
    }

    #[test]
    fn one_reclaim_gives_back_many_pages_down_to_the_reserve() {
        let conn = database(1000, 900);
        let free = pages(&conn, "freelist_count");
        assert!(free > 800, "{free}");
        // One call frees up to its step, not one page.
        assert!(reclaim(&conn, 300).expect("reclaim"), "more is left");
        assert!(pages(&conn, "freelist_count") <= free - 300);
        while reclaim(&conn, 300).expect("reclaim") {}
        let used = pages(&conn, "page_count") - pages(&conn, "freelist_count");
        assert!(pages(&conn, "freelist_count") <= used / FREE_RESERVE_DIVISOR + 1);
    }

    #[test]
    fn free_pages_within_the_reserve_are_kept_for_the_next_inserts() {
        let conn = database(1000, 100);
        let free = pages(&conn, "freelist_count");
        assert!(free > 50, "{free}");
        assert!(!reclaim(&conn, 2048).expect("reclaim"));
        assert_eq!(pages(&conn, "freelist_count"), free);
    }
}
