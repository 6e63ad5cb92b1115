//! Model routing: requested model name → a [`Route`]: the targets (connection and upstream
//! model) the attempt loop may use, in order.
//!
//! `[routing]` maps patterns to `"connection.model"` or `"connection.*"`. An exact name (no `*`)
//! beats every pattern; patterns are tried in file order and the first match decides, with no
//! fall-through: if its connection is disabled the answer is 503, if the caller may not use it,
//! 403. `*` matches any run of characters (including none), anywhere in the pattern. A route
//! holds a list of targets (one per routing value today), so pools and fallbacks only add the
//! choice among them.

use bytes::Bytes;
use std::collections::HashMap;

/// A routing key: an exact model name or a `*` wildcard pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    /// The text split at `*`; one part means an exact name.
    parts: Vec<String>,
}

impl Pattern {
    /// Compiles a pattern.
    pub fn new(text: &str) -> Self {
        Pattern { text: text.to_owned(), parts: text.split('*').map(str::to_owned).collect() }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it contains a wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.parts.len() > 1
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(x) => x,
            None => return name.is_empty(),
        };
        if rest.is_empty() {
            return name == first;
        }
        let Some(mut tail) = name.strip_prefix(first.as_str()) else { return false };
        let (last, middle) = rest.split_last().unwrap_or((first, &[]));
        for part in middle {
            match tail.find(part.as_str()) {
                Some(i) => tail = &tail[i + part.len()..],
                None => return false,
            }
        }
        tail.len() >= last.len() && tail.ends_with(last.as_str())
    }
}

/// Where a route sends requests.
#[derive(Debug, Clone)]
pub struct Target {
    /// Connection id (index into `Config::connections`).
    pub connection: usize,
    /// The upstream model: `None` passes the requested name through (`connection.*`).
    pub model: Option<UpstreamModel>,
}

/// A renamed upstream model, with its JSON string token pre-rendered for splicing.
#[derive(Debug, Clone)]
pub struct UpstreamModel {
    /// The model name.
    pub name: String,
    /// `name` as a JSON string token, quotes included.
    pub json: Bytes,
}

impl Target {
    /// A target from the part after `connection.` in a routing value.
    pub fn new(connection: usize, model: &str) -> Self {
        let model = (model != "*").then(|| {
            let mut json = Vec::with_capacity(model.len() + 2);
            crate::json::write_str(&mut json, model);
            UpstreamModel { name: model.to_owned(), json: json.into() }
        });
        Target { connection, model }
    }

    /// The model to send upstream for a requested name.
    pub fn upstream_model<'a>(&'a self, requested: &'a str) -> &'a str {
        self.model.as_ref().map_or(requested, |m| m.name.as_str())
    }

    /// `*` or the renamed model, for summaries.
    pub fn model_label(&self) -> &str {
        self.model.as_ref().map_or("*", |m| m.name.as_str())
    }
}

/// What a model name routes to.
#[derive(Debug, Clone)]
pub struct Route {
    /// The routing key that matched.
    pub pattern: Pattern,
    /// Where requests may go, in order; never empty.
    pub targets: Vec<Target>,
}

/// The compiled routing table.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
    exact: HashMap<String, usize>,
    wildcards: Vec<usize>,
}

impl Router {
    /// Builds a router from routes in file order.
    pub fn new(routes: Vec<Route>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            if r.pattern.is_wildcard() {
                wildcards.push(i);
            } else {
                exact.entry(r.pattern.as_str().to_owned()).or_insert(i);
            }
        }
        Router { routes, exact, wildcards }
    }

    /// The route for `model`: an exact entry, else the first matching pattern in file order.
    pub fn route(&self, model: &str) -> Option<&Route> {
        let i = match self.exact.get(model) {
            Some(&i) => i,
            None => *self.wildcards.iter().find(|&&i| self.routes[i].pattern.matches(model))?,
        };
        Some(&self.routes[i])
    }

    /// Every route in file order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(pairs: &[(&str, usize, &str)]) -> Router {
        Router::new(
            pairs
                .iter()
                .map(|(p, c, m)| Route { pattern: Pattern::new(p), targets: vec![Target::new(*c, m)] })
                .collect(),
        )
    }

    fn first(r: &Router, model: &str) -> Option<(String, usize, String)> {
        let route = r.route(model)?;
        let t = &route.targets[0];
        Some((route.pattern.as_str().to_owned(), t.connection, t.upstream_model(model).to_owned()))
    }

    #[test]
    fn wildcards_match_anywhere() {
        let cases = [
            ("gpt*", "gpt-4o", true),
            ("gpt*", "gpt", true),
            ("gpt*", "xgpt", false),
            ("*-mini", "gpt-4o-mini", true),
            ("*-mini", "mini", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
            ("*", "", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (p, name, want) in cases {
            assert_eq!(Pattern::new(p).matches(name), want, "{p} ~ {name}");
        }
    }

    #[test]
    fn exact_name_beats_an_earlier_pattern() {
        let r = router(&[("gpt*", 0, "*"), ("gpt-4o", 1, "real")]);
        assert_eq!(first(&r, "gpt-4o"), Some(("gpt-4o".into(), 1, "real".into())));
    }

    #[test]
    fn patterns_are_tried_in_file_order_not_alphabetical() {
        // "z*" comes first in the file and must win over "*" and "zz*".
        let r = router(&[("z*", 2, "*"), ("zz*", 1, "*"), ("*", 0, "fallback")]);
        assert_eq!(first(&r, "zzz").unwrap().1, 2);
        assert_eq!(first(&r, "other").unwrap().2, "fallback");
        let r = router(&[("m*", 0, "*")]);
        assert!(r.route("x").is_none());
    }

    #[test]
    fn renamed_model_token_is_escaped_json() {
        let t = Target::new(0, "a\"b");
        assert_eq!(&t.model.unwrap().json[..], b"\"a\\\"b\"");
    }
}
