//! Model routing: requested model name → connection and upstream model.
//!
//! `[routing]` maps patterns to `"connection.model"` or `"connection.*"`. An exact name (no `*`)
//! beats every pattern; patterns are tried in file order and the first match decides, with no
//! fall-through: if its connection is disabled the answer is 503, if the caller may not use it,
//! 403. `*` matches any run of characters (including none), anywhere in the pattern.

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

/// The compiled routing table.
#[derive(Debug, Default)]
pub struct Router {
    entries: Vec<(Pattern, Target)>,
    exact: HashMap<String, usize>,
    wildcards: Vec<usize>,
}

impl Router {
    /// Builds a router from `(pattern, target)` pairs in file order.
    pub fn new(entries: Vec<(Pattern, Target)>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        for (i, (p, _)) in entries.iter().enumerate() {
            if p.is_wildcard() {
                wildcards.push(i);
            } else {
                exact.entry(p.as_str().to_owned()).or_insert(i);
            }
        }
        Router { entries, exact, wildcards }
    }

    /// The route for `model`: an exact entry, else the first matching pattern in file order.
    pub fn route(&self, model: &str) -> Option<(&Pattern, &Target)> {
        let i = match self.exact.get(model) {
            Some(&i) => i,
            None => *self.wildcards.iter().find(|&&i| self.entries[i].0.matches(model))?,
        };
        let (p, t) = &self.entries[i];
        Some((p, t))
    }

    /// Every entry in file order.
    pub fn entries(&self) -> impl Iterator<Item = (&Pattern, &Target)> {
        self.entries.iter().map(|(p, t)| (p, t))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(pairs: &[(&str, usize, &str)]) -> Router {
        Router::new(pairs.iter().map(|(p, c, m)| (Pattern::new(p), Target::new(*c, m))).collect())
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
        let (p, t) = r.route("gpt-4o").unwrap();
        assert_eq!((p.as_str(), t.connection, t.upstream_model("gpt-4o")), ("gpt-4o", 1, "real"));
    }

    #[test]
    fn patterns_are_tried_in_file_order_not_alphabetical() {
        // "z*" comes first in the file and must win over "*" and "zz*".
        let r = router(&[("z*", 2, "*"), ("zz*", 1, "*"), ("*", 0, "fallback")]);
        assert_eq!(r.route("zzz").unwrap().1.connection, 2);
        assert_eq!(r.route("other").unwrap().1.upstream_model("other"), "fallback");
        let r = router(&[("m*", 0, "*")]);
        assert!(r.route("x").is_none());
    }

    #[test]
    fn renamed_model_token_is_escaped_json() {
        let t = Target::new(0, "a\"b");
        assert_eq!(&t.model.unwrap().json[..], b"\"a\\\"b\"");
    }
}
