//! Reading a request body as a stream: size limit, pace, memory budget, and the verifier (HMAC
//! and SHA-256) fed while the bytes arrive; small bodies kept in memory, large ones written to
//! the store's body storage as they come.
//!
//! A body's signature is only known once the last byte is in, so everything here is spent on
//! a sender not yet authenticated, and each resource has a bound that such a sender cannot
//! stretch:
//! - **memory**: at most `inline_max` bytes per body, copied out of hyper's buffers (so a
//!   trickle of tiny chunks cannot pin a buffer each), and all bodies together within
//!   [`MemoryBudget`]; a body that would go beyond it is refused at once (503) rather than made
//!   to wait, since bodies waiting for each other's memory would only time out together;
//! - **disk**: a body past `inline_max` spills to the store only with a slot of
//!   [`SpillSlots`], a few in all and fewer per client address; waiting for a slot leaves the
//!   rest of the body in the socket (backpressure, not disk);
//! - **time**: besides `server.body_timeout` for the whole body, the body must keep a minimum
//!   pace ([`Pace`]), so an upload that trickles a byte now and then gives its slot, its
//!   memory and its connection back after the grace period instead of at `body_timeout`.
//!   Slots are the scarce part: without the pace rule, four trickling forged uploads held every
//!   slot for the whole `body_timeout` while a genuine large delivery waited behind them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::delivery::{BodyVerifier, IncomingBody};
use crate::store::{BodyStore, BodyWriter};

/// `server.min_body_bytes_per_second` by default: 64 KiB/s. Labelbox sends from cloud
/// egress, orders of magnitude faster; a 1 GiB body needs 3.5 MiB/s to meet the default
/// `body_timeout` anyway. Holding one slot at this pace costs a sender a steady 0.5 Mbit/s.
pub const DEFAULT_MIN_BODY_BYTES_PER_SECOND: u64 = 64 * 1024;
/// `server.body_rate_grace` by default.
pub const DEFAULT_BODY_RATE_GRACE: Duration = Duration::from_secs(10);
/// The smallest allocation an in-memory body starts with: most bodies are a few KiB.
const FIRST_BUFFER_BYTES: usize = 4096;
/// The largest block of an in-memory body; a larger body is kept in several.
const BLOCK_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body exceeds the limit")]
    TooLarge,
    #[error("body arrived too slowly")]
    TooSlow,
    #[error("bodies in flight hold all the memory allowed")]
    Overloaded,
    #[error("reading the body failed: {0}")]
    Read(String),
    #[error("writing the body to the store failed: {0}")]
    Spill(#[from] std::io::Error),
}

/// The minimum pace a body must keep, as a credit of time: it starts at `grace`, drains while
/// labelhook waits for the client's next bytes, and refills by `1 / bytes_per_second` for each
/// byte, never above `grace`. Running out means the body fell more than `grace` behind the
/// minimum pace. Time labelhook spends waiting on itself (for a spill slot, for the disk) is
/// not counted: that wait is its own backpressure, not the sender's slowness.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// 0 turns the rule off.
    pub min_bytes_per_second: u64,
    pub grace: Duration,
}

/// The credit left to one body under a [`Pace`].
struct Credit {
    pace: Pace,
    left: Duration,
}

impl Credit {
    fn new(pace: Pace) -> Self {
        Self {
            pace,
            left: pace.grace,
        }
    }

    /// How long the next bytes may take; `None` when the rule is off.
    fn allowance(&self) -> Option<Duration> {
        (self.pace.min_bytes_per_second > 0).then_some(self.left)
    }

    /// `waited` for the client, then `bytes` arrived; false when the body fell too far behind.
    fn spend(&mut self, waited: Duration, bytes: usize) -> bool {
        if self.pace.min_bytes_per_second == 0 {
            return true;
        }
        let Some(left) = self.left.checked_sub(waited) else {
            return false;
        };
        let earned = Duration::from_secs_f64(bytes as f64 / self.pace.min_bytes_per_second as f64);
        self.left = (left + earned).min(self.pace.grace);
        true
    }
}

/// Body bytes held in memory by all requests together, in bytes.
#[derive(Debug)]
pub struct MemoryBudget(Arc<Semaphore>);

impl MemoryBudget {
    pub fn new(max_bytes: u64) -> Self {
        let permits = usize::try_from(max_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self(Arc::new(Semaphore::new(permits)))
    }

    /// Bytes not taken by any body now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.0.available_permits()
    }

    fn reservation(&self) -> Reserved {
        Reserved {
            budget: Arc::clone(&self.0),
            bytes: 0,
        }
    }
}

