//! The keys the configuration knows, for the messages about those it does not: each section's
//! keys (read from the settings types themselves, so no list here can fall behind them), the
//! keys of each handler kind, and the known key nearest to a misspelt one.
//!
//! A suggestion is only made for a near miss, and never of a key the same table already sets:
//! `did you mean` must not point at a key that is there.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{
    AdminSettings, DispatchSettings, HandlerKind, LogSettings, ModelTrainingSettings,
    NetworkSettings, ServerSettings, StoreSettings,
};
use crate::store::RetentionSettings;

/// How alike (Jaro-Winkler, 0 to 1) a misspelt key and a known one must be to suggest it:
/// `pth` and `path`, `listen_adress` and `listen`, but not `url` and `path`.
const SIMILAR_ENOUGH: f64 = 0.8;

/// The keys of a struct that denies unknown fields, from serde's own list: a table holding
/// one key no struct has is refused with "unknown field `...`, expected one of `a`, `b`".
pub(super) fn fields_of<T: DeserializeOwned>() -> Vec<String> {
    let probe = serde_json::json!({ "\u{0}": null });
    match serde_json::from_value::<T>(probe) {
        Ok(_) => Vec::new(),
        Err(e) => expected_keys(&e.to_string()),
    }
}

/// The names in backquotes after "expected" in a serde message.
pub(super) fn expected_keys(message: &str) -> Vec<String> {
    let Some((_, expected)) = message.split_once(", expected ") else {
        return Vec::new();
    };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Every key a `LABELHOOK__` variable can set, dotted (`server.listen`,
/// `store.retention.interval`): the tables' keys, not the `[[...]]` lists.
pub(super) fn overridable_keys() -> Vec<String> {
    let sections: [(&str, Vec<String>); 8] = [
        ("server", fields_of::<ServerSettings>()),
        ("network", fields_of::<NetworkSettings>()),
        ("store", fields_of::<StoreSettings>()),
        ("store.retention", fields_of::<RetentionSettings>()),
        ("dispatch", fields_of::<DispatchSettings>()),
        ("log", fields_of::<LogSettings>()),
        ("admin", fields_of::<AdminSettings>()),
        ("model_training", fields_of::<ModelTrainingSettings>()),
    ];
    sections
        .iter()
        .flat_map(|(section, keys)| keys.iter().map(move |key| format!("{section}.{key}")))
        .collect()
}

/// The known key most like `given`, when one is near enough.
pub(super) fn closest<'a>(
    given: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    known
        .into_iter()
        .map(|key| (strsim::jaro_winkler(given, key), key))
        .filter(|(score, _)| *score >= SIMILAR_ENOUGH)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, key)| key)
}

/// What an unknown key in `table` is told, and the key it was probably meant to be.
pub(super) struct Unknown {
    pub message: String,
    pub meant: Option<String>,
}

/// The message for an unknown key `given` of a table that takes `known` and sets `table`'s
/// keys; `kind` when the table is a `[[handler]]` of a kind read from it (then `known` are
/// that kind's keys only).
pub(super) fn unknown(
    given: &str,
    known: &[String],
    table: Option<&serde_json::Map<String, Value>>,
    kind: Option<HandlerKind>,
) -> Unknown {
    let unset = known
        .iter()
        .map(String::as_str)
        .filter(|k| table.is_none_or(|t| !t.contains_key(*k)));
    let meant = closest(given, unset).map(str::to_owned);
    let what = match kind {
        Some(kind) => format!("unknown key for kind {:?}", kind.as_str()),
        None => "unknown key".to_owned(),
    };
    let list = || {
        known
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let message = match (&meant, kind) {
        (Some(key), _) => format!("{what}; did you mean `{key}`?"),
        (None, Some(_)) => format!("{what}, which takes {}", list()),
        (None, None) if known.is_empty() => what,
        (None, None) => format!("{what}; expected one of {}", list()),
    };
    Unknown { message, meant }
}

/// The kind a `[[handler]]` table says it is, when it says so in a way that reads.
pub(super) fn handler_kind(table: &Value) -> Option<HandlerKind> {
    let kind = table.get("kind")?.clone();
    serde_json::from_value(kind).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HandlerSettings;

    #[test]
    fn a_sections_keys_are_read_from_its_type() {
        let server = fields_of::<ServerSettings>();
        assert!(server.contains(&"listen".to_owned()), "{server:?}");
        assert!(
            server.contains(&"backlog_max_delay".to_owned()),
            "{server:?}"
        );
        let keys = overridable_keys();
        assert!(keys.contains(&"store.retention.interval".to_owned()));
        assert!(keys.contains(&"model_training.duplicate_window".to_owned()));
    }

    #[test]
    fn the_handler_kinds_keys_together_are_the_handler_tables_keys() {
        let mut by_kinds: Vec<&str> = [
            HandlerKind::Log,
            HandlerKind::File,
            HandlerKind::Http,
            HandlerKind::Command,
            HandlerKind::Nats,
        ]
        .into_iter()
        .flat_map(HandlerKind::keys)
        .collect();
        by_kinds.sort_unstable();
        by_kinds.dedup();
        let mut table = fields_of::<HandlerSettings>();
        table.sort_unstable();
        assert_eq!(by_kinds, table);
    }

    #[test]
    fn only_a_near_miss_that_is_not_set_already_is_suggested() {
        let known = ["listen", "admin_listen", "max_body_bytes"].map(str::to_owned);
        assert_eq!(
            unknown("listn", &known, None, None).meant.as_deref(),
            Some("listen")
        );
        assert_eq!(
            unknown("listen_adress", &known, None, None)
                .meant
                .as_deref(),
            Some("listen")
        );
        assert_eq!(unknown("url", &known, None, None).meant, None);
        let table = serde_json::json!({ "listen": "127.0.0.1:1" });
        let given = unknown("listn", &known, table.as_object(), None);
        assert_eq!(given.meant, None);
        assert_eq!(
            given.message,
            "unknown key; expected one of `listen`, `admin_listen`, `max_body_bytes`"
        );
    }
}
