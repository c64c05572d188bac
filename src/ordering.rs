//! The ordering gate: decides whether an event is applied (fresh) or stale for its entity.
//!
//! Labelbox may deliver an event more than once and does not keep them in order, so every event
//! is checked against the last state applied for its entity (a label, a data row, ...). This
//! module only decides; the store keeps the [`Applied`] state and records the verdict in the
//! same transaction as the delivery's status. It is pure: no I/O, no clock, no async.
//!
//! Rules, for an event with version `v` and kind `c` against the stored state:
//!
//! 1. No stored state: fresh.
//! 2. A delete is terminal. Once a `Deleted` was applied, every later arrival is stale, except the
//!    same `Deleted` at the same version (a re-delivery, applied again so handlers that failed can
//!    see it), and a versionless `Deleted` (nothing to compare it with, and deleting twice is
//!    harmless).
//! 3. A newer version than the stored one is fresh; an older one is stale.
//! 4. At equal versions `Deleted` outranks `Updated` outranks `Created`: a higher or equal rank is
//!    fresh (the same kind again is a re-application), a lower rank is stale. Labelbox timestamps
//!    often have whole-second precision, so ties are common and must not drop real changes.
//! 5. An event without a version is fresh unless the entity is deleted (rule 2). It does not move
//!    the stored version, because it says nothing about where it sits in time, but a versionless
//!    `Deleted` still marks the entity deleted.
//! 6. A stored state without a version (only versionless events so far) is older than any
//!    versioned event.
//! 7. A backfilled event (rebuilt from Labelbox's export after an outage) is applied only when
//!    it is strictly newer than a state applied from a webhook: at the same version the
//!    handlers have it already, whatever the kinds, and a versionless one has nothing to show
//!    it is new. Against nothing applied, or a state a backfill applied (itself, replayed), rules
//!    1 to 6 hold. So a backfill never hands on twice what a webhook brought
//!    ([`decide_backfilled`]).

use std::cmp::Ordering;
use std::fmt;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Kind of change, ranked for ties at equal versions: Deleted > Updated > Created.
///
/// The variant order is the rank, so the derived `Ord` is the tie-break order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// The entity came into being.
    Created,
    /// The entity changed.
    Updated,
    /// The entity is gone; nothing after this is applied.
    Deleted,
}

impl Change {
    /// Stable lowercase name, suitable for storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Deleted => "deleted",
        }
    }

    /// Inverse of [`Change::as_str`]; `None` for any other string.
    pub fn parse(s: &str) -> Option<Change> {
        match s {
            "created" => Some(Change::Created),
            "updated" => Some(Change::Updated),
            "deleted" => Some(Change::Deleted),
            _ => None,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A version: an instant with nanosecond precision, stored as i64 nanoseconds since the Unix
/// epoch.
///
/// An integer rather than the timestamp string, because strings with and without a fraction or
/// with different offsets do not sort correctly, and an integer is cheap to store and compare in
/// SQL. The i64 range covers the years 1677 to 2262.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(i64);

impl Version {
    /// Parses an RFC 3339 timestamp: the fraction is optional and any offset is accepted, e.g.
    /// `2024-05-02T08:30:12Z`, `2024-05-02T08:30:12.345Z`, `2024-05-02T10:30:12+02:00`.
    /// `None` when the string is not RFC 3339 or lies outside the representable range.
    pub fn parse_rfc3339(s: &str) -> Option<Version> {
        let at = OffsetDateTime::parse(s.trim(), &Rfc3339).ok()?;
        i64::try_from(at.unix_timestamp_nanos()).ok().map(Version)
    }

    /// Wraps nanoseconds since the Unix epoch (as read back from the store).
    pub fn from_nanos(nanos: i64) -> Version {
        Version(nanos)
    }

    /// Nanoseconds since the Unix epoch (what the store keeps).
    pub fn as_nanos(self) -> i64 {
        self.0
    }
}

/// As RFC 3339 text, as it is shown everywhere else.
impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Version::parse_rfc3339(&text)
            .ok_or_else(|| serde::de::Error::custom("not an RFC 3339 timestamp"))
    }
}

