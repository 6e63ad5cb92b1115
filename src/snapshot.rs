//! The snapshot: one configuration and the transports built for it, swapped whole.
//!
//! The server loads the current snapshot once per request, so a request sees one configuration
//! from start to end however often it is replaced, and a replacement ([`crate::proxy::Proxy::reload`])
//! is one atomic store. Transports are matched to connections by name: a connection that reaches
//! its upstream the same way as before ([`Connection::same_transport`]) keeps its client, so a
//! reload keeps its warm connection pool.
//!
//! Only what the configuration decides lives here. Mutable state (the mock's cache today; limit
//! counters, spend, cooldowns and metric handles later) lives outside, keyed by the stable names
//! from the configuration, so a reload re-binds it instead of resetting it.

use crate::client::Transport;
use crate::config::{Config, ConfigError, Connection};
use crate::log::RequestLog;
use crate::metrics::{Handles, Metrics};
use crate::provider::mock::Mock;
use std::sync::Arc;

/// A configuration and one transport per connection (`transports[i]` serves
/// `config.connections[i]`).
pub struct Snapshot {
    /// The configuration.
    pub config: Arc<Config>,
    transports: Vec<Transport>,
    /// This configuration's handles into the gateway's metrics.
    pub metrics: Handles,
    /// The request log, when `[log] requests` is set (kept across reloads that keep its path).
    pub log: Option<Arc<RequestLog>>,
    /// The limited scopes bound to their counters ([`crate::limit::Limits::bind`]).
    pub limits: crate::limit::Bound,
    /// The embeddings cache (kept across reloads that keep its settings).
    pub embeddings_cache: Option<Arc<crate::embed::Cache>>,
}

impl Snapshot {
    /// Builds the transports for `config`, reusing those of `previous` for connections of the
    /// same name that reach their upstream the same way; pooled targets keep the health
    /// (cooldowns, failures, latency) of `previous`'s targets of the same name whose connection
    /// is unchanged.
    pub fn new(
        mut config: Config,
        mock: &Arc<Mock>,
        previous: Option<&Snapshot>,
        metrics: &Arc<Metrics>,
    ) -> Result<Snapshot, ConfigError> {
        if let Some(p) = previous {
            let (connections, before) = (&config.connections, &p.config.connections);
            config.router.adopt_health(&p.config.router, |t| {
                let now = &connections[t.connection];
                before.iter().any(|b| b.name == now.name && b.same_upstream(now))
            });
        }
        let transports = config
            .connections
            .iter()
            .map(|conn| match previous.and_then(|p| p.transport_named(conn)) {
                Some(t) => Ok(t.clone()),
                None => Transport::new(conn, mock),
            })
            .collect::<Result<_, _>>()?;
        let log = match &config.log.requests {
            None => None,
            Some(path) => match previous
                .and_then(|p| p.log.as_ref())
                .filter(|l| l.is(path, config.log.requests_max_bytes))
            {
                Some(kept) => Some(kept.clone()),
                None => Some(Arc::new(
                    RequestLog::start(path.clone(), config.log.requests_max_bytes, metrics.clone(), crate::log::QUEUE)
                        .map_err(|e| ConfigError(format!("log.requests: cannot start the writer: {e}")))?,
                )),
            },
        };
        let handles = Handles::new(metrics.clone(), &config);
        let embeddings_cache = config.embeddings_cache.map(|(mb, ttl)| {
            match previous.and_then(|p| p.embeddings_cache.as_ref()).filter(|c| c.settings == (mb, ttl)) {
                Some(kept) => kept.clone(),
                None => Arc::new(crate::embed::Cache::new(mb, ttl)),
            }
        });
        Ok(Snapshot {
            config: Arc::new(config),
            transports,
            metrics: handles,
            log,
            limits: Default::default(),
            embeddings_cache,
        })
    }

    /// The connection with id `id` and its transport.
    pub fn connection(&self, id: usize) -> Option<(&Connection, &Transport)> {
        Some((self.config.connections.get(id)?, self.transports.get(id)?))
    }

    /// The transport this snapshot has for a connection named like `conn` and reaching its
    /// upstream the same way.
    fn transport_named(&self, conn: &Connection) -> Option<&Transport> {
        let i = self.config.connections.iter().position(|c| c.name == conn.name && c.same_transport(conn))?;
        self.transports.get(i)
    }

    /// Whether this snapshot's transport for connection `id` is the one `previous` had for the
    /// connection of the same name (the pool was kept).
    #[cfg(test)]
    pub fn kept_transport(&self, id: usize, previous: &Snapshot) -> bool {
        let Some((conn, mine)) = self.connection(id) else { return false };
        previous.transport_named(conn).is_some_and(|theirs| mine.same_as(theirs))
    }
}
