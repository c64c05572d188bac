//! Rebuilds when an embedded PostgreSQL migration changes: `sqlx::migrate!` reads the
//! directory at compile time, and cargo does not otherwise know it depends on new files there.

fn main() {
    println!("cargo:rerun-if-changed=src/store/postgres/migrations");
}