impl fmt::Display for Version {
    /// RFC 3339 in UTC, with only as many fraction digits as needed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let formatted = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0))
            .ok()
            .and_then(|at| at.format(&Rfc3339).ok());
        match formatted {
            Some(s) => f.write_str(&s),
            // Every i64 is in range for `time`, so this is only a guard against a library change.
            None => write!(f, "{}ns", self.0),
        }
    }
}

/// What the store keeps per entity: the last applied version and change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Version of the last applied versioned event; `None` while only versionless events were
    /// applied.
    pub version: Option<Version>,
    /// Kind of the last applied event that set the version, or `Deleted` once the entity is
    /// deleted.
    pub change: Change,
    /// The last applied event was a backfilled one (rule 7).
    pub backfilled: bool,
}

/// Outcome of the gate for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Apply the event: give it to handlers.
    Fresh,
    /// An equal-or-newer state was applied already: store the event, don't apply it.
    Stale,
}

impl Verdict {
    /// `true` for [`Verdict::Fresh`].
    pub fn is_fresh(self) -> bool {
        self == Verdict::Fresh
    }
}

/// Decides whether an event for an entity is applied, and returns the state to store when it is.
///
/// `last` is the stored state for the entity (`None` if it was never seen). The returned state
/// is `Some` exactly when the verdict is [`Verdict::Fresh`]; it may equal `last` (a re-applied
/// event, or a versionless one), in which case the caller may skip the write.
pub fn decide(
    last: Option<&Applied>,
    version: Option<Version>,
    change: Change,
) -> (Verdict, Option<Applied>) {
    let (verdict, state) = by_rules(last, version, change);
    (
        verdict,
        state.map(|s| Applied {
            backfilled: false,
            ..s
        }),
    )
}

