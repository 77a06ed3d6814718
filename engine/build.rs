//! Rebuilds the engine when a migration file changes.
// sqlx::migrate!() embeds the migration files at compile time; rebuild when they change.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
