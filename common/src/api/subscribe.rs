//! Subscriptions: a query's rows, then every change to them, resumable by change id.
//!
//! All subscribers of one query (same SQL, parameters and key columns) share a *matcher*: it
//! holds the query's current result keyed by the key columns, and re-runs the query whenever a
//! commit touches a table the query reads (commits that arrive meanwhile coalesce into one
//! re-run). Each difference becomes a change with an id from a counter that only grows on this
//! node (it starts from the wall clock, so ids from a previous run of the node are never
//! mistaken for current ones). A matcher keeps its last changes so that a subscriber that
//! reconnects with its last change id gets exactly what it missed; otherwise it is told to reset
//! and gets the whole result again.
//!
//! Most subscriptions follow rows of one table keyed by its primary key (say, the running
//! Machines of an app). For those the matcher does not re-run the whole query on a commit: it
//! re-reads only the rows the commit changed, through the query itself (so its filter still
//! decides membership), which keeps the cost of a commit proportional to what it changed, not to
//! the size of the result. Queries that join, aggregate, limit or read subqueries are re-run
//! whole.
//!
//! Never stalls the node: changes fan out through a bounded broadcast channel, and a subscriber
//! that falls `subscriber_buffer` changes behind is cut off with RESOURCE_EXHAUSTED naming the
//! change id to resume from. A matcher without subscribers lingers a while for resumes, then
//! goes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use strata_proto::convert::{row_to_pb, statement_from_pb};
use strata_proto::v1 as pb;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use super::metrics::ApiMetrics;
use super::status::from_store;
use crate::store::{Deadline, Statement, Store, Value};

/// How long a matcher without subscribers stays, so a reconnecting subscriber can resume.
const LINGER: Duration = Duration::from_secs(60);

/// Changed keys a matcher re-reads one by one at most; beyond it the whole query is cheaper.
const PENDING_KEYS_MAX: usize = 512;

/// Bounds of the subscription hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Distinct queries followed at once.
    pub subscriptions_max: usize,
    /// Changes a subscriber may fall behind before it is cut off.
    pub subscriber_buffer: usize,
    /// Changes each query keeps for resuming subscribers.
    pub history: usize,
    /// Longest time one run of a subscription's query may take (`api.query_timeout_ms`): it
    /// holds a reader connection, and a query without an end must give it back.
    pub query_timeout: Duration,
}

/// The stream a subscriber reads.
pub type EventStream = ReceiverStream<Result<pb::SubscribeEvent, Status>>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct QueryKey {
    sql: String,
    params: Vec<u8>,
    key_columns: Vec<String>,
}

struct Matcher {
    statement: Statement,
    /// Tables the query reads; `None` when that could not be worked out (any commit wakes it).
    tables: Option<HashSet<String>>,
    key_positions: Vec<usize>,
    /// How to re-read only changed rows, when the query allows it.
    incremental: Option<Incremental>,
    /// Rows changed since the last evaluation.
    pending: Mutex<Pending>,
    state: Mutex<MatcherState>,
    changes: broadcast::Sender<Arc<pb::Change>>,
    wake: Notify,
    subscribers: AtomicUsize,
}

/// A query over one table, keyed by that table's primary key: a changed row's membership in the
/// result depends on that row alone.
struct Incremental {
    table: String,
    /// For each key column (in key order), its position in the table's primary key.
    key_from_pk: Vec<usize>,
    /// The query restricted to given keys, up to `IN (VALUES `: the key rows and `)` follow.
    filtered_sql: String,
}

#[derive(Default)]
struct Pending {
    /// Packed primary keys of changed rows.
    keys: HashSet<Vec<u8>>,
    /// Re-run the whole query (too many keys, missed commits, or not incremental).
    full: bool,
}

struct MatcherState {
    columns: Vec<String>,
    rows: BTreeMap<Vec<u8>, Vec<Value>>,
    history: VecDeque<Arc<pb::Change>>,
    /// The result reflects every change up to this id.
    last_id: u64,
}

