//! Keeping the leases of running deliveries alive: every third of `dispatch.lease`, the leases
//! of everything this process is handling are renewed. A delivery whose lease could not be
//! renewed (it ran out and another replica took it, or it was replayed) is cancelled here: its
//! attempts are abandoned and not recorded, since the new holder runs them.
//!
//! If the store cannot be reached, nothing is cancelled: the attempts go on, and whether they
//! still count is decided when they are recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{LeaseOwner, Queue};

/// The deliveries this process is handling, each with the token that cancels it.
#[derive(Debug, Clone, Default)]
pub struct Running {
    inner: Arc<Mutex<Claims>>,
}

#[derive(Debug, Default)]
struct Claims {
    /// Per delivery: which claim of it (a delivery retried later is claimed again), and its
    /// token.
    by_seq: HashMap<i64, (u64, CancellationToken)>,
    next_claim: u64,
}

impl Running {
    /// Registers `seqs`, claimed together (a lane head and its chain); the token is cancelled
    /// when the lease of any of them is lost.
    pub fn start(&self, seqs: &[i64]) -> CancellationToken {
        let token = CancellationToken::new();
        if let Ok(mut claims) = self.inner.lock() {
            claims.next_claim += 1;
            let claim = claims.next_claim;
            for &seq in seqs {
                claims.by_seq.insert(seq, (claim, token.clone()));
            }
        }
        token
    }

    pub fn finish(&self, seqs: &[i64]) {
        if let Ok(mut claims) = self.inner.lock() {
            for seq in seqs {
                claims.by_seq.remove(seq);
            }
        }
    }

    fn snapshot(&self) -> Vec<(i64, u64)> {
        self.inner
            .lock()
            .map(|claims| {
                claims
                    .by_seq
                    .iter()
                    .map(|(seq, (claim, _))| (*seq, *claim))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Cancels the claims of `asked` that the store no longer holds for us, unless they
    /// finished (or were claimed afresh) meanwhile.
    fn cancel_unless_held(&self, asked: &[(i64, u64)], held: &[i64]) {
        let Ok(claims) = self.inner.lock() else {
            return;
        };
        for (seq, claim) in asked.iter().filter(|(seq, _)| !held.contains(seq)) {
            if let Some((current, token)) = claims.by_seq.get(seq) {
                if current == claim {
                    // The delivery's task says so, in its span (with its delivery and request
                    // ids), when it sees the token cancelled.
                    tracing::debug!(seq, "lease not renewed: cancelling its attempts");
                    token.cancel();
                }
            }
        }
    }
}

/// Renews the leases of `running` until `stop` is cancelled.
pub async fn renew_until_stopped(
    queue: Arc<dyn Queue>,
    owner: LeaseOwner,
    lease: Duration,
    running: Running,
    stop: CancellationToken,
) {
    let every = (lease / 3).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let asked = running.snapshot();
        if asked.is_empty() {
            continue;
        }
        let seqs: Vec<i64> = asked.iter().map(|(seq, _)| *seq).collect();
        match queue.renew(&owner, &seqs, lease).await {
            Ok(held) => running.cancel_unless_held(&asked, &held),
            Err(e) => tracing::warn!(error = %e, "could not renew leases; retrying"),
        }
    }
}