/// Bytes of a [`MemoryBudget`] held by one body; given back when dropped.
#[derive(Debug)]
pub struct Reserved {
    budget: Arc<Semaphore>,
    bytes: usize,
}

impl Reserved {
    /// Takes `more` bytes, or fails at once when the budget does not have them.
    fn grow(&mut self, more: usize) -> Result<(), BodyError> {
        let count = u32::try_from(more).map_err(|_| BodyError::Overloaded)?;
        match self.budget.try_acquire_many(count) {
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::NoPermits) => return Err(BodyError::Overloaded),
            Err(TryAcquireError::Closed) => return Err(BodyError::Read("shutting down".into())),
        }
        self.bytes += more;
        Ok(())
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.add_permits(self.bytes);
        }
    }
}

/// The right to write one body to the store's body storage: `total` slots in all, at most
/// `per_client` of them held by one client address at once. The cap per address keeps one
/// sender (whose signature is not yet known) from holding every slot; it is only as good as
/// the client address, so `network.trusted_proxies` must name the proxies in front.
#[derive(Debug)]
pub struct SpillSlots {
    total: Arc<Semaphore>,
    per_client: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
    released: Notify,
}

impl SpillSlots {
    pub fn new(total: usize, per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(total)),
            per_client: per_client.max(1),
            held: Mutex::new(HashMap::new()),
            released: Notify::new(),
        })
    }

    /// Waits for a slot for `client`: first its share, then one of the total.
    async fn acquire(self: &Arc<Self>, client: IpAddr) -> Result<SpillSlot, BodyError> {
        loop {
            // Registered before looking, so a release between the look and the wait is seen.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.take_share(client) {
                break;
            }
            released.await;
        }
        let share = ClientShare {
            slots: Arc::clone(self),
            client,
        };
        let permit = Arc::clone(&self.total)
            .acquire_owned()
            .await
            .map_err(|_| BodyError::Read("shutting down".into()))?;
        Ok(SpillSlot {
            _permit: permit,
            _share: share,
        })
    }

    fn take_share(&self, client: IpAddr) -> bool {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(client).or_insert(0);
        if *count >= self.per_client {
            return false;
        }
        *count += 1;
        true
    }

    fn give_share(&self, client: IpAddr) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&client);
            }
        }
        drop(held);
        self.released.notify_waiters();
    }
}

/// One client's share of [`SpillSlots`], given back when dropped.
#[derive(Debug)]
struct ClientShare {
    slots: Arc<SpillSlots>,
    client: IpAddr,
}

impl Drop for ClientShare {
    fn drop(&mut self) {
        self.slots.give_share(self.client);
    }
}

/// A held spill slot; dropping it lets the next body spill.
#[derive(Debug)]
struct SpillSlot {
    _permit: OwnedSemaphorePermit,
    _share: ClientShare,
}

enum Buffer {
    /// The bytes so far, and the budget they hold.
    Memory(InMemory),
    /// Holds a spill slot until the whole body has arrived.
    Store(Box<dyn BodyWriter>, SpillSlot),
}

/// Where and how much a body may take.
pub struct BodyLimits<'a> {
    /// Larger bodies are refused (413) as soon as the limit is crossed.
    pub max_bytes: u64,
    /// Larger bodies are written to the store's body storage as they arrive.
    pub inline_max: u64,
    pub bodies: &'a dyn BodyStore,
    pub spill_slots: &'a Arc<SpillSlots>,
    pub memory: &'a MemoryBudget,
    pub pace: Pace,
    /// Whose share of the spill slots a spilling body takes.
    pub client: IpAddr,
}

/// A body read to its end, and the memory it holds until the request is answered.
#[derive(Debug)]
pub struct Received {
    pub body: IncomingBody,
    /// Drop it once the body is stored (or refused), not before: the bytes are still held.
    pub memory: Option<Reserved>,
}