/// [`decide`] for a backfilled event (rule 7): against a state a webhook applied, only a
/// strictly newer version is fresh.
pub fn decide_backfilled(
    last: Option<&Applied>,
    version: Option<Version>,
    change: Change,
) -> (Verdict, Option<Applied>) {
    if let Some(last) = last.filter(|l| !l.backfilled) {
        let newer = match (version, last.version) {
            (Some(version), Some(last_version)) => version > last_version,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !newer {
            return (Verdict::Stale, None);
        }
    }
    let (verdict, state) = by_rules(last, version, change);
    (
        verdict,
        state.map(|s| Applied {
            backfilled: true,
            ..s
        }),
    )
}

/// Rules 1 to 6.
fn by_rules(
    last: Option<&Applied>,
    version: Option<Version>,
    change: Change,
) -> (Verdict, Option<Applied>) {
    let fresh = |version, change| {
        (
            Verdict::Fresh,
            Some(Applied {
                version,
                change,
                backfilled: false,
            }),
        )
    };
    let stale = (Verdict::Stale, None);

    let Some(last) = last else {
        return fresh(version, change);
    };

    if last.change == Change::Deleted {
        // Terminal: only the same delete again is applied.
        let same_delete =
            change == Change::Deleted && (version.is_none() || version == last.version);
        return if same_delete {
            fresh(last.version, last.change)
        } else {
            stale
        };
    }

    let Some(version) = version else {
        // Versionless: keep the stored version, but a delete still ends the entity.
        let change = if change == Change::Deleted {
            Change::Deleted
        } else {
            last.change
        };
        return fresh(last.version, change);
    };

    let Some(last_version) = last.version else {
        return fresh(Some(version), change);
    };

    match version.cmp(&last_version) {
        Ordering::Greater => fresh(Some(version), change),
        Ordering::Equal if change >= last.change => fresh(Some(version), change),
        Ordering::Equal | Ordering::Less => stale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn v(nanos: i64) -> Option<Version> {
        Some(Version::from_nanos(nanos))
    }

    fn applied(nanos: i64, change: Change) -> Applied {
        Applied {
            version: v(nanos),
            change,
            backfilled: false,
        }
    }

    fn backfilled(nanos: i64, change: Change) -> Applied {
        Applied {
            backfilled: true,
            ..applied(nanos, change)
        }
    }

    #[test]
    fn first_event_for_an_entity_is_fresh_and_stored() {
        assert_eq!(
            decide(None, v(10), Change::Updated),
            (Verdict::Fresh, Some(applied(10, Change::Updated)))
        );
    }

    #[test]
    fn newer_version_is_fresh_whatever_its_kind() {
        let last = applied(10, Change::Updated);
        for change in [Change::Created, Change::Updated, Change::Deleted] {
            assert_eq!(
                decide(Some(&last), v(11), change),
                (Verdict::Fresh, Some(applied(11, change)))
            );
        }
    }

    #[test]
    fn older_version_is_stale_whatever_its_kind() {
        let last = applied(10, Change::Created);
        for change in [Change::Created, Change::Updated, Change::Deleted] {
            assert_eq!(decide(Some(&last), v(9), change), (Verdict::Stale, None));
        }
    }

    #[test]
    fn tie_updated_beats_created() {
        let last = applied(10, Change::Created);
        assert_eq!(
            decide(Some(&last), v(10), Change::Updated),
            (Verdict::Fresh, Some(applied(10, Change::Updated)))
        );
        let last = applied(10, Change::Updated);
        assert_eq!(
            decide(Some(&last), v(10), Change::Created),
            (Verdict::Stale, None)
        );
    }

    #[test]
    fn tie_deleted_beats_updated_and_created() {
        for before in [Change::Created, Change::Updated] {
            let last = applied(10, before);
            assert_eq!(
                decide(Some(&last), v(10), Change::Deleted),
                (Verdict::Fresh, Some(applied(10, Change::Deleted)))
            );
        }
    }

    #[test]
    fn same_kind_at_same_version_is_applied_again() {
        for change in [Change::Created, Change::Updated, Change::Deleted] {
            let last = applied(10, change);
            assert_eq!(
                decide(Some(&last), v(10), change),
                (Verdict::Fresh, Some(last))
            );
        }
    }

    #[test]
    fn delete_is_terminal_for_newer_events() {
        let last = applied(10, Change::Deleted);
        for change in [Change::Created, Change::Updated, Change::Deleted] {
            assert_eq!(decide(Some(&last), v(11), change), (Verdict::Stale, None));
        }
    }

    #[test]
    fn delete_is_terminal_for_lower_ranks_at_the_same_version() {
        let last = applied(10, Change::Deleted);
        for change in [Change::Created, Change::Updated] {
            assert_eq!(decide(Some(&last), v(10), change), (Verdict::Stale, None));
        }
    }

    #[test]
    fn versionless_event_is_fresh_and_keeps_the_stored_version() {
        let last = applied(10, Change::Updated);
        for change in [Change::Created, Change::Updated] {
            assert_eq!(
                decide(Some(&last), None, change),
                (Verdict::Fresh, Some(last))
            );
        }
    }

    #[test]
    fn versionless_first_event_is_fresh() {
        assert_eq!(
            decide(None, None, Change::Created),
            (
                Verdict::Fresh,
                Some(Applied {
                    version: None,
                    change: Change::Created,
                    backfilled: false,
                })
            )
        );
    }

    #[test]
    fn versionless_delete_marks_the_entity_deleted_without_moving_the_version() {
        let last = applied(10, Change::Updated);
        let (verdict, state) = decide(Some(&last), None, Change::Deleted);
        assert_eq!(verdict, Verdict::Fresh);
        assert_eq!(state, Some(applied(10, Change::Deleted)));
        // And the entity is now deleted for later events.
        assert_eq!(
            decide(state.as_ref(), v(11), Change::Updated),
            (Verdict::Stale, None)
        );
    }

    #[test]
    fn versionless_event_after_delete_is_stale_unless_it_is_a_delete() {
        let last = applied(10, Change::Deleted);
        assert_eq!(
            decide(Some(&last), None, Change::Updated),
            (Verdict::Stale, None)
        );
        assert_eq!(
            decide(Some(&last), None, Change::Created),
            (Verdict::Stale, None)
        );
        assert_eq!(
            decide(Some(&last), None, Change::Deleted),
            (Verdict::Fresh, Some(last))
        );
    }

    #[test]
    fn versioned_event_after_only_versionless_ones_is_fresh() {
        let last = Applied {
            version: None,
            change: Change::Updated,
            backfilled: false,
        };
        assert_eq!(
            decide(Some(&last), v(5), Change::Created),
            (Verdict::Fresh, Some(applied(5, Change::Created)))
        );
    }

    #[test]
    fn rule_7_a_backfill_at_the_version_a_webhook_applied_is_stale_whatever_its_kind() {
        for before in [Change::Created, Change::Updated] {
            let last = applied(10, before);
            for change in [Change::Created, Change::Updated, Change::Deleted] {
                assert_eq!(
                    decide_backfilled(Some(&last), v(10), change),
                    (Verdict::Stale, None),
                    "{before} then a backfilled {change}"
                );
                assert_eq!(
                    decide_backfilled(Some(&last), v(9), change),
                    (Verdict::Stale, None)
                );
            }
        }
        let deleted = applied(10, Change::Deleted);
        assert_eq!(
            decide_backfilled(Some(&deleted), v(10), Change::Deleted),
            (Verdict::Stale, None)
        );
    }

    #[test]
    fn rule_7_a_newer_backfill_is_applied_and_marks_the_state() {
        let last = applied(10, Change::Updated);
        assert_eq!(
            decide_backfilled(Some(&last), v(11), Change::Deleted),
            (Verdict::Fresh, Some(backfilled(11, Change::Deleted)))
        );
        assert_eq!(
            decide_backfilled(None, v(3), Change::Created),
            (Verdict::Fresh, Some(backfilled(3, Change::Created)))
        );
        // A delete stays terminal for backfills too.
        let deleted = applied(10, Change::Deleted);
        assert_eq!(
            decide_backfilled(Some(&deleted), v(11), Change::Updated),
            (Verdict::Stale, None)
        );
        // And a webhook after it is judged by rules 1 to 6, the mark gone.
        let state = backfilled(11, Change::Updated);
        assert_eq!(
            decide(Some(&state), v(12), Change::Updated),
            (Verdict::Fresh, Some(applied(12, Change::Updated)))
        );
    }

    #[test]
    fn rule_7_a_versionless_backfill_is_applied_only_to_an_unknown_entity() {
        let last = applied(10, Change::Updated);
        assert_eq!(
            decide_backfilled(Some(&last), None, Change::Updated),
            (Verdict::Stale, None)
        );
        let (verdict, _) = decide_backfilled(None, None, Change::Updated);
        assert_eq!(verdict, Verdict::Fresh);
    }

    #[test]
    fn rule_7_a_backfill_applied_before_is_applied_again_when_replayed() {
        // The state is the backfill's own: replaying it (after a dead letter) hands it on again.
        let state = backfilled(10, Change::Updated);
        assert_eq!(
            decide_backfilled(Some(&state), v(10), Change::Updated),
            (Verdict::Fresh, Some(state))
        );
    }

    #[test]
    fn version_parses_with_and_without_fraction_and_any_offset() {
        let whole = Version::parse_rfc3339("2024-05-02T08:30:12Z");
        let millis = Version::parse_rfc3339("2024-05-02T08:30:12.345Z");
        let offset = Version::parse_rfc3339("2024-05-02T10:30:12.345+02:00");
        let nanos = Version::parse_rfc3339("2024-05-02T08:30:12.000000001Z");
        assert_eq!(
            whole.map(Version::as_nanos),
            Some(1_714_638_612_000_000_000)
        );
        assert_eq!(
            millis.map(Version::as_nanos),
            Some(1_714_638_612_345_000_000)
        );
        assert_eq!(offset, millis);
        assert_eq!(
            nanos.map(Version::as_nanos),
            Some(1_714_638_612_000_000_001)
        );
        assert!(whole < millis);
    }

    #[test]
    fn version_rejects_non_rfc3339() {
        for s in [
            "",
            "yesterday",
            "2024-05-02",
            "2024-05-02 08:30:12",
            "1714638612",
        ] {
            assert_eq!(Version::parse_rfc3339(s), None, "{s}");
        }
    }

    #[test]
    fn version_displays_as_utc_rfc3339() {
        let show = |s: &str| Version::parse_rfc3339(s).map(|v| v.to_string());
        assert_eq!(
            show("2024-05-02T10:30:12.345+02:00").as_deref(),
            Some("2024-05-02T08:30:12.345Z")
        );
        assert_eq!(
            show("2024-05-02T08:30:12Z").as_deref(),
            Some("2024-05-02T08:30:12Z")
        );
        assert_eq!(Version::from_nanos(0).to_string(), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn change_ranks_and_round_trips_its_name() {
        assert!(Change::Deleted > Change::Updated && Change::Updated > Change::Created);
        for change in [Change::Created, Change::Updated, Change::Deleted] {
            assert_eq!(Change::parse(change.as_str()), Some(change));
        }
        assert_eq!(Change::parse("moved"), None);
    }

    /// One event of a generated history: (entity, version in nanoseconds, kind).
    type Ev = (usize, i64, Change);

    /// Histories for up to four entities: distinct increasing versions per entity, some versions
    /// carrying two kinds (a tie), and sometimes a delete: newer than or tied with the last
    /// version, or followed by a newer update (which a terminal delete must keep out when the
    /// delete is applied first).
    fn histories() -> impl Strategy<Value = Vec<Ev>> {
        let entity = (
            prop::collection::vec((1i64..1_000, any::<bool>(), any::<bool>()), 1..6),
            0u8..4,
        );
        prop::collection::vec(entity, 1..4).prop_map(|entities| {
            let mut events = Vec::new();
            for (id, (steps, final_delete)) in entities.into_iter().enumerate() {
                let mut at = 0i64;
                for (gap, tie, created) in steps {
                    at += gap;
                    let first = if created {
                        Change::Created
                    } else {
                        Change::Updated
                    };
                    events.push((id, at, first));
                    if tie && first == Change::Created {
                        events.push((id, at, Change::Updated));
                    }
                }
                match final_delete {
                    1 => events.push((id, at + 1, Change::Deleted)),
                    2 => events.push((id, at, Change::Deleted)),
                    3 => {
                        events.push((id, at + 1, Change::Deleted));
                        events.push((id, at + 2, Change::Updated));
                    }
                    _ => {}
                }
            }
            events
        })
    }

    /// A history delivered shuffled, with some events delivered twice.
    fn deliveries() -> impl Strategy<Value = (Vec<Ev>, Vec<Ev>)> {
        histories().prop_flat_map(|history| {
            let len = history.len();
            let dupes = prop::collection::vec(0..len, 0..len + 1);
            (Just(history), dupes).prop_flat_map(|(history, dupes)| {
                let mut all = history.clone();
                all.extend(dupes.iter().map(|&i| history[i]));
                (Just(history), Just(all).prop_shuffle())
            })
        })
    }

    proptest! {
        #[test]
        fn shuffled_deliveries_are_applied_in_order_and_end_at_the_newest(
            (history, delivered) in deliveries()
        ) {
            let mut store: HashMap<usize, Applied> = HashMap::new();
            let mut fresh: HashMap<usize, Vec<(i64, Change)>> = HashMap::new();
            for &(entity, nanos, change) in &delivered {
                let (verdict, state) = decide(store.get(&entity), v(nanos), change);
                prop_assert_eq!(verdict.is_fresh(), state.is_some());
                if let Some(state) = state {
                    store.insert(entity, state);
                    fresh.entry(entity).or_default().push((nanos, change));
                }
            }
            for (entity, applied) in &fresh {
                for pair in applied.windows(2) {
                    // Never backwards: strictly newer, or a tie with a rank at least as high.
                    prop_assert!(pair[1] >= pair[0], "{:?} went backwards", pair);
                    // After a delete only the same delete again.
                    if pair[0].1 == Change::Deleted {
                        prop_assert_eq!(pair[1], pair[0]);
                    }
                }
                let own = || history.iter().filter(|e| e.0 == *entity).map(|e| (e.1, e.2));
                let newest = own().max();
                let last = applied.last().copied();
                // The newest event always wins, except that an update newer than a delete loses
                // when the delete got there first.
                let delete = own().find(|e| e.1 == Change::Deleted);
                prop_assert!(
                    last == newest || (last.is_some() && last == delete),
                    "last fresh {:?}, newest {:?}", last, newest
                );
            }
        }
    }
}