/// Every subscription of a node.
pub struct Hub {
    store: Store,
    config: HubConfig,
    metrics: Arc<ApiMetrics>,
    next_id: AtomicU64,
    matchers: Mutex<HashMap<QueryKey, Arc<Matcher>>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Hub {
    /// A hub over `store`; it follows the store's commits until `cancel`.
    pub fn start(
        store: Store,
        config: HubConfig,
        metrics: Arc<ApiMetrics>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Hub> {
        let first_id = crate::store::WallClock::System.now_ms() << 16;
        let hub = Arc::new(Hub {
            store,
            config,
            metrics,
            next_id: AtomicU64::new(first_id),
            matchers: Mutex::new(HashMap::new()),
            tracker: tracker.clone(),
            cancel,
        });
        crate::telemetry::spawn(&tracker, Arc::clone(&hub).follow_commits());
        hub
    }

    fn matchers(&self) -> std::sync::MutexGuard<'_, HashMap<QueryKey, Arc<Matcher>>> {
        self.matchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a subscription.
    pub async fn subscribe(
        self: &Arc<Self>,
        request: pb::SubscribeRequest,
    ) -> Result<EventStream, Status> {
        let statement = statement_from_pb(
            request
                .statement
                .ok_or_else(|| Status::invalid_argument("statement is required"))?,
            0,
        )?;
        let key = QueryKey {
            sql: statement.sql.clone(),
            params: postcard::to_allocvec(&statement.params).unwrap_or_default(),
            key_columns: request.key_columns.clone(),
        };
        let existing = self.matchers().get(&key).cloned();
        let matcher = match existing {
            Some(matcher) => matcher,
            None => self.create(key, statement, request.key_columns).await?,
        };
        Ok(self.attach(matcher, request.from_change_id))
    }

    async fn create(
        self: &Arc<Self>,
        key: QueryKey,
        statement: Statement,
        key_columns: Vec<String>,
    ) -> Result<Arc<Matcher>, Status> {
        if self.matchers().len() >= self.config.subscriptions_max {
            return Err(Status::resource_exhausted(format!(
                "this node follows {} queries already (the limit)",
                self.config.subscriptions_max
            )));
        }
        let (columns, rows) = run(&self.store, &statement, self.config.query_timeout).await?;
        let key_positions = if key_columns.is_empty() {
            vec![0]
        } else {
            key_columns
                .iter()
                .map(|k| {
                    columns.iter().position(|c| c == k).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "key column {k:?} is not a column of the query (columns: {columns:?})"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?
        };
        if columns.is_empty() {
            return Err(Status::invalid_argument("the query returns no columns"));
        }
        let incremental = incremental_plan(&self.store, &statement, &columns, &key_positions);
        let rows = keyed(rows, &key_positions);
        let (changes, _) = broadcast::channel(self.config.subscriber_buffer.max(1));
        let matcher = Arc::new(Matcher {
            tables: tables_read(&statement.sql),
            statement,
            key_positions,
            incremental,
            pending: Mutex::new(Pending::default()),
            state: Mutex::new(MatcherState {
                columns,
                rows,
                history: VecDeque::new(),
                last_id: self.next_id.fetch_add(1, Ordering::Relaxed),
            }),
            changes,
            wake: Notify::new(),
            subscribers: AtomicUsize::new(0),
        });
        // Two subscribers racing on a new query share whichever matcher got in first.
        let (matcher, inserted) = match self.matchers().entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(entry) => (Arc::clone(entry.get()), false),
            std::collections::hash_map::Entry::Vacant(entry) => {
                (Arc::clone(entry.insert(matcher)), true)
            }
        };
        if inserted {
            crate::telemetry::spawn(
                &self.tracker,
                Arc::clone(self).follow(key, Arc::clone(&matcher)),
            );
        }
        self.metrics.subscriptions.set(self.matchers().len() as i64);
        Ok(matcher)
    }

    /// Sends the subscriber its starting point, then follows the matcher's changes.
    fn attach(self: &Arc<Self>, matcher: Arc<Matcher>, from: Option<u64>) -> EventStream {
        let (tx, rx) = mpsc::channel(64);
        let mut opening: Vec<pb::subscribe_event::Event> = Vec::new();
        let (receiver, mut last) = {
            let state = matcher.state.lock().unwrap_or_else(PoisonError::into_inner);
            let resumable = from.is_some_and(|id| {
                id == state.last_id
                    || state
                        .history
                        .front()
                        .is_some_and(|first| id + 1 >= first.change_id && id <= state.last_id)
            });
            match from {
                Some(id) if resumable => {
                    for change in state.history.iter().filter(|c| c.change_id > id) {
                        opening.push(pb::subscribe_event::Event::Change((**change).clone()));
                    }
                }
                _ => {
                    if from.is_some() {
                        opening.push(pb::subscribe_event::Event::Reset(pb::Reset {}));
                    }
                    opening.push(pb::subscribe_event::Event::Columns(pb::Columns {
                        names: state.columns.clone(),
                    }));
                    for row in state.rows.values() {
                        opening.push(pb::subscribe_event::Event::Row(row_to_pb(row.clone())));
                    }
                    opening.push(pb::subscribe_event::Event::Ready(state.last_id));
                }
            }
            // Subscribing under the lock: no change is missed or sent twice.
            (matcher.changes.subscribe(), state.last_id)
        };
        matcher.subscribers.fetch_add(1, Ordering::Relaxed);
        self.metrics.subscribers.inc();
        let hub = Arc::clone(self);
        let mut receiver = receiver;
        crate::telemetry::spawn(&self.tracker, async move {
            let send = |event| pb::SubscribeEvent { event: Some(event) };
            for event in opening {
                if tx.send(Ok(send(event))).await.is_err() {
                    hub.detach(&matcher);
                    return;
                }
            }
            loop {
                let change = tokio::select! {
                    () = hub.cancel.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the node is shutting down"))).await;
                        break;
                    }
                    () = tx.closed() => break,
                    change = receiver.recv() => change,
                };
                match change {
                    Ok(change) => {
                        if change.change_id <= last {
                            continue;
                        }
                        last = change.change_id;
                        if tx
                            .send(Ok(send(pb::subscribe_event::Event::Change(
                                (*change).clone(),
                            ))))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        hub.metrics.subscribers_cut.inc();
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "subscriber fell {missed} changes behind and was cut off; \
                                 subscribe again with from_change_id {last}"
                            ))))
                            .await;
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
            hub.detach(&matcher);
        });
        ReceiverStream::new(rx)
    }

    fn detach(&self, matcher: &Matcher) {
        matcher.subscribers.fetch_sub(1, Ordering::Relaxed);
        matcher.wake.notify_one();
        self.metrics.subscribers.dec();
    }

    /// Wakes the matchers of the tables each commit touched.
    async fn follow_commits(self: Arc<Self>) {
        let mut events = self.store.subscribe();
        loop {
            let event = tokio::select! {
                () = self.cancel.cancelled() => return,
                event = events.recv() => event,
            };
            let tables: Option<HashSet<&str>> = match &event {
                Ok(event) => Some(event.changed.iter().map(|(t, _)| t.as_str()).collect()),
                // Missed commits: every matcher re-runs.
                Err(broadcast::error::RecvError::Lagged(_)) => None,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tables.as_ref().is_some_and(HashSet::is_empty) {
                continue;
            }
            for matcher in self.matchers().values() {
                let relevant = match (&tables, &matcher.tables) {
                    (Some(changed), Some(read)) => {
                        read.iter().any(|t| changed.contains(t.as_str()))
                    }
                    _ => true,
                };
                if !relevant {
                    continue;
                }
                {
                    let mut pending = matcher
                        .pending
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    match (&event, &matcher.incremental) {
                        (Ok(event), Some(incremental)) if !pending.full => {
                            let keys = event
                                .changed
                                .iter()
                                .filter(|(t, _)| *t == incremental.table);
                            pending.keys.extend(keys.map(|(_, pk)| pk.clone()));
                            if pending.keys.len() > PENDING_KEYS_MAX {
                                pending.keys.clear();
                                pending.full = true;
                            }
                        }
                        _ => pending.full = true,
                    }
                }
                matcher.wake.notify_one();
            }
        }
    }

    /// A matcher's life: re-run on every wake, publish the differences, go when unused.
    async fn follow(self: Arc<Self>, key: QueryKey, matcher: Arc<Matcher>) {
        let mut idle_for = Duration::ZERO;
        loop {
            let woken = tokio::select! {
                () = self.cancel.cancelled() => return,
                () = matcher.wake.notified() => true,
                () = tokio::time::sleep(LINGER / 4) => false,
            };
            if matcher.subscribers.load(Ordering::Relaxed) == 0 {
                idle_for += if woken { Duration::ZERO } else { LINGER / 4 };
                if idle_for >= LINGER {
                    self.matchers().remove(&key);
                    self.metrics.subscriptions.set(self.matchers().len() as i64);
                    return;
                }
            } else {
                idle_for = Duration::ZERO;
            }
            if !woken {
                continue;
            }
            let pending = std::mem::take(
                &mut *matcher
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            let result = match &matcher.incremental {
                Some(incremental) if !pending.full => {
                    if pending.keys.is_empty() {
                        continue;
                    }
                    self.reread(&matcher, incremental, pending.keys).await
                }
                _ => run(&self.store, &matcher.statement, self.config.query_timeout)
                    .await
                    .map(|(_, rows)| self.publish(&matcher, keyed(rows, &matcher.key_positions))),
            };
            if let Err(status) = result {
                tracing::warn!(sql = %matcher.statement.sql, error = %status.message(), "subscription query failed");
            }
        }
    }

    /// Re-reads the rows of `keys` through the query, and publishes how they changed.
    async fn reread(
        &self,
        matcher: &Matcher,
        incremental: &Incremental,
        keys: HashSet<Vec<u8>>,
    ) -> Result<(), Status> {
        let mut params = matcher.statement.params.clone();
        let mut wanted = Vec::with_capacity(keys.len());
        for pk in keys {
            let Ok(values) = crate::store::unpack_pk(&pk) else {
                continue;
            };
            let key: Vec<Value> = incremental
                .key_from_pk
                .iter()
                .filter_map(|&i| values.get(i).cloned())
                .collect();
            wanted.push(postcard::to_allocvec(&key.iter().collect::<Vec<_>>()).unwrap_or_default());
            params.extend(key);
        }
        let width = incremental.key_from_pk.len();
        let placeholders: Vec<String> = (0..wanted.len())
            .map(|row| {
                let first = matcher.statement.params.len() + row * width + 1;
                let cells: Vec<String> = (first..first + width).map(|i| format!("?{i}")).collect();
                format!("({})", cells.join(", "))
            })
            .collect();
        let sql = format!("{}{})", incremental.filtered_sql, placeholders.join(", "));
        let statement = Statement { sql, params };
        let (_, rows) = run(&self.store, &statement, self.config.query_timeout).await?;
        let fresh = keyed(rows, &matcher.key_positions);
        let mut changes = Vec::new();
        {
            let state = matcher.state.lock().unwrap_or_else(PoisonError::into_inner);
            for key in &wanted {
                match (state.rows.get(key), fresh.get(key)) {
                    (Some(old), None) => {
                        changes.push((key.clone(), pb::ChangeKind::Delete, old.clone()))
                    }
                    (Some(old), Some(new)) if new != old => {
                        changes.push((key.clone(), pb::ChangeKind::Update, new.clone()));
                    }
                    (None, Some(new)) => {
                        changes.push((key.clone(), pb::ChangeKind::Insert, new.clone()))
                    }
                    _ => {}
                }
            }
        }
        self.emit(matcher, changes);
        Ok(())
    }

    /// Publishes the differences between the current result and a fresh whole one.
    fn publish(&self, matcher: &Matcher, rows: BTreeMap<Vec<u8>, Vec<Value>>) {
        let mut changes = Vec::new();
        {
            let state = matcher.state.lock().unwrap_or_else(PoisonError::into_inner);
            for (key, old) in &state.rows {
                match rows.get(key) {
                    None => changes.push((key.clone(), pb::ChangeKind::Delete, old.clone())),
                    Some(new) if new != old => {
                        changes.push((key.clone(), pb::ChangeKind::Update, new.clone()))
                    }
                    Some(_) => {}
                }
            }
            for (key, new) in &rows {
                if !state.rows.contains_key(key) {
                    changes.push((key.clone(), pb::ChangeKind::Insert, new.clone()));
                }
            }
        }
        self.emit(matcher, changes);
    }

    /// Applies changes to the matcher's result, numbers them, keeps them for resumes and sends
    /// them to the subscribers.
    fn emit(&self, matcher: &Matcher, changes: Vec<(Vec<u8>, pb::ChangeKind, Vec<Value>)>) {
        let mut state = matcher.state.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, kind, row) in changes {
            if kind == pb::ChangeKind::Delete {
                state.rows.remove(&key);
            } else {
                state.rows.insert(key, row.clone());
            }
            let change = Arc::new(pb::Change {
                change_id: self.next_id.fetch_add(1, Ordering::Relaxed),
                kind: kind as i32,
                row: Some(row_to_pb(row)),
            });
            state.last_id = change.change_id;
            state.history.push_back(Arc::clone(&change));
            if state.history.len() > self.config.history.max(1) {
                state.history.pop_front();
            }
            // No subscriber is fine: the history keeps it for resumes.
            let _ = matcher.changes.send(change);
        }
    }
}

/// Runs a subscription's query on a reader, stopped after `timeout`.
async fn run(
    store: &Store,
    statement: &Statement,
    timeout: Duration,
) -> Result<(Vec<String>, Vec<Vec<Value>>), Status> {
    let store = store.clone();
    let statement = statement.clone();
    let deadline = Deadline::after(timeout, "api.query_timeout_ms");
    let rows = tokio::task::spawn_blocking(move || {
        store.query_within(&statement.sql, &statement.params, &deadline)
    })
    .await
    .map_err(|err| Status::internal(format!("query task failed: {err}")))?
    .map_err(from_store)?;
    Ok((rows.columns, rows.rows))
}

fn keyed(rows: Vec<Vec<Value>>, key_positions: &[usize]) -> BTreeMap<Vec<u8>, Vec<Value>> {
    rows.into_iter()
        .map(|row| {
            let key: Vec<&Value> = key_positions.iter().filter_map(|&p| row.get(p)).collect();
            (postcard::to_allocvec(&key).unwrap_or_default(), row)
        })
        .collect()
}

/// Aggregate functions: a query using one is re-run whole.
const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "total",
    "min",
    "max",
    "avg",
    "group_concat",
    "string_agg",
];

/// Works out whether a query can be re-evaluated row by row: one table, no join, no subquery,
/// no aggregate, window, DISTINCT, GROUP BY or LIMIT, and key columns that are exactly the
/// table's primary key.
fn incremental_plan(
    store: &Store,
    statement: &Statement,
    columns: &[String],
    key_positions: &[usize],
) -> Option<Incremental> {
    use sqlparser::ast::{self, Expr, SetExpr, TableFactor};
    use sqlparser::dialect::SQLiteDialect;
    use sqlparser::parser::Parser;
    let statements = Parser::parse_sql(&SQLiteDialect {}, &statement.sql).ok()?;
    let [ast::Statement::Query(query)] = statements.as_slice() else {
        return None;
    };
    if query.limit_clause.is_some() || query.fetch.is_some() || query.with.is_some() {
        return None;
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    let group_by_empty = matches!(&select.group_by, ast::GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty());
    if select.distinct.is_some()
        || select.having.is_some()
        || !group_by_empty
        || select.from.len() != 1
    {
        return None;
    }
    let from = &select.from[0];
    if !from.joins.is_empty() {
        return None;
    }
    let TableFactor::Table { name, .. } = &from.relation else {
        return None;
    };
    let table = match name.0.last()? {
        ast::ObjectNamePart::Identifier(ident) => ident.value.clone(),
        _ => return None,
    };
    // Exactly one table mentioned anywhere: no subquery decides membership.
    let mut relations = 0;
    let _ = ast::visit_relations(&statements, |_| {
        relations += 1;
        ControlFlow::<()>::Continue(())
    });
    let mut aggregate = false;
    let _ = ast::visit_expressions(&statements, |expr| {
        if let Expr::Function(function) = expr {
            let name = function.name.to_string().to_lowercase();
            if function.over.is_some() || AGGREGATES.contains(&name.as_str()) {
                aggregate = true;
            }
        }
        let subquery = matches!(
            expr,
            Expr::Subquery(_)
                | Expr::Exists { .. }
                | Expr::In {
                    target: ast::InTarget::Subquery(_) | ast::InTarget::Table { .. },
                    ..
                }
        );
        if subquery {
            aggregate = true;
        }
        ControlFlow::<()>::Continue(())
    });
    if relations != 1 || aggregate {
        return None;
    }
    let schema = store.schema();
    let pk = schema.table(&table)?.primary_key().to_vec();
    let key_names: Vec<&String> = key_positions
        .iter()
        .filter_map(|&p| columns.get(p))
        .collect();
    if key_names.len() != pk.len() {
        return None;
    }
    let key_from_pk: Vec<usize> = key_names
        .iter()
        .map(|name| pk.iter().position(|k| k.eq_ignore_ascii_case(name)))
        .collect::<Option<_>>()?;
    let quoted: Vec<String> = key_names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
        .collect();
    let inner = statement.sql.trim().trim_end_matches(';');
    let filtered_sql = format!(
        "SELECT * FROM ({inner}) WHERE ({}) IN (VALUES ",
        quoted.join(", ")
    );
    Some(Incremental {
        table,
        key_from_pk,
        filtered_sql,
    })
}

/// The tables a query reads, or `None` if the SQL is beyond the parser (then any commit
/// re-runs it, which is correct, only slower).
fn tables_read(sql: &str) -> Option<HashSet<String>> {
    use sqlparser::dialect::SQLiteDialect;
    use sqlparser::parser::Parser;
    let statements = Parser::parse_sql(&SQLiteDialect {}, sql).ok()?;
    let mut tables = HashSet::new();
    let _ = sqlparser::ast::visit_relations(&statements, |relation| {
        if let Some(sqlparser::ast::ObjectNamePart::Identifier(ident)) = relation.0.last() {
            tables.insert(ident.value.clone());
        }
        ControlFlow::<()>::Continue(())
    });
    (!tables.is_empty()).then_some(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_table_queries_keyed_by_the_primary_key_are_reread_row_by_row() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open(dir.path().join("db"), crate::store::StoreOptions::default()).unwrap();
        store
            .migrate_blocking(
                crate::store::Schema::parse(
                    "CREATE TABLE m (id TEXT NOT NULL PRIMARY KEY, app TEXT, n INT);
                     CREATE TABLE a (name TEXT NOT NULL PRIMARY KEY);",
                )
                .unwrap(),
            )
            .unwrap();
        let plan = |sql: &str, columns: &[&str], keys: &[usize]| {
            let statement = Statement::new(sql);
            let columns: Vec<String> = columns.iter().map(|c| (*c).to_owned()).collect();
            incremental_plan(&store, &statement, &columns, keys)
        };
        let yes = plan(
            "SELECT id, n FROM m WHERE app = 'web' ORDER BY n",
            &["id", "n"],
            &[0],
        )
        .unwrap();
        assert_eq!(yes.table, "m");
        assert!(
            yes.filtered_sql
                .starts_with("SELECT * FROM (SELECT id, n FROM m")
        );
        for sql in [
            "SELECT app, count(*) FROM m GROUP BY app",
            "SELECT id FROM m LIMIT 5",
            "SELECT DISTINCT id FROM m",
            "SELECT m.id FROM m JOIN a ON a.name = m.app",
            "SELECT id FROM m WHERE app IN (SELECT name FROM a)",
            "SELECT id, row_number() OVER () FROM m",
        ] {
            assert!(plan(sql, &["id"], &[0]).is_none(), "{sql}");
        }
        // The key must be the primary key.
        assert!(plan("SELECT app, id FROM m", &["app", "id"], &[0]).is_none());
    }

    #[test]
    fn tables_are_read_from_joins_and_subqueries() {
        let tables = tables_read(
            "SELECT m.id FROM machines m JOIN apps a ON a.name = m.app \
             WHERE m.region IN (SELECT region FROM regions)",
        )
        .unwrap();
        let mut tables: Vec<_> = tables.into_iter().collect();
        tables.sort();
        assert_eq!(tables, ["apps", "machines", "regions"]);
        assert!(tables_read("SELECT 1").is_none());
    }
}