/// Reads `body` to its end, feeding `verifier`, within `limits`.
pub async fn receive(
    body: Body,
    limits: &BodyLimits<'_>,
    verifier: &mut BodyVerifier,
) -> Result<Received, BodyError> {
    let mut stream = body.into_data_stream();
    let mut total: u64 = 0;
    let mut credit = Credit::new(limits.pace);
    let mut buffer = Buffer::Memory(InMemory::new(limits.memory.reservation()));
    loop {
        let waiting = Instant::now();
        let next = futures_util::StreamExt::next(&mut stream);
        let next = match credit.allowance() {
            None => next.await,
            Some(allowed) => tokio::time::timeout(allowed, next)
                .await
                .map_err(|_| BodyError::TooSlow)?,
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        if !credit.spend(waiting.elapsed(), chunk.len()) {
            return Err(BodyError::TooSlow);
        }
        total += chunk.len() as u64;
        if total > limits.max_bytes {
            return Err(BodyError::TooLarge);
        }
        verifier.update(&chunk);
        buffer = match buffer {
            Buffer::Memory(mut body) if total <= limits.inline_max => {
                body.push(&chunk, limits.inline_max)?;
                Buffer::Memory(body)
            }
            Buffer::Memory(body) => {
                // Waiting here leaves the rest of the body in the socket: backpressure, not
                // disk, for senders beyond the limit.
                let slot = limits.spill_slots.acquire(limits.client).await?;
                let mut writer = limits.bodies.create().await?;
                for block in body.blocks {
                    if !block.is_empty() {
                        writer.write(Bytes::from(block)).await?;
                    }
                }
                writer.write(chunk).await?;
                Buffer::Store(writer, slot)
            }
            Buffer::Store(mut writer, slot) => {
                writer.write(chunk).await?;
                Buffer::Store(writer, slot)
            }
        };
    }
    Ok(match buffer {
        Buffer::Memory(body) => {
            let (bytes, reserved) = body.into_bytes();
            Received {
                body: IncomingBody::Inline(bytes),
                memory: Some(reserved),
            }
        }
        Buffer::Store(writer, _slot) => Received {
            body: IncomingBody::Staged(writer.finish().await?),
            memory: None,
        },
    })
}

/// A body kept in memory, and the budget it holds.
///
/// It is kept in blocks: the first starts at [`FIRST_BUFFER_BYTES`] and doubles up to
/// [`BLOCK_BYTES`], so a body declaring a large length but sending little takes little, and
/// a larger body gets further blocks of [`BLOCK_BYTES`] rather than one allocation doubled
/// again and again. Each doubling copied the body into a new allocation and freed the old
/// one; with many bodies arriving at once the freed buffers became holes the allocator could
/// not give to the next, larger allocation, and a stalled 64 KiB upload held about 17 KiB of
/// them besides its body (issue 22). Blocks of one size fit each other's holes.
struct InMemory {
    blocks: Vec<Vec<u8>>,
    reserved: Reserved,
}

impl InMemory {
    fn new(reserved: Reserved) -> Self {
        Self {
            blocks: Vec::new(),
            reserved,
        }
    }

    /// Appends `chunk`, taking what the allocations grow by from the budget first. The caller
    /// keeps the body within `inline_max`, and so are the allocations.
    fn push(&mut self, mut chunk: &[u8], inline_max: u64) -> Result<(), BodyError> {
        while !chunk.is_empty() {
            let room = self.blocks.last().map_or(0, |b| b.capacity() - b.len());
            if room == 0 {
                self.make_room(chunk.len(), inline_max)?;
                continue;
            }
            let (now, rest) = chunk.split_at(room.min(chunk.len()));
            if let Some(block) = self.blocks.last_mut() {
                block.extend_from_slice(now);
            }
            chunk = rest;
        }
        Ok(())
    }

    /// Grows the first block (doubling, up to [`BLOCK_BYTES`]) or adds a block, for `more`
    /// bytes to come.
    fn make_room(&mut self, more: usize, inline_max: u64) -> Result<(), BodyError> {
        let held: usize = self.blocks.iter().map(Vec::capacity).sum();
        let left = usize::try_from(inline_max)
            .unwrap_or(usize::MAX)
            .saturating_sub(held)
            .max(1);
        match self.blocks.as_mut_slice() {
            [first] if first.capacity() < BLOCK_BYTES => {
                let target = (first.len() + more)
                    .max(first.capacity().saturating_mul(2))
                    .min(BLOCK_BYTES)
                    .min(first.capacity() + left);
                self.reserved.grow(target - first.capacity())?;
                first.reserve_exact(target - first.len());
            }
            _ => {
                let first = self.blocks.is_empty();
                let size = if first {
                    more.clamp(FIRST_BUFFER_BYTES, BLOCK_BYTES)
                } else {
                    BLOCK_BYTES
                }
                .min(left);
                self.reserved.grow(size)?;
                self.blocks.push(Vec::with_capacity(size));
            }
        }
        Ok(())
    }

    /// The body in one piece (copied once when it took several blocks), and its budget.
    fn into_bytes(self) -> (Bytes, Reserved) {
        let bytes = match <[Vec<u8>; 1]>::try_from(self.blocks) {
            Ok([one]) => Bytes::from(one),
            Err(blocks) => Bytes::from(blocks.concat()),
        };
        (bytes, self.reserved)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pace(rate: u64, grace_ms: u64) -> Pace {
        Pace {
            min_bytes_per_second: rate,
            grace: Duration::from_millis(grace_ms),
        }
    }

    #[test]
    fn a_body_keeping_the_pace_never_runs_out_of_credit() {
        let mut credit = Credit::new(pace(1000, 2000));
        for _ in 0..100 {
            // 1000 bytes a second, in chunks of 100 every 100 ms.
            assert!(credit.spend(Duration::from_millis(100), 100));
        }
        assert_eq!(credit.allowance(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn a_trickle_runs_out_after_the_grace_period() {
        let mut credit = Credit::new(pace(1000, 2000));
        let mut seconds = 0;
        while credit.spend(Duration::from_secs(1), 1) {
            seconds += 1;
            assert!(seconds < 10, "a byte a second kept going");
        }
        assert_eq!(seconds, 2);
    }

    #[test]
    fn credit_is_capped_so_a_fast_start_buys_no_long_stall() {
        let mut credit = Credit::new(pace(1000, 2000));
        assert!(credit.spend(Duration::ZERO, 10_000_000));
        assert_eq!(credit.allowance(), Some(Duration::from_secs(2)));
        assert!(!credit.spend(Duration::from_millis(2001), 1));
    }

    #[test]
    fn a_rate_of_zero_turns_the_rule_off() {
        let mut credit = Credit::new(pace(0, 0));
        assert_eq!(credit.allowance(), None);
        assert!(credit.spend(Duration::from_secs(3600), 0));
    }

    #[test]
    fn the_memory_budget_refuses_at_once_and_is_given_back_on_drop() {
        let budget = MemoryBudget::new(10_000);
        let mut a = budget.reservation();
        a.grow(8_000).unwrap();
        let mut b = budget.reservation();
        assert!(matches!(b.grow(4_000), Err(BodyError::Overloaded)));
        b.grow(2_000).unwrap();
        assert_eq!(budget.available(), 0);
        drop(a);
        drop(b);
        assert_eq!(budget.available(), 10_000);
    }

    #[test]
    fn growth_starts_small_doubles_then_adds_blocks_up_to_the_inline_limit() {
        let budget = MemoryBudget::new(1 << 20);
        let mut body = InMemory::new(budget.reservation());
        let mut sent = Vec::new();
        let mut push = |body: &mut InMemory, n: usize| {
            let chunk: Vec<u8> = (0..n).map(|i| (sent.len() + i) as u8).collect();
            body.push(&chunk, 65_536).unwrap();
            sent.extend_from_slice(&chunk);
            body.blocks.iter().map(Vec::capacity).collect::<Vec<_>>()
        };
        assert_eq!(push(&mut body, 1), [FIRST_BUFFER_BYTES]);
        assert_eq!(
            push(&mut body, FIRST_BUFFER_BYTES - 1),
            [FIRST_BUFFER_BYTES]
        );
        assert_eq!(push(&mut body, 1), [2 * FIRST_BUFFER_BYTES]);
        assert_eq!(push(&mut body, 10_000), [BLOCK_BYTES]);
        assert_eq!(push(&mut body, 39_999), [BLOCK_BYTES; 4]);
        assert_eq!(budget.available(), (1 << 20) - 65_536);
        let (bytes, reserved) = body.into_bytes();
        assert_eq!(bytes, sent);
        drop(reserved);
        assert_eq!(budget.available(), 1 << 20);
    }

    #[test]
    fn a_small_inline_limit_bounds_the_allocation() {
        let budget = MemoryBudget::new(1 << 20);
        let mut body = InMemory::new(budget.reservation());
        body.push(&[b'x'; 1000], 1024).unwrap();
        body.push(&[b'y'; 24], 1024).unwrap();
        assert_eq!(budget.available(), (1 << 20) - 1024);
        assert_eq!(body.into_bytes().0.len(), 1024);
    }

    #[tokio::test]
    async fn one_client_cannot_hold_more_than_its_share_of_spill_slots() {
        let slots = SpillSlots::new(4, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = slots.acquire(a).await.unwrap();
        let _second = slots.acquire(a).await.unwrap();
        let third = tokio::time::timeout(Duration::from_millis(50), slots.acquire(a)).await;
        assert!(third.is_err(), "a third slot for the same client");
        // Another client still gets one at once.
        let _other = tokio::time::timeout(Duration::from_millis(50), slots.acquire(b))
            .await
            .unwrap()
            .unwrap();
        // The first client's next body goes as soon as one of its own is done.
        let waiting = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.acquire(a).await.map(|_| ()) }
        });
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
