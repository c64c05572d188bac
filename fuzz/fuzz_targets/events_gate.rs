//! The event parser and the ordering gate together: a run of deliveries, each parsed as the
//! dispatcher parses it, then judged against its entity's last applied state. Input: records
//! separated by the byte 0x1E, each a topic (the `X-Labelbox-Event` value, possibly empty for
//! none), a newline, and the body.
//!
//! Beyond "never panics": a body parses the same from memory and from a reader (small bodies
//! are kept in memory, large ones as files: the event must not depend on which); the gate
//! gives a state exactly to fresh events, never moves an entity's version back, never revives
//! a deleted entity, and takes the same event again right after it (a redelivery) as fresh.

#![no_main]

use std::collections::HashMap;

use labelhook::events;
use labelhook::ordering::{self, Applied, Change, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut states: HashMap<String, Applied> = HashMap::new();
    for record in data.split(|b| *b == 0x1e).take(64) {
        let (topic, body) = match record.iter().position(|b| *b == b'\n') {
            Some(at) => (&record[..at], &record[at + 1..]),
            None => (&record[..0], record),
        };
        // Header values reach the parser as text or not at all.
        let Ok(topic) = std::str::from_utf8(topic) else {
            continue;
        };
        let topic = (!topic.is_empty()).then_some(topic);

        let in_memory = events::parse(topic, body);
        let streamed = events::parse_reader(topic, body);
        match (&in_memory, &streamed) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "memory and reader disagree"),
            (Err(_), Err(_)) => {}
            _ => panic!("memory {in_memory:?}, reader {streamed:?}"),
        }
        let Ok(parsed) = in_memory else {
            continue;
        };
        // Every error message must be safe to log: positions and field names, never content.
        if let Some(label) = parsed.event.label() {
            if let Err(e) = events::label_content(label, body) {
                let _ = e.to_string();
            }
        }
        let Some(entity) = parsed.entity.clone() else {
            continue;
        };

        let last = states.get(&entity).copied();
        let (verdict, state) = ordering::decide(last.as_ref(), parsed.version, parsed.change);
        assert_eq!(verdict == Verdict::Fresh, state.is_some());
        let Some(state) = state else {
            continue;
        };
        if let Some(last) = last {
            if let (Some(before), Some(after)) = (last.version, state.version) {
                assert!(after >= before, "version moved back");
            }
            assert!(
                !(last.version.is_some() && state.version.is_none()),
                "version forgotten"
            );
            if last.change == Change::Deleted {
                assert_eq!(state.change, Change::Deleted, "a deleted entity revived");
            }
        }
        // The same delivery again, as a redelivery would bring it.
        assert_eq!(
            ordering::decide(Some(&state), parsed.version, parsed.change),
            (Verdict::Fresh, Some(state)),
            "a redelivery judged differently"
        );
        states.insert(entity, state);
    }
});
