//! `sqlx::migrate!` embeds the Postgres migrations at compile time and notices edits to the
//! files it embedded, but not a new migration file: rebuild when the directory changes.
fn main() {
    println!("cargo:rerun-if-changed=../migrations/postgres");
}
