//! Tests against the real binary: started on port 0, driven with curl and its own CLI.

mod helpers;
#[path = "../common/labelbox_standin.rs"]
mod labelbox_standin;
#[path = "../common/nats.rs"]
mod nats_stream;
#[path = "../common/postgres.rs"]
mod postgres;

mod bench;
mod browser;
mod cli;
mod console;
mod dispatch;
mod durability;
mod faults;
mod file_output;
mod hostile;
mod ingress;
mod labelbox;
mod labelbox_backfill;
mod labelbox_webhooks;
mod metrics;
mod nats;
mod ordering;
mod readme;
mod replicas;
mod retention;
mod traces;
mod typed_events;
