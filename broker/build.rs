//! `sqlx::migrate!` embeds the migrations at compile time; tell cargo to rebuild when a new
//! migration file appears (it notices edits to existing files on its own, not new ones).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
