//! Following a query on a remote node: a subscription kept alive across failures.
//!
//! [`Follow::run`] subscribes to a query on one of a list of endpoints and hands what it learns
//! to a sink as [`Event`]s: the result starts over (`Reset`), rows arrive, change or leave, the
//! initial result is complete (`Ready`), or the subscription broke (`Down`). After a failure it
//! waits a jittered, doubling back-off (bounded by `backoff_max`) and subscribes again on the
//! next endpoint, from scratch: change ids belong to one node, so resuming on another could
//! skip changes. The sink runs inline on the follower's task and must be quick (it updates a
//! cache under a short lock).
//!
//! It must not: block, hold a lock across an `.await`, or retry without a pause.

use std::time::Duration;

use strata_proto::convert::value_from_pb;
use strata_proto::v1 as pb;
use strata_types::{Statement, Value};
use tokio_util::sync::CancellationToken;

use crate::{Client, ClientError, ClientTls};

/// What a follower learns.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The result starts over with these columns: drop every row held.
    Reset(Vec<String>),
    /// A row of the result, new or changed.
    Upsert(Vec<Value>),
    /// A row left the result (its last values).
    Remove(Vec<Value>),
    /// The initial result is complete; what the sink holds is current from now on.
    Ready,
    /// The subscription broke (why); what the sink holds is stale until the next `Ready`.
    Down(String),
}

/// A query to follow and how.
#[derive(Debug, Clone)]
pub struct Follow {
    /// The query.
    pub statement: Statement,
    /// The columns that identify a row of its result.
    pub key_columns: Vec<String>,
    /// TLS for the endpoints.
    pub tls: Option<ClientTls>,
    /// How long connecting and subscribing may take.
    pub connect_timeout: Duration,
    /// The first pause after a failure; it doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// The longest pause.
    pub backoff_max: Duration,
}

impl Follow {
    /// Follows the query until `cancel`, on the endpoints `endpoints` returns (asked again
    /// before every attempt, since they may change).
    pub async fn run(
        self,
        endpoints: impl Fn() -> Vec<String>,
        mut sink: impl FnMut(Event),
        cancel: CancellationToken,
    ) {
        let mut attempt: usize = 0;
        let mut failures: u32 = 0;
        loop {
            let list = endpoints();
            let outcome = if list.is_empty() {
                Err("no endpoint known".to_owned())
            } else {
                let endpoint = &list[attempt % list.len()];
                tokio::select! {
                    () = cancel.cancelled() => return,
                    outcome = self.once(endpoint, &mut sink, &mut failures) => {
                        outcome.map_err(|err| format!("{endpoint}: {err}"))
                    }
                }
            };
            let reason = match outcome {
                Ok(()) => "the node ended the subscription".to_owned(),
                Err(err) => err,
            };
            sink(Event::Down(reason));
            attempt = attempt.wrapping_add(1);
            failures = failures.saturating_add(1);
            let pause = strata_types::backoff::jittered(
                self.backoff_min,
                self.backoff_max,
                failures,
                &mut rand::rng(),
            );
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One subscription, until it ends. Resets `failures` once it is live.
    async fn once(
        &self,
        endpoint: &str,
        sink: &mut impl FnMut(Event),
        failures: &mut u32,
    ) -> Result<(), ClientError> {
        let subscribe = async {
            let client = Client::connect(endpoint, self.tls.clone()).await?;
            client
                .subscribe(self.statement.clone(), self.key_columns.clone(), None)
                .await
        };
        let mut stream = match tokio::time::timeout(self.connect_timeout, subscribe).await {
            Ok(stream) => stream?,
            Err(_) => {
                return Err(ClientError::Status(tonic::Status::deadline_exceeded(
                    format!("no subscription within {:?}", self.connect_timeout),
                )));
            }
        };
        while let Some(message) = stream.message().await? {
            let Some(event) = message.event else {
                continue;
            };
            let values = |row: Option<pb::Row>| -> Vec<Value> {
                row.map(|r| r.values.into_iter().map(value_from_pb).collect())
                    .unwrap_or_default()
            };
            match event {
                // A fresh subscription always starts with its columns; a reset is followed
                // by them too.
                pb::subscribe_event::Event::Reset(_) => {}
                pb::subscribe_event::Event::Columns(columns) => sink(Event::Reset(columns.names)),
                pb::subscribe_event::Event::Row(row) => sink(Event::Upsert(values(Some(row)))),
                pb::subscribe_event::Event::Ready(_) => {
                    *failures = 0;
                    sink(Event::Ready);
                }
                pb::subscribe_event::Event::Change(change) => {
                    let row = values(change.row);
                    if change.kind == pb::ChangeKind::Delete as i32 {
                        sink(Event::Remove(row));
                    } else {
                        sink(Event::Upsert(row));
                    }
                }
            }
        }
        Ok(())
    }
}
