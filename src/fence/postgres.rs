//! Fenced writes to PostgreSQL: a transaction that first advances the resource's fence row,
//! and is handed to the caller only if the caller's token was not older.
//!
//! # The fence table
//! ```sql
//! CREATE TABLE IF NOT EXISTS leasehold_fence (
//!     resource text PRIMARY KEY,
//!     token    numeric(20, 0) NOT NULL CHECK (token >= 0)
//! );
//! ```
//! One row per resource holds the newest token that wrote it. PostgreSQL has no unsigned
//! 64-bit integer, and tokens use the whole u64 range (Redis-seeded tokens are near 2^50,
//! leasehold 0.1's near 2^61, and nothing stops one at 2^63 or more), so `bigint` cannot hold
//! every token. `numeric(20, 0)` holds all of them exactly, compares them as numbers, and
//! shows the real token to anyone reading the table, and a user with a client of their own
//! writes the token into SQL as it is. (The other way, storing `token − 2^63` in a `bigint`,
//! keeps order and is a few bytes smaller, but every query anyone writes against the table
//! would have to repeat the shift, and a reader of the table sees numbers that are not the
//! tokens.) Tokens travel as text and are cast in SQL, so no numeric type is needed on the
//! Rust side.
//!
//! # The statement
//! ```sql
//! INSERT INTO leasehold_fence (resource, token) VALUES ($1, $2::text::numeric)
//! ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token
//!     WHERE leasehold_fence.token <= EXCLUDED.token
//! ```
//! It touches one row when the token is not older (inserted, or updated), none when a newer
//! token is recorded. Either way it leaves the row locked until the transaction ends, so a
//! concurrent fenced transaction on the same resource waits for this one, then sees its
//! token; the caller's statements, run after it in the same transaction, therefore commit
//! only while no newer holder has written. A transaction that is rolled back (or dropped)
//! takes its fence advance back with its writes.

use futures::future::{join, join_all};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error as PgError, Statement, Transaction};

use super::{FenceError, StaleToken};

/// PostgreSQL resources protected by fencing tokens: [`transaction`](Self::transaction)
/// opens a transaction only for a token not older than the newest one recorded for the
/// resource, in a fence table (see the module docs for its layout).
///
/// ```no_run
/// # async fn run(guard: leasehold::LockGuard) -> Result<(), Box<dyn std::error::Error>> {
/// use leasehold::PgFence;
///
/// let (mut client, connection) =
///     tokio_postgres::connect("host=127.0.0.1 user=app dbname=app", tokio_postgres::NoTls)
///         .await?;
/// tokio::spawn(connection);
/// let fence = PgFence::new();
/// fence.create_table(&client).await?;
///
/// let tx = fence
///     .transaction(&mut client, "accounts/42", guard.fencing_token())
///     .await?; // Err(FenceError::Stale(_)) once a newer holder has written
/// tx.execute("UPDATE accounts SET balance = balance + 5 WHERE id = 42", &[])
///     .await?;
/// tx.commit().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgFence {
    /// The table's name, quoted as an identifier.
    table: String,
    fence_sql: String,
    newest_sql: String,
}

impl Default for PgFence {
    fn default() -> Self {
        Self::new()
    }
}

impl PgFence {
    /// The fence table used unless [`PgFence::with_table`] says otherwise.
    pub const DEFAULT_TABLE: &'static str = "leasehold_fence";

    /// A fence on the table [`DEFAULT_TABLE`](Self::DEFAULT_TABLE), `leasehold_fence`.
    pub fn new() -> Self {
        Self::with_table(Self::DEFAULT_TABLE)
    }

    /// A fence on the table `name` in the session's `search_path`. The name is quoted, so it
    /// is taken exactly as given (case included) and cannot inject SQL.
    pub fn with_table(name: &str) -> Self {
        let table = format!("\"{}\"", name.replace('"', "\"\""));
        PgFence {
            fence_sql: format!(
                "INSERT INTO {table} AS fence (resource, token) VALUES ($1, $2::text::numeric) \
                 ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token \
                 WHERE fence.token <= EXCLUDED.token"
            ),
            newest_sql: format!("SELECT token::text FROM {table} WHERE resource = $1"),
            table,
        }
    }

