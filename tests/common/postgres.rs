//! A PostgreSQL database of its own for each test, on the server named by
//! `LABELHOOK_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`), dropped when the
//! test ends.
//!
//! Where no server answers, a test is skipped with a printed reason, unless
//! `LABELHOOK_REQUIRE_SERVICES=1` (set by `.ci/run`), which turns the skip into a failure.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{Connection, Executor, PgConnection};

/// Where the test server is, without a database name.
pub fn server_url() -> String {
    std::env::var("LABELHOOK_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
        .trim_end_matches('/')
        .to_owned()
}

/// True when a missing service must fail the test rather than skip it.
pub fn services_required() -> bool {
    std::env::var("LABELHOOK_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// A database created for one test; dropped (with its connections) when this is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    /// A fresh database, or `None` (with the reason printed) where PostgreSQL is not running.
    pub async fn create(test: &str) -> Option<TestDb> {
        let server = server_url();
        let mut admin = match PgConnection::connect(&format!("{server}/postgres")).await {
            Ok(conn) => conn,
            Err(e) => {
                let reason = format!("PostgreSQL not reachable at {server} ({e})");
                assert!(
                    !services_required(),
                    "{test}: {reason}; LABELHOOK_REQUIRE_SERVICES=1 makes this a failure"
                );
                eprintln!("skipped {test}: {reason}; set LABELHOOK_TEST_POSTGRES to run it");
                return None;
            }
        };
        let name = format!(
            "lh_test_{}_{}_{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        admin
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .expect("create test database");
        let _ = admin.close().await;
        Some(TestDb {
            url: format!("{server}/{name}"),
            name,
        })
    }

    /// The same, for tests that are not async.
    pub fn create_blocking(test: &str) -> Option<TestDb> {
        runtime().block_on(Self::create(test))
    }
}

/// A runtime for the blocking tests' few async calls.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (server_url(), self.name.clone());
        // On a thread of its own: Drop may run inside a test's runtime, which cannot block.
        let dropped = std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut admin = PgConnection::connect(&format!("{server}/postgres")).await?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
                    .await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}
