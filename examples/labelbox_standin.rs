//! The stand-in of Labelbox's API that the tests use (`tests/common/labelbox_standin.rs`, written
//! from LABELBOX.md section 9; it is not Labelbox), as a program: to try `labelhook labelbox ...`
//! by hand, and for the backfill memory benchmark (`bench/labelbox-backfill.sh`).
//!
//! ```sh
//! cargo run --release --example labelbox_standin -- 100000
//! ```
//!
//! Serves one project whose export has that many data rows (one label each, about 1 KiB a
//! line, all active on 2024-05-03), in chunks of `STANDIN_CHUNK_BYTES` (default 1 MiB). Prints
//! `listening on http://127.0.0.1:PORT`, then the API URL, key and project to configure, and
//! serves until it is killed.

#[path = "../tests/common/labelbox_standin.rs"]
mod standin;

use std::io::Write;

/// The project the stand-in's export holds.
const PROJECT: &str = "cprojectbench000000000001";

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let chunk_bytes: u64 = std::env::var("STANDIN_CHUNK_BYTES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1 << 20);
    let server = standin::StandIn::start();
    server.with(|s| {
        s.add_project(PROJECT, "bench project");
        if let Some(project) = s.projects.get_mut(PROJECT) {
            project.rows = standin::rows::many(PROJECT, rows, "2024-05-03T10:00:00Z");
        }
        s.chunk_bytes = chunk_bytes;
        s.polls_before_done = 1;
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on http://{}", server.addr);
    let _ = writeln!(out, "api_url = \"{}\"", server.api_url());
    let _ = writeln!(out, "api_key = \"{}\"", standin::API_KEY);
    let _ = writeln!(out, "project = \"{PROJECT}\" ({rows} rows)");
    let _ = out.flush();
    drop(out);
    loop {
        std::thread::park();
    }
}