    /// The fence table's name, quoted as SQL takes it.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The `CREATE TABLE IF NOT EXISTS` statement for the fence table, for a migration of
    /// the application's own.
    pub fn create_table_sql(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\
             resource text PRIMARY KEY, \
             token numeric(20, 0) NOT NULL CHECK (token >= 0))",
            self.table
        )
    }

    /// Creates the fence table if it does not exist.
    pub async fn create_table(&self, client: &Client) -> Result<(), PgError> {
        client.batch_execute(&self.create_table_sql()).await
    }

    /// Begins a transaction on `client` and advances `resource`'s fence to `token` in it;
    /// returns the transaction, for the caller's statements and `commit`, if `token` is not
    /// older than the newest token recorded for `resource`. An older token gets
    /// [`FenceError::Stale`], and the transaction is rolled back: nothing is written.
    ///
    /// The fence row stays locked until the transaction ends: keep it short, and commit
    /// before doing slow work outside the database.
    pub async fn transaction<'a>(
        &self,
        client: &'a mut Client,
        resource: &str,
        token: u64,
    ) -> Result<Transaction<'a>, FenceError<PgError>> {
        let tx = client.transaction().await.map_err(FenceError::Store)?;
        let digits = token.to_string();
        // Typed parameters: one round trip (parse, bind and execute together), where an
        // untyped query would first prepare the statement in a round trip of its own.
        let advanced = tx
            .execute_typed(
                &self.fence_sql,
                &[(&resource, Type::TEXT), (&digits, Type::TEXT)],
            )
            .await
            .map_err(FenceError::Store)?;
        if advanced == 1 {
            return Ok(tx);
        }
        let newest = newest(&tx, &self.newest_sql, resource)
            .await
            .map_err(FenceError::Store)?;
        // Dropping `tx` rolls it back; say so explicitly, and report a failure to.
        tx.rollback().await.map_err(FenceError::Store)?;
        // No row can only mean another client deleted it between the two statements; the
        // token was refused all the same, by the newer token that row held.
        Err(FenceError::Stale(StaleToken::new(
            token,
            newest.unwrap_or(u64::MAX),
        )))
    }

    /// Runs the prepared `statements` (each with its parameters) in one transaction with the
    /// fence advance, and commits it, if `token` is not older than the newest token recorded
    /// for `resource`; returns each statement's row count. An older token gets
    /// [`FenceError::Stale`], and the transaction is rolled back: nothing is written.
    ///
    /// Faster than [`transaction`](Self::transaction) by a round trip: the fence statement
    /// and the caller's statements are sent together, pipelined (tokio-postgres sends
    /// requests made concurrently on one connection without waiting for each answer), so the
    /// whole write costs `BEGIN`, one round trip for every statement, and `COMMIT`, as the
    /// unfenced transaction does. The fence statement runs first and takes the fence row's
    /// lock first, so the statements run behind it; but they do run before the fence's
    /// answer is read, also for a stale token, whose transaction is then rolled back. Side
    /// effects that a rollback does not undo (a sequence's `nextval`) therefore happen for
    /// a stale token too; use [`transaction`](Self::transaction) where that matters, or when
    /// a statement needs another's result.
    pub async fn execute(
        &self,
        client: &mut Client,
        resource: &str,
        token: u64,
        statements: &[(&Statement, &[&(dyn ToSql + Sync)])],
    ) -> Result<Vec<u64>, FenceError<PgError>> {
        let tx = client.transaction().await.map_err(FenceError::Store)?;
        let digits = token.to_string();
        let fence_params: [(&(dyn ToSql + Sync), Type); 2] =
            [(&resource, Type::TEXT), (&digits, Type::TEXT)];
        let fence = tx.execute_typed(&self.fence_sql, &fence_params);
        let writes = join_all(
            statements
                .iter()
                .map(|(statement, params)| tx.execute(*statement, params)),
        );
        // `join` polls the fence first, and each request is sent when first polled: the
        // fence statement is on the wire before the caller's.
        let (advanced, counts) = join(fence, writes).await;
        match advanced.map_err(FenceError::Store)? {
            1 => {
                let counts = counts
                    .into_iter()
                    .collect::<Result<Vec<u64>, _>>()
                    .map_err(FenceError::Store)?;
                tx.commit().await.map_err(FenceError::Store)?;
                Ok(counts)
            }
            _ => {
                // The caller's statements may have failed only because the transaction was
                // refused; the refusal is the answer. Their effects go with the rollback.
                let newest = newest(&tx, &self.newest_sql, resource)
                    .await
                    .map_err(FenceError::Store)?;
                tx.rollback().await.map_err(FenceError::Store)?;
                Err(FenceError::Stale(StaleToken::new(
                    token,
                    newest.unwrap_or(u64::MAX),
                )))
            }
        }
    }

    /// The newest token recorded for `resource`, or `None` if no fenced write has happened.
    pub async fn newest(&self, client: &Client, resource: &str) -> Result<Option<u64>, PgError> {
        let row = client
            .query_typed_opt(&self.newest_sql, &[(&resource, Type::TEXT)])
            .await?;
        Ok(row.and_then(|row| row.get::<_, Option<String>>(0)?.parse().ok()))
    }
}

async fn newest(tx: &Transaction<'_>, sql: &str, resource: &str) -> Result<Option<u64>, PgError> {
    let row = tx.query_typed_opt(sql, &[(&resource, Type::TEXT)]).await?;
    Ok(row.and_then(|row| row.get::<_, Option<String>>(0)?.parse().ok()))
}
